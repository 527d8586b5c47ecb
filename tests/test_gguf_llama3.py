"""Llama 3.x GGUF files -> Meta's format: the layout llama.cpp's converter writes (rope_freqs,
llama-bpe, tied heads), the quantized types, against Meta's tokenizer, transformers and llama.cpp."""

import ctypes
import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import llama_models
from conftest import REPO
from helpers import checkpoint
from test_convert_gguf import write_tiny_gguf
from test_smollm2 import tokenizer_texts
from tools.convert_gguf import GLOBAL_TENSORS, LAYER_TENSORS, ConversionError, convert
from tools.hf_llama import hf_state_dict
from tools.write_gguf import write_gguf

# Tiny models with Llama 3's real vocabulary: a 3.2-1B-like one (tied head, RoPE factor 32, in
# BF16) and a 3.1-like one (separate head, factor 8, in F32).
LLAMA3_LIKE = {
    "3.2-1b-like": (dict(vocab_size=128256, use_scaled_rope=True, rope_scaling_factor=32.0), True, "BF16"),
    "3.1-like": (dict(vocab_size=128256, use_scaled_rope=True, n_kv_heads=1), False, "F32"),
}
# What makes two checkpoints the same model: every size ModelArgs derives, not how params.json
# spells them (multiple_of and ffn_dim_multiplier may differ and give the same width).
PARAMS_THAT_MATTER = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps",
                      "rope_theta", "use_scaled_rope", "rope_scaling_factor")


def model_args(model_dir):
    args = llama_models.ModelArgs.from_params(json.loads((model_dir / "params.json").read_text()))
    return {key: getattr(args, key) for key in PARAMS_THAT_MATTER}


@pytest.fixture(scope="module", params=sorted(LLAMA3_LIKE))
def round_trip(request, tmp_path_factory, llama3_tokenizer_path):
    """(original checkpoint, its GGUF written by tools/write_gguf.py, the checkpoint converted back)."""
    overrides, tied, type_name = LLAMA3_LIKE[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    original = checkpoint(tmp / "original", **overrides)
    (original / "tokenizer.model").write_bytes(llama3_tokenizer_path.read_bytes())
    if tied:  # one tensor under both names, as our converter writes it (Meta's 1B holds two equal copies)
        state_dict = torch.load(original / "consolidated.00.pth", weights_only=True)
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
        torch.save(state_dict, original / "consolidated.00.pth")
    write_gguf(original, tmp / "model.gguf", type_name)
    return original, tmp / "model.gguf", convert(tmp / "model.gguf", tmp / "converted"), tied


def test_gguf_is_laid_out_as_llama_cpp_does(round_trip):
    _, path, _, tied = round_trip
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert "rope_freqs.weight" in names and ("output.weight" not in names) == tied
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    # Strings read one by one: contents() would decode all 128256 tokens and 280147 merges.
    tokens, merges = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.merges"]
    token = lambda i: bytes(tokens.parts[tokens.data[i]]).decode()  # noqa: E731
    assert len(tokens.data) == 128256 and token(128000) == "<|begin_of_text|>" and token(220) == "Ġ"
    assert "Ġ t" in [bytes(merges.parts[i]).decode() for i in merges.data[:100]]


def test_round_trip_gives_the_same_checkpoint(round_trip, llama3_tokenizer_path):
    original, _, converted, tied = round_trip
    assert sorted(p.name for p in converted.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    # Meta's tokenizer.model, byte for byte: no tokenizer_config.json needed.
    assert (converted / "tokenizer.model").read_bytes() == llama3_tokenizer_path.read_bytes()
    assert model_args(converted) == model_args(original)
    ours = torch.load(converted / "consolidated.00.pth", weights_only=True)
    theirs = torch.load(original / "consolidated.00.pth", weights_only=True)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], theirs[name]), name
    assert (ours["output.weight"].data_ptr() == ours["tok_embeddings.weight"].data_ptr()) == tied


def test_round_trip_gives_the_same_logits(round_trip):
    original, _, converted, _ = round_trip
    prompt = torch.tensor([[128000, 791, 6864, 315, 9822, 374, 12366, 13]])
    with torch.inference_mode():
        logits = [llama_models.load(d, device="cpu", dtype=torch.float32)[0](prompt, 0) for d in (original, converted)]
    assert (logits[0] - logits[1]).abs().max() <= 1e-5


def test_token_ids_match_metas_tokenizer(round_trip):
    from models.llama3.tokenizer import Tokenizer as MetaTokenizer

    _, _, converted, _ = round_trip
    ours, meta = llama_models.Tokenizer(converted / "tokenizer.model"), MetaTokenizer(converted / "tokenizer.model")
    assert (ours.bos_id, ours.eos_id, ours.stop_tokens) == (meta.bos_id, meta.eos_id, meta.stop_tokens)
    for text in tokenizer_texts():
        assert ours.encode(text, bos=True, eos=False) == meta.encode(text, bos=True, eos=False), text


def llama_cpp_rope_factors(head_dim: int, theta: float, factor: float) -> list:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py computes it for rope_type "llama3"
    (LlamaModel.generate_extra_tensors): an independent statement of Meta's formula."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_freq_wavelen, high_freq_wavelen = 8192 / 1.0, 8192 / 4.0
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


@pytest.mark.parametrize("head_dim, theta, factor", [(128, 500000.0, 8.0), (64, 500000.0, 32.0), (16, 10000.0, 16.0)])
def test_rope_scaling_recovered_from_llama_cpp_rope_freqs(tmp_path, head_dim, theta, factor):
    shape = dict(dim=4 * head_dim, n_layers=1, n_heads=4, n_kv_heads=2, ffn=160)
    write_tiny_gguf(tmp_path / "m.gguf", shape=shape, theta=theta,
                    extra={"rope_freqs.weight": llama_cpp_rope_factors(head_dim, theta, factor)})
    args = model_args(convert(tmp_path / "m.gguf", tmp_path / "ckpt"))
    assert (args["use_scaled_rope"], args["rope_scaling_factor"], args["rope_theta"]) == (True, factor, theta)


def test_rope_freqs_matching_no_formula_is_refused(tmp_path):
    factors = llama_cpp_rope_factors(16, 10000.0, 8.0)
    factors[3] *= 1.01
    write_tiny_gguf(tmp_path / "m.gguf", extra={"rope_freqs.weight": factors})
    with pytest.raises(ConversionError, match="rope_freqs.weight matches none of Meta's RoPE scalings"):
        convert(tmp_path / "m.gguf", tmp_path / "ckpt")
    assert not any(tmp_path.glob("*ckpt*"))


# --- quantized types against transformers and llama.cpp ----------------------------------------

QUANTIZED = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn=512)  # K-quant rows: multiples of 256
# A Q4_K_M-like mix (Q4_K, Q6_K for attn_v, ffn_down and the embeddings) plus every other type.
TYPES = {"token_embd.weight": "Q6_K", "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q5_K",
         "blk.0.attn_v.weight": "Q6_K", "blk.0.attn_output.weight": "Q2_K", "blk.0.ffn_gate.weight": "Q3_K",
         "blk.0.ffn_up.weight": "Q4_K", "blk.0.ffn_down.weight": "Q6_K", "blk.1.attn_q.weight": "Q8_0",
         "blk.1.attn_k.weight": "Q4_0", "blk.1.attn_v.weight": "Q4_1", "blk.1.attn_output.weight": "Q5_0",
         "blk.1.ffn_gate.weight": "Q5_1", "blk.1.ffn_up.weight": "IQ4_XS", "blk.1.ffn_down.weight": "IQ4_NL"}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(GGUF of random valid blocks in many types, tied head; its conversion)."""
    tmp = tmp_path_factory.mktemp("quantized")
    write_tiny_gguf(tmp / "q.gguf", shape=QUANTIZED, types=TYPES, skip={"output.weight"})
    return tmp / "q.gguf", convert(tmp / "q.gguf", tmp / "ckpt")


def meta_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    _, layer, module, _ = gguf_name.split(".")
    return f"layers.{layer}.{LAYER_TENSORS[module]}.weight"


def test_quantized_types_match_llama_cpp(quantized):
    """Every quantized tensor, converted, is llama.cpp's own dequantization (ggml's
    dequantize_row_* from llama-cpp-python's libggml-base), rounded to bfloat16."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (requirements-bench.txt) not installed")
    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    path, converted = quantized
    state_dict = torch.load(converted / "consolidated.00.pth", weights_only=True)
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.name not in TYPES:
            continue
        dequantize_row = getattr(ggml, "dequantize_row_" + tensor.tensor_type.name.lower().replace("_k", "_K"))
        blocks, values = np.ascontiguousarray(tensor.data), np.empty(tensor.n_elements, np.float32)
        dequantize_row(blocks.ctypes.data_as(ctypes.c_void_p), values.ctypes.data_as(ctypes.c_void_p),
                       ctypes.c_int64(tensor.n_elements))
        ours = state_dict[meta_name(tensor.name)]
        assert torch.equal(ours, torch.from_numpy(values).reshape(ours.shape).bfloat16()), tensor.name


def test_quantized_model_matches_transformers(quantized):
    """Weights and logits against transformers' own loading of the GGUF (its weights rounded to
    bfloat16 like ours). It permutes wq and wk into its rotary layout; hf_state_dict does the same."""
    from transformers import AutoModelForCausalLM

    path, converted = quantized
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    model, _ = llama_models.load(converted, device="cpu", dtype=torch.float32, pack=False)
    theirs = hf.state_dict()
    for name, tensor in hf_state_dict(model.params, model.state_dict()).items():
        assert torch.equal(tensor, theirs[name]), name
    prompt = torch.tensor([list(range(3, 60))])
    with torch.inference_mode():
        assert (model(prompt, 0) - hf(prompt).logits).abs().max() < 1e-4


def test_type_that_cannot_be_dequantized_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "q8k.gguf", shape=QUANTIZED, types={"blk.1.attn_q.weight": "Q8_K"})
    result = subprocess.run([sys.executable, "tools/convert_gguf.py", str(tmp_path / "q8k.gguf"), str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "tensor 'blk.1.attn_q.weight' has type Q8_K, which the gguf package cannot dequantize" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8k.gguf"]
