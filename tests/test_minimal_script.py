"""minimal_run_inference.py end to end, in a subprocess, as a user runs it."""

import signal
import subprocess
import sys

import torch

import helpers
from helpers import CYCLE_TEXT, REPO, checkpoint, cycle_checkpoint, meta_transformer, tiny_params
from llama_models import Tokenizer

def run_script(*args, home=None):
    env = None if home is None else {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    return helpers.run_script("minimal_run_inference.py", *args, env=env)


def meta_greedy(model_dir, prompt_tokens, n):
    """Greedy decoding with Meta's reference model in bf16 (our CPU default), its KV cache."""
    state_dict = torch.load(model_dir / "consolidated.00.pth", weights_only=True)
    model = meta_transformer(tiny_params(), state_dict, max_batch_size=1, dtype=torch.bfloat16)
    tokens, out = list(prompt_tokens), []
    logits = model(torch.tensor([tokens]), 0)
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), len(tokens) + len(out) - 1)
    return out


def test_greedy_text_equals_meta_reference(tmp_path):
    model_dir = checkpoint(tmp_path, seed=2)
    result = run_script("--model-dir", str(model_dir), "--prompt", "Once upon a time", "--max-new-tokens", "20",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    expected = meta_greedy(model_dir, tokenizer.encode("Once upon a time", bos=True, eos=False), 20)
    if any(t in tokenizer.stop_tokens for t in expected):
        expected = expected[:next(i for i, t in enumerate(expected) if t in tokenizer.stop_tokens)]
    assert len(expected) > 5
    assert result.stdout == "Once upon a time" + tokenizer.decode(expected) + "\n"


def test_missing_checkpoint_explains_where_to_get_one(tmp_path):
    result = run_script(home=tmp_path)  # no ~/.llama/checkpoints/Llama3.2-1B-Instruct there
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert str(tmp_path / ".llama" / "checkpoints" / "Llama3.2-1B-Instruct") in result.stderr
    assert "llama model download" in result.stderr and "original/" in result.stderr and "make demo" in result.stderr


def test_bad_checkpoint_and_device_are_one_line_errors(tmp_path):
    model_dir = checkpoint(tmp_path)
    (model_dir / "consolidated.00.pth").write_text("not a checkpoint")
    for args in (["--model-dir", str(model_dir)], ["--model-dir", str(model_dir), "--device", "cuda:7"]):
        result = run_script(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_bad_prompts_and_flags_are_one_line_errors(tmp_path):
    model_dir = checkpoint(tmp_path)
    cases = {
        "error: the prompt is 5 tokens, which leaves no room for new ones in --max-seq-len 5":
            ["--prompt", "abcd", "--max-seq-len", "5"],
        "error: the prompt is empty": ["--prompt", "  "],
        "error: --max-new-tokens must be at least 1, got 0": ["--max-new-tokens", "0"],
        "error: --threads must be at least 1, got 0": ["--threads", "0"],  # each flag by its name
    }
    for message, args in cases.items():
        result = run_script("--model-dir", str(model_dir), *args)
        assert result.returncode == 1 and result.stderr == message + "\n" and result.stdout == ""
    # --max-seq-len caps the new tokens: bos + "!" leave 5 of 7 positions, and the cycle model
    # continues "!" with the text's first 5 bytes, "🦙 ".
    capped = run_script("--model-dir", str(cycle_checkpoint(tmp_path / "cycle")), "--prompt", "!",
                        "--max-seq-len", "7", "--max-new-tokens", "100")
    assert capped.returncode == 0 and capped.stdout == "!" + CYCLE_TEXT[:2] + "\n", capped.stderr


def test_ctrl_c_keeps_the_text_and_exits_130(tmp_path):
    model_dir = cycle_checkpoint(tmp_path)
    process = helpers.start_script("minimal_run_inference.py", "--model-dir", model_dir, "--prompt", "🦙",
                                   "--max-new-tokens", "100000", "--max-seq-len", "100010", text=False)
    first = process.stdout.read(64)  # the prompt and some generated text: generation is under way
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and b"Traceback" not in stderr
    assert stderr.decode().endswith("[interrupted]\n")
    assert (first + stdout).startswith(CYCLE_TEXT.encode() * 2) and (first + stdout).endswith(b"\n")


def test_traceback_of_a_bug_reads_as_plain_python(tmp_path):
    # A single process forms its own process group; torch.distributed would prefix tracebacks "[rank0]:".
    result = subprocess.run([sys.executable, "-c", "import torch, llama_models\n"
                             "llama_models.init_distributed(torch.device('cpu'))\nraise RuntimeError('a bug')"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.stderr.startswith("Traceback (most recent call last):") and "[rank0]" not in result.stderr
    assert result.stderr.endswith("RuntimeError: a bug\n")
