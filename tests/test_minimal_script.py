"""minimal_run_inference.py end to end, in a subprocess, as a user runs it."""

import subprocess
import sys
from pathlib import Path

import torch

from helpers import checkpoint, meta_transformer, tiny_params
from llama_models import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def run_script(*args, home=None):
    env = None if home is None else {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "minimal_run_inference.py", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


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
