"""llama_models.load: frugal memory, refusal of code in pickles, and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_models
from llama_models import CheckpointError
from helpers import checkpoint, tiny_params
from tools.make_checkpoint import make_checkpoint

REPO = Path(__file__).resolve().parent.parent

MEASURE_LOAD = """
import sys, torch, llama_models
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
# Warm up on a tiny checkpoint first: the first load and forward import modules lazily (~80 MB
# whatever the model's size). Then reset the peak (VmHWM) and measure the real one.
warm, _ = llama_models.load(sys.argv[2], device="cpu", max_seq_len=64)
with torch.inference_mode():
    warm(torch.tensor([[1, 2, 3]]), 0)
del warm
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
model, tok = llama_models.load(sys.argv[1], device="cpu", max_seq_len=64)
with torch.inference_mode():
    model(torch.tensor([[1, 2, 3]]), 0)  # touches every weight: they are really in memory now
print(status("VmHWM:") - before, model.layers[0].attention.wq.weight.dtype)
"""


def test_peak_memory_while_loading_is_near_the_file_size(tmp_path):
    # ~120 MB of bf16 weights, so the interpreter's own noise is small next to it.
    params = tiny_params(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=32000, multiple_of=256)
    model_dir = make_checkpoint(tmp_path / "big", params)
    size = (model_dir / "consolidated.00.pth").stat().st_size
    out = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(model_dir), str(checkpoint(tmp_path / "tiny"))], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.split()
    growth, dtype = int(out[0]), out[1]
    assert dtype == "torch.bfloat16"  # the CPU default, and the file's dtype: no copy
    print(f"peak RSS growth {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint: {growth / size:.2f}x")
    assert growth <= 1.2 * size


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    model_dir = checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    payload = Payload()
    payload.marker = marker
    torch.save({"tok_embeddings.weight": torch.zeros(2), "evil": payload}, model_dir / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        llama_models.load(model_dir, device="cpu")
    assert not marker.exists()


def corrupt(model_dir: Path, how: str):
    pth = model_dir / "consolidated.00.pth"
    if how == "no_dir":
        return model_dir / "nowhere"
    if how == "no_params":
        (model_dir / "params.json").unlink()
    elif how == "bad_json":
        (model_dir / "params.json").write_text("{dim: 64")
    elif how == "bad_param":
        (model_dir / "params.json").write_text(json.dumps(tiny_params(n_heads=3)))
    elif how == "no_tokenizer":
        (model_dir / "tokenizer.model").unlink()
    elif how == "bad_tokenizer":
        (model_dir / "tokenizer.model").write_text("this is not base64 !!! 1\n")
    elif how == "tokenizer_too_big":
        (model_dir / "params.json").write_text(json.dumps(tiny_params(vocab_size=300)))
    elif how == "no_weights":
        pth.unlink()
    elif how == "truncated":
        pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    elif how == "not_a_checkpoint":
        pth.write_text("hello")
    elif how == "missing_tensor":
        sd = torch.load(pth, weights_only=True)
        del sd["layers.1.feed_forward.w2.weight"]
        torch.save(sd, pth)
    elif how == "unexpected_tensor":
        sd = torch.load(pth, weights_only=True)
        sd["layers.2.attention.wq.weight"] = torch.zeros(1)
        torch.save(sd, pth)
    elif how == "wrong_shape":
        (model_dir / "params.json").write_text(json.dumps(tiny_params(multiple_of=100)))
    elif how == "mismatched_shards":
        torch.save({"norm.weight": torch.ones(64)}, model_dir / "consolidated.01.pth")
    return model_dir


ERRORS = {
    "no_dir": r"checkpoint directory .*nowhere not found",
    "no_params": r"params.json not found",
    "bad_json": r"params.json is not valid JSON",
    "bad_param": r"params.json: dim \(64\) must be divisible by n_heads \(3\)",
    "no_tokenizer": r"tokenizer file not found: .*tokenizer.model",
    "bad_tokenizer": r"tokenizer.model is not a base64 BPE vocabulary",
    "tokenizer_too_big": r"tokenizer.model has 512 tokens but params.json says vocab_size=300",
    "no_weights": r"no consolidated.\*.pth in",
    "truncated": r"consolidated.00.pth is not a readable PyTorch checkpoint",
    "not_a_checkpoint": r"consolidated.00.pth is not a readable PyTorch checkpoint",
    "missing_tensor": r"does not match params.json: missing 1 tensors \(e.g. layers.1.feed_forward.w2.weight\)",
    "unexpected_tensor": r"does not match params.json: 1 unexpected tensors \(e.g. layers.2.attention.wq.weight\)",
    "wrong_shape": r"layers.0.feed_forward.w1.weight has shape \[192, 64\] but params.json implies \[200, 64\]",
    "mismatched_shards": r"consolidated.01.pth and .*consolidated.00.pth hold different tensor names",
}


@pytest.mark.parametrize("how", ERRORS)
def test_bad_input_gives_a_clear_error(tmp_path, how):
    model_dir = corrupt(checkpoint(tmp_path), how)
    with pytest.raises(CheckpointError, match=ERRORS[how]):
        llama_models.load(model_dir, device="cpu")


def test_unavailable_device_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not available"):
        llama_models.load(checkpoint(tmp_path), device="cuda" if not torch.cuda.is_available() else "mps")
