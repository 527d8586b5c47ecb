"""Our Transformer against Meta's reference (llama-models 0.3.0) and transformers' Llama."""

import pytest
import torch

import llama_models
from helpers import checkpoint, fp32_state_dict, hf_llama, meta_transformer, tiny_params
from tools.make_checkpoint import make_checkpoint

CONFIGS = {
    "gqa": dict(),  # 4 heads share 2 kv heads
    "mha": dict(n_kv_heads=4),
    "mqa": dict(n_kv_heads=1),
    "ffn_dim_multiplier": dict(ffn_dim_multiplier=1.3, multiple_of=48),
    "scaled_rope": dict(use_scaled_rope=True, rope_theta=10000.0),  # factor 8, Meta's hard-coded one
    "no_kv_field": dict(n_kv_heads=None),  # absent from params.json in Llama 3 MHA checkpoints
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_meta_reference(tmp_path, name):
    params = {k: v for k, v in tiny_params(**CONFIGS[name]).items() if v is not None}  # None: key absent
    model_dir = make_checkpoint(tmp_path, params, seed=3)
    ours, _ = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=128, max_batch_size=3)
    ref = meta_transformer(params, fp32_state_dict(model_dir), max_seq_len=128, max_batch_size=3)
    tokens = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))  # batch of 3

    # Prefill 30 tokens, then 10 one-token steps through the KV cache, both models.
    with torch.inference_mode():
        ours_steps = [ours(tokens[:, :30], 0)] + [ours(tokens[:, p:p + 1], p) for p in range(30, 40)]
        ref_steps = [ref(tokens[:, :30], 0)] + [ref(tokens[:, p:p + 1], p) for p in range(30, 40)]
    diffs = []
    for a, b in zip(ours_steps, ref_steps):
        assert a.dtype == torch.float32 and a.shape == b.shape
        diffs.append((a - b).abs().max().item())
    print(f"{name}: max |ours - Meta| over prefill and 10 cached steps = {max(diffs):.2e}")
    assert max(diffs) <= 1e-4


def test_prefill_plus_steps_equals_one_full_forward(tmp_path):
    model, _ = llama_models.load(checkpoint(tmp_path), device="cpu", dtype=torch.float32, max_seq_len=64)
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(tokens, 0)
        model.setup_cache("cpu", torch.float32)  # a clean cache
        chunks = [model(tokens[:, :10], 0), model(tokens[:, 10:17], 10)]  # a chunked prefill, too
        chunks += [model(tokens[:, p:p + 1], p) for p in range(17, 24)]
    assert torch.allclose(full, torch.cat(chunks, dim=1), atol=1e-5, rtol=0)


def test_rope_factor_32_equals_transformers(tmp_path):
    # The Llama 3.2 1B shape's factor (32) comes from the shape, not from params.json; check it
    # on a small model by stating it, against transformers' llama3 RoPE with factor 32.
    # rope_theta 10000 puts frequencies in the low, blended and high bands of the recipe.
    overrides = dict(use_scaled_rope=True, rope_scaling_factor=32.0, rope_theta=10000.0, dim=128, n_heads=2,
                     n_kv_heads=1)
    model_dir = checkpoint(tmp_path, seed=5, **overrides)
    ours, _ = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=512)
    hf = hf_llama(ours.params, fp32_state_dict(model_dir))
    tokens = torch.randint(0, 512, (1, 400), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        hf_logits = hf(tokens).logits
        diff = (ours(tokens, 0) - hf_logits).abs().max().item()
    print(f"RoPE factor 32: max |ours - transformers| over 400 positions = {diff:.2e}")
    assert diff <= 1e-4
    # ... and the test can tell the factors apart: factor 8 is off by far more than float error.
    ours8, _ = llama_models.load(checkpoint(tmp_path / "f8", seed=5, **dict(overrides, rope_scaling_factor=8.0)),
                                 device="cpu", dtype=torch.float32, max_seq_len=512)
    with torch.inference_mode():
        assert (ours8(tokens, 0) - hf_logits).abs().max().item() > 20 * max(diff, 1e-6)


def test_forward_keeps_autograd(tmp_path):
    # People probe gradients (saliency, attribution): forward must not force inference_mode.
    # Unpacked, the weights get gradients; packed (the CPU default), the inputs still do, and
    # the same ones.
    model_dir = checkpoint(tmp_path)
    embedding_grads = []
    for pack in (False, True):
        model, _ = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=32, pack=pack)
        logits = model(torch.tensor([[1, 2, 3]]), 0)
        logits[0, -1].max().backward()
        embedding_grads.append(model.tok_embeddings.weight.grad)
        if not pack:
            grad = model.layers[0].attention.wq.weight.grad
            assert grad is not None and grad.abs().sum() > 0
    assert embedding_grads[0].abs().sum() > 0
    torch.testing.assert_close(embedding_grads[1], embedding_grads[0], rtol=1e-4, atol=1e-6)


def test_bfloat16_close_to_float32(tmp_path):
    model_dir = checkpoint(tmp_path)
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(4))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = llama_models.load(model_dir, device="cpu", dtype=dtype, max_seq_len=32)
        assert model.layers[0].attention.cache_k.dtype == dtype
        with torch.inference_mode():
            logits[dtype] = model(tokens, 0)
    assert logits[torch.bfloat16].dtype == torch.float32
    assert (logits[torch.float32] - logits[torch.bfloat16]).abs().max() < 0.05


def test_sequence_and_batch_limits_are_clear_errors(tmp_path):
    model, _ = llama_models.load(checkpoint(tmp_path), device="cpu", max_seq_len=8, max_batch_size=1)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="max_batch_size=1"):
        model(torch.zeros(2, 1, dtype=torch.long), 0)
