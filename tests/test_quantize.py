"""int8 weight-only quantization: the kernel against plain float math, the model against bf16."""

import torch

import llama_models
from helpers import checkpoint, load_peak_growth, memory_test_checkpoint
from llama_models.quantize import Int8Linear


def test_int8_linear_is_per_row_rounding():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 96)[:, None]
    layer = Int8Linear(w, torch.float32)
    scales = w.abs().amax(dim=1) / 127  # one scale per output row
    assert torch.allclose(layer.scales, scales)
    dequantized = layer.weight.float() * layer.scales[:, None]
    assert ((dequantized - w).abs() <= scales[:, None] / 2 + 1e-7).all()  # within half a step
    x = torch.randn(3, 5, 64)
    assert torch.allclose(layer(x), x @ dequantized.T, atol=1e-4, rtol=1e-5)


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


def test_int8_greedy_agrees_with_bf16_on_the_real_model(smollm2_dir):
    n = 64
    runs = {}
    for quantize in (None, "int8"):
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
    agree = sum(a == b for a, b in zip(runs[None], runs["int8"])) / n
    reference = runs[(None, "first")]
    diff = (reference - runs[("int8", "first")]).abs().max().item()
    spread = (reference.max() - reference.min()).item()
    print(f"int8 vs bf16 on SmolLM2: greedy agreement {agree:.0%} over {n} tokens, "
          f"first-step max logit diff {diff:.2f} (logits span {spread:.1f})")
    assert agree >= 0.9
    assert diff < 0.05 * spread


def test_int8_load_peak_memory_is_about_half(tmp_path):
    # Quantizing straight from the mmapped bf16 file, releasing each weight's pages when done:
    # the bf16 model is never in memory as a whole.
    model_dir = memory_test_checkpoint(tmp_path)
    size = (model_dir / "consolidated.00.pth").stat().st_size
    growth, _ = load_peak_growth(model_dir, tmp_path, quantize="int8")
    print(f"int8 peak RSS growth {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB bf16 checkpoint")
    assert growth <= 0.6 * size
