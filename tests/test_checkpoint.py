"""llama_models.load: frugal memory, refusal of code in pickles, and clear errors."""

import json
import os
from pathlib import Path

import pytest
import torch

import llama_models
from llama_models import CheckpointError
from llama_models.cli import checkpoint_dir
from helpers import checkpoint, load_peak_growth, memory_test_checkpoint, tiny_params


def test_peak_memory_while_loading_is_near_the_file_size(tmp_path):
    model_dir = memory_test_checkpoint(tmp_path)
    size = (model_dir / "consolidated.00.pth").stat().st_size
    growth, dtype = load_peak_growth(model_dir, tmp_path)
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
    "bad_tokenizer": r"tokenizer.model, line 1: not a `base64-token rank` pair",
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


def test_garbage_tokenizer_error_names_the_line_not_its_bytes(tmp_path):
    model_dir = checkpoint(tmp_path)
    path = model_dir / "tokenizer.model"
    path.write_bytes(b"IQ== 0\nIg== 1\n" + bytes(range(256)) * 40)  # two good lines, then binary junk
    with pytest.raises(CheckpointError) as error:
        llama_models.load(model_dir, device="cpu")
    assert str(error.value).startswith(f"{path}, line 3: not a `base64-token rank` pair")
    assert "\\x" not in str(error.value) and len(str(error.value)) < 300


def test_a_tokenizer_replaced_at_the_same_path_is_read_anew(tmp_path):
    # tiktoken's own loader caches files by path under /tmp: the second vocabulary would be the first.
    path = tmp_path / "tokenizer.model"
    path.write_text("YQ== 0\n")  # "a"
    assert llama_models.Tokenizer(path).encode("a", bos=False, eos=False) == [0]
    path.write_text("Yg== 0\nYQ== 1\n")  # "b", then "a"
    assert llama_models.Tokenizer(path).encode("a", bos=False, eos=False) == [1]


def test_a_mistyped_model_dir_lists_the_checkpoints_beside_it(tmp_path):
    for name in ("Llama3.2-1B-Instruct", "SmolLM2-135M-Instruct"):
        checkpoint(tmp_path / name)
    with pytest.raises(ValueError) as error:
        checkpoint_dir(tmp_path / "Llama3.2-1B-Instrcut")
    assert str(error.value) == (f"checkpoint directory {tmp_path / 'Llama3.2-1B-Instrcut'} not found; did you mean "
                                f"Llama3.2-1B-Instruct? checkpoints in {tmp_path}: Llama3.2-1B-Instruct, "
                                f"SmolLM2-135M-Instruct")
    # Nothing beside it: where to get a checkpoint.
    with pytest.raises(ValueError, match="llama model download"):
        checkpoint_dir(tmp_path / "empty" / "Llama")
    assert checkpoint_dir(tmp_path / "SmolLM2-135M-Instruct") == tmp_path / "SmolLM2-135M-Instruct"
