import pytest

from llama_models import ModelArgs

LLAMA32_1B = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True}


def test_llama32_1b_params_json():
    args = ModelArgs.from_params(LLAMA32_1B)
    assert (args.head_dim, args.n_kv_heads, args.ffn_hidden_dim) == (64, 8, 8192)  # HF config: 8192
    assert args.rope_scaling_factor == 32


@pytest.mark.parametrize("shape, factor", [
    (dict(dim=2048, n_layers=16), 32),  # Llama 3.2 1B
    (dict(dim=3072, n_layers=28, n_heads=24), 32),  # Llama 3.2 3B
    (dict(dim=4096, n_layers=32, multiple_of=1024, ffn_dim_multiplier=1.3), 8),  # Llama 3.1 8B
    (dict(dim=2048, n_layers=16, vocab_size=32000), 8),  # same shape, not the Llama 3 vocabulary
    (dict(dim=2048, n_layers=16, rope_scaling_factor=16.0), 16),  # params.json says so
])
def test_rope_scaling_factor(shape, factor):
    assert ModelArgs.from_params(dict(LLAMA32_1B, **shape)).rope_scaling_factor == factor


def test_llama31_8b_ffn_hidden_dim():
    args = ModelArgs.from_params(dict(LLAMA32_1B, dim=4096, n_layers=32, multiple_of=1024, ffn_dim_multiplier=1.3))
    assert args.ffn_hidden_dim == 14336  # Llama 3.1 8B's intermediate_size


def test_unknown_key_is_reported_not_dropped_silently():
    with pytest.warns(UserWarning, match=r"my/params.json: unknown key 'vision_chunk_size'"):
        ModelArgs.from_params(dict(LLAMA32_1B, vision_chunk_size=448), source="my/params.json")


def test_missing_key_names_file_and_key():
    params = dict(LLAMA32_1B)
    del params["n_heads"]
    with pytest.raises(ValueError, match=r"my/params.json: missing required key 'n_heads'"):
        ModelArgs.from_params(params, source="my/params.json")


@pytest.mark.parametrize("key, value", [("dim", "2048"), ("n_layers", 0), ("norm_eps", -1.0),
                                         ("use_scaled_rope", "yes"), ("n_kv_heads", 7), ("dim", 2050)])
def test_invalid_value_names_file_and_key(key, value):
    with pytest.raises(ValueError, match=rf"my/params.json: .*{key}"):
        ModelArgs.from_params(dict(LLAMA32_1B, **{key: value}), source="my/params.json")
