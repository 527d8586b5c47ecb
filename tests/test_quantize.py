"""int8 weight-only quantization: the kernel against plain float math, the model against bf16."""

import pytest
import torch

import llama_models
from helpers import checkpoint, load_peak_growth, memory_test_checkpoint
from llama_models.quantize import Int4Linear, Int8Linear


# Fewer than Int8Linear.MANY_ROWS rows (decoding) go through the int8 kernel, more (a prompt)
# through the float matmul, Int8Linear.CHUNK output rows at a time: 2100 rows make 3 chunks.
@pytest.mark.parametrize("x_shape", [(1, 1, 64), (3, 5, 64), (2, 40, 64)])
def test_int8_linear_is_per_row_rounding(x_shape):
    w = torch.randn(2100, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 2100)[:, None]
    layer = Int8Linear(w, torch.float32)
    scales = w.abs().amax(dim=1) / 127  # one scale per output row
    assert torch.allclose(layer.scales, scales)
    dequantized = layer.weight.float() * layer.scales[:, None]
    assert ((dequantized - w).abs() <= scales[:, None] / 2 + 1e-7).all()  # within half a step
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ dequantized.T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 20])  # the int8 kernel, and the chunked float path of a prompt
def test_int8_linear_output_within_range_does_not_overflow(dtype, rows):
    # Weights at their row's maximum quantize to 127: x @ W_int8.T alone would be 127 * 1024 =
    # 130048 here, past float16's 65504, while the true output is 10.24.
    layer = Int8Linear(torch.full((32, 1024), 0.01), dtype)
    out = layer(torch.ones(rows, 1024, dtype=dtype))
    torch.testing.assert_close(out.float(), torch.full((rows, 32), 10.24), rtol=1e-2, atol=0)


def test_int4_linear_is_per_group_rounding():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=generator) * torch.logspace(-2, 1, 96)[:, None] + 0.3
    layer = Int4Linear(w, torch.float32)
    # The oracle: each group of 32 weights of a row spans its own [min, max] in 16 levels.
    groups = w.unflatten(1, (4, 32))  # (96, 4, 32)
    low, high = groups.amin(dim=2, keepdim=True), groups.amax(dim=2, keepdim=True)
    step = (high - low) / 15
    scale, zero = layer.scales_and_zeros.transpose(0, 1).unbind(-1)  # (96, 4) each
    torch.testing.assert_close(scale, step[..., 0])
    torch.testing.assert_close(zero, (low + 8 * step)[..., 0])
    dequantized = (torch.round((groups - low) / step) * step + low).flatten(1)
    assert ((dequantized - w).abs() <= step.repeat_interleave(32, dim=1).flatten(1) / 2 + 1e-6).all()
    x = torch.randn(3, 5, 128, generator=generator)
    torch.testing.assert_close(layer(x), x @ dequantized.T, atol=1e-4, rtol=1e-4)
    assert layer.weight.numel() == w.numel() // 2  # two weights a byte


def test_int8_model_logits_close_to_bf16(tmp_path):
    model_dir = checkpoint(tmp_path, seed=1)
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    bf16, _ = llama_models.load(model_dir, device="cpu", dtype=torch.bfloat16, max_seq_len=32)
    int8, _ = llama_models.load(model_dir, device="cpu", dtype=torch.bfloat16, max_seq_len=32, quantize="int8")
    assert isinstance(int8.layers[0].feed_forward.w2, Int8Linear) and isinstance(int8.output, Int8Linear)
    with torch.inference_mode():
        a, b = bf16(tokens, 0), int8(tokens, 0)
    # Random weights give logits of about +-0.5; int8 rounding moves them by ~1% of that.
    assert (a - b).abs().max() < 0.02 * a.abs().max()


# int4 keeps 16 levels per group of 32 weights: about 2.5x int8's logit error, measured here.
@pytest.mark.parametrize("quantize, agreement, logit_error", [("int8", 0.9, 0.05), ("int4", 0.8, 0.1)])
def test_quantized_greedy_agrees_with_bf16_on_the_real_model(smollm2_dir, quantize, agreement, logit_error):
    n = 64
    runs = {}
    for quantize in (None, quantize):
        model, tokenizer = llama_models.load(smollm2_dir, device="cpu", max_seq_len=160, quantize=quantize)
        tokens = llama_models.ChatFormat(tokenizer).encode_dialog_prompt(
            [{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
        prompt_len, out = len(tokens), []
        with torch.inference_mode():
            logits = model(torch.tensor([tokens]), 0)
            first = logits[0, -1]
            for _ in range(n):  # teacher-forced: both see the bf16 run's tokens after divergence
                out.append(int(logits[0, -1].argmax()))
                tokens.append(runs[None][len(out) - 1] if runs else out[-1])
                logits = model(torch.tensor([[tokens[-1]]]), len(tokens) - 1)
        runs[quantize], runs[(quantize, "first")] = out, first
    agree = sum(a == b for a, b in zip(runs[None], runs[quantize])) / n
    reference = runs[(None, "first")]
    diff = (reference - runs[(quantize, "first")]).abs().max().item()
    spread = (reference.max() - reference.min()).item()
    print(f"{quantize} vs bf16 on SmolLM2: greedy agreement {agree:.0%} over {n} tokens, "
          f"first-step max logit diff {diff:.2f} (logits span {spread:.1f})")
    assert agree >= agreement
    assert diff < logit_error * spread


def test_int8_load_peak_memory_is_about_half(tmp_path):
    # Quantizing straight from the mmapped bf16 file, releasing each weight's pages when done:
    # the bf16 model is never in memory as a whole.
    model_dir = memory_test_checkpoint(tmp_path)
    size = (model_dir / "consolidated.00.pth").stat().st_size
    growth, _ = load_peak_growth(model_dir, tmp_path, quantize="int8")
    print(f"int8 peak RSS growth {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB bf16 checkpoint")
    assert growth <= 0.6 * size


def test_quantize_errors_are_clear(tmp_path):
    model_dir = checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"unknown quantization 'int3' \(supported: int8, int4\)"):
        llama_models.load(model_dir, device="cpu", quantize="int3")
    with pytest.raises(ValueError, match=r"quantize='int4' needs the whole model in memory: raise max_memory"):
        llama_models.load(model_dir, device="cpu", quantize="int4", max_memory="1MB")
    # A budget that holds the whole model changes nothing: int4 runs, in memory.
    model, _ = llama_models.load(model_dir, device="cpu", quantize="int4", max_memory="64GB")
    assert model.block_streamer is None and isinstance(model.layers[0].attention.wq, Int4Linear)
    with pytest.raises(ValueError, match=r"int4 needs a weight's columns in groups of 32 and rows in multiples of 16"):
        Int4Linear(torch.zeros(16, 48), torch.bfloat16)
