"""Test helpers: random checkpoints, Meta's reference model, Hugging Face conversions, the scripts
run as a user runs them."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tools.hf_llama import hf_llama  # noqa: F401  (the tests import it from here)
from tools.make_checkpoint import PRESETS, make_checkpoint

REPO = Path(__file__).resolve().parent.parent


def tiny_params(**overrides) -> dict:
    return dict(PRESETS["tiny"], **overrides)


def checkpoint(tmp_path, seed=0, **overrides):
    """A random tiny checkpoint dir; overrides change params.json keys."""
    return make_checkpoint(tmp_path, tiny_params(**overrides), seed=seed)


def sharpened(model_dir, scale=10.0, names=("output.weight",), dtype=None):
    """Scale the weights whose names end with `names` (and optionally store the file in another
    dtype), in place; returns model_dir.

    At the usual init the model's choices are nearly flat: next-token logits within rounding of
    each other, every attention row nearly uniform. Two correct implementations could then break
    ties differently, and an implementation that ignored the weights could pass. Larger weights
    spread the choices apart.
    """
    path = model_dir / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    for name in state_dict:
        if name.endswith(names):
            state_dict[name] = state_dict[name] * scale
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    torch.save(state_dict, path)
    return model_dir


def fp32_state_dict(model_dir):
    sd = torch.load(model_dir / "consolidated.00.pth", weights_only=True)
    return {k: v.float() for k, v in sd.items()}


def greedy_logits(model, prompt: list, steps: int) -> list:
    """Prefill, then `steps` greedy one-token passes through model.decode_step (eager, or compiled
    after compile_decode_step): the logits of every pass, [(1, len(prompt), V), (1, 1, V), ...]."""
    out = [model(torch.tensor([prompt]), 0)]
    for pos in range(len(prompt), len(prompt) + steps):
        out.append(model.decode_step(out[-1][:, -1:].argmax(-1), pos))
    return out


def meta_transformer(params: dict, state_dict, *, max_seq_len=128, max_batch_size=4, dtype=torch.float32):
    """Meta's reference Transformer (llama-models 0.3.0) holding `state_dict` in `dtype`."""
    from models.llama3.args import ModelArgs as MetaArgs
    from models.llama3.model import Transformer as MetaTransformer

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # Meta builds its KV cache in the default dtype
    try:
        model = MetaTransformer(MetaArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size))
    finally:
        torch.set_default_dtype(previous)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()})
    return model


MEASURE_LOAD = """
import sys, torch, llama_models
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
quantize = sys.argv[3] if sys.argv[3] != "none" else None
# Warm up on a tiny checkpoint first: the first load and forward import modules lazily (~80 MB
# whatever the model's size). Then reset the peak (VmHWM) and measure the real one.
warm, _ = llama_models.load(sys.argv[2], device="cpu", max_seq_len=64, quantize=quantize)
with torch.inference_mode():
    warm(torch.tensor([[1, 2, 3]]), 0)
del warm
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
model, tok = llama_models.load(sys.argv[1], device="cpu", max_seq_len=64, quantize=quantize)
with torch.inference_mode():
    model(torch.tensor([[1, 2, 3]]), 0)  # reads every weight: they are really in memory now
print(status("VmHWM:") - before, model.norm.weight.dtype)
"""


def memory_test_checkpoint(tmp_path) -> Path:
    """~120 MB of bf16 weights, so the interpreter's own noise is small next to it."""
    params = tiny_params(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=32000, multiple_of=256)
    return make_checkpoint(tmp_path / "big", params)


def load_peak_growth(model_dir, tmp_path, quantize=None) -> tuple[int, str]:
    """(bytes the peak RSS grows by while loading model_dir and running one forward pass, the
    model's dtype), measured in a fresh process (Linux: VmHWM)."""
    warm = checkpoint(tmp_path / "tiny")
    out = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(model_dir), str(warm), quantize or "none"],
                         capture_output=True, text=True, cwd=REPO,
                         check=True).stdout.split()
    return int(out[0]), out[1]


# --- a model that writes a known text, for streaming and the command line ---------------------

CYCLE_TEXT = "🦙 世界!"  # 12 distinct bytes: a 4-byte emoji, two 3-byte CJK ideographs, ASCII


def cycle_checkpoint(tmp_path):
    """A tiny checkpoint whose greedy continuation of any byte of CYCLE_TEXT is the next byte,
    wrapping around: the text repeats for ever, each multi-byte character split across tokens.

    The attention and feed-forward outputs are zeroed, so the final hidden state is the current
    token's (normalised) embedding; row b' of the output layer is the embedding of the byte b that
    precedes b' in the text, so b' gets by far the highest logit.
    """
    model_dir = checkpoint(tmp_path, seed=3)
    path = model_dir / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    for name in state_dict:
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            state_dict[name] = torch.zeros_like(state_dict[name])
        if name.endswith("norm.weight"):
            state_dict[name] = torch.ones_like(state_dict[name])
    embeddings = torch.nn.functional.normalize(state_dict["tok_embeddings.weight"].float(), dim=-1)
    output = torch.zeros_like(embeddings)
    text = CYCLE_TEXT.encode()
    for byte, next_byte in zip(text, text[1:] + text[:1]):
        output[next_byte] = 3 * embeddings[byte]  # logit 24 vs at most ~5 for any other token
    state_dict["tok_embeddings.weight"] = embeddings.to(torch.bfloat16)
    state_dict["output.weight"] = output.to(torch.bfloat16)
    torch.save(state_dict, path)
    return model_dir


# --- the scripts, as a user runs them ------------------------------------------------------------

def default_sigint():
    """In a child about to run a script: Ctrl-C back to its default. A test suite started in the
    background of a non-interactive shell (`cmd &`) runs with SIGINT ignored, and its children
    would inherit that: every Ctrl-C test would then fail."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(script: str, *args, **popen) -> subprocess.Popen:
    """`python SCRIPT ARGS` in the repository, started: text pipes for stdout and stderr."""
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) | popen
    return subprocess.Popen([sys.executable, script, *map(str, args)], preexec_fn=default_sigint, **popen)


def finish(process: subprocess.Popen, timeout=300) -> tuple[int, str, str]:
    """Wait for a started script: (exit status, stdout, stderr)."""
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def run_script(script: str, *args, timeout=300, **popen) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in the repository, to its end (input="..." feeds its standard input)."""
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, preexec_fn=default_sigint, **popen)


def interrupt_while_loading(command: list, checkpoint_file: Path, **popen) -> subprocess.CompletedProcess:
    """Run `command`, press Ctrl-C (SIGINT) as soon as it has mapped checkpoint_file (load() is
    under way), and return what it printed and its exit code."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint, **popen)
    deadline = time.monotonic() + 120
    while str(checkpoint_file) not in Path(f"/proc/{process.pid}/maps").read_text():
        assert process.poll() is None and time.monotonic() < deadline, "the checkpoint was never mapped"
        time.sleep(0.001)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
