"""Would int8 *activations* make --quantize int8 faster on x86, at llama.cpp's Q8_0 quality?

    python benchmarks/int8_activations.py benchmarks/work/SmolLM2-135M-Instruct --out benchmarks/RESULTS-int8-activations.md

Our int8 layer (llama_models.quantize.Int8Linear) is weight-only: `torch._weight_int8pack_mm`
turns every int8 weight into a float before multiplying. llama.cpp's Q8_0 rounds the activation
vector to 8 bits too, per block of 32 values, and multiplies integers (VNNI). The fastest
int8 x int8 kernel stock PyTorch has on x86 is FBGEMM's dynamically quantized linear
(`torch.ops.quantized.linear_dynamic`), which rounds the activations with one scale per call.
Per-row scales (each row divided by its own largest value first, multiplied back after) are the
finest it allows: there is no per-block variant, and `torch._int_mm` is per row as well.

This measures both sides of the trade on this CPU:
1. speed: one activation row (decoding) and 4 rows (beams) through int8 matrices of the
   Llama-3.2-1B shapes, in billions of weights per second (GB/s of int8 weights);
2. quality on SmolLM2, as benchmarks/quality.py measures it (mean KL divergence from our fp32
   logits over Python's documentation): the weight-only layer everywhere, per-row int8
   activations everywhere, and per-row int8 activations in one kind of layer at a time.
"""

import argparse
import datetime
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama_models  # noqa: E402
import machine  # noqa: E402  (beside this script)
import quality  # noqa: E402
from llama_models.quantize import Int8Linear  # noqa: E402

SHAPES = {"wq/wo 2048x2048": (2048, 2048), "wk/wv 512x2048": (512, 2048), "w1/w3 8192x2048": (8192, 2048),
          "w2 2048x8192": (2048, 8192), "output 128256x2048": (128256, 2048)}
LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")  # every linear layer of the model


class RowInt8Linear(nn.Module):
    """Int8Linear's weights, multiplied by FBGEMM with int8 activations, one scale per row."""

    @torch.no_grad()
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        plain = Int8Linear(weight, torch.float32)  # the same rounding of the weights
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated in 2.13
            qweight = torch._make_per_channel_quantized_tensor(
                plain.weight, plain.scales.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        # Without VNNI, FBGEMM's 16-bit pair sums saturate on full 8-bit activations: use 7 bits.
        self.reduce_range = not torch.cpu._is_vnni_supported()

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1]).float()
        peak = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        out = torch.ops.quantized.linear_dynamic(rows / peak, self.packed, self.reduce_range) * peak
        return out.to(x.dtype).view(*x.shape[:-1], -1)


def seconds_per_call(f, calls=200) -> float:
    for _ in range(10):
        f()
    best = float("inf")
    for _ in range(5):  # the best of 5 rounds: the least disturbed by the machine's other work
        start = time.perf_counter()
        for _ in range(calls // 5):
            f()
        best = min(best, (time.perf_counter() - start) / (calls // 5))
    return best


def speed_table() -> list[str]:
    lines = ["| matrix | rows | weight-only (`_weight_int8pack_mm`) | int8 activations (FBGEMM) | ratio |",
             "|---|---|---|---|---|"]
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k) * 0.02
        plain, rows_int8 = Int8Linear(weight, torch.bfloat16), RowInt8Linear(weight, torch.bfloat16)
        for m in (1, 4):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            a, b = (n * k / 1e9 / seconds_per_call(lambda: layer(x)) for layer in (plain, rows_int8))
            lines.append(f"| {name} | {m} | {a:.1f} GB/s | {b:.1f} GB/s | {b / a:.2f}x |")
    return lines


def quality_table(model_dir: Path, n_tokens: int, ctx: int) -> list[str]:
    tokenizer = llama_models.Tokenizer(model_dir / "tokenizer.model")
    tokens = quality.text_tokens(tokenizer, n_tokens)
    windows = quality.windows(tokens, tokenizer.bos_id, ctx)
    half = ctx // 2

    def log_probs(model):
        with torch.inference_mode():
            return [F.log_softmax(model(torch.tensor([w]), 0)[0], dim=-1)[half:-1] for w in windows]

    reference = log_probs(llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=ctx)[0])
    lines = ["| int8 activations in | mean KL vs ours fp32 (nats) | top-1 agreement |", "|---|---|---|"]
    for kinds in [(), ("wq", "wk", "wv"), ("wo",), ("w1", "w3"), ("w2",), ("output",), LINEARS]:
        model, _ = llama_models.load(model_dir, device="cpu", dtype=torch.bfloat16, max_seq_len=ctx, pack=False)
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if name in LINEARS:
                    layer = RowInt8Linear if name in kinds else Int8Linear
                    setattr(module, name, layer(child.weight, torch.bfloat16))
        kl = top1 = scored = 0
        for ref, logp in zip(reference, log_probs(model)):
            window_kl, window_top1 = quality.kl_and_top1(ref, logp)
            kl, top1 = kl + window_kl, top1 + window_top1
            scored += len(ref)
        label = ", ".join(kinds) if kinds else "none (weight-only, as `--quantize int8` runs)"
        lines.append(f"| {label} | {kl / scored:.5f} | {100 * top1 / scored:.2f}% |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="SmolLM2 in Meta's format (make bench makes it)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        sys.exit("error: FBGEMM (x86 only) is not in this PyTorch build")
    lines = ["## int8 activations (FBGEMM, per row) against weight-only int8", "",
             f"{datetime.date.today()}, {machine.describe()}, torch {torch.__version__}. Command: `python "
             f"benchmarks/int8_activations.py {opts.model_dir} --tokens {opts.tokens}`", "",
             "Speed: billions of int8 weights per second, best of 5 rounds (the big output matrix does not "
             "fit in cache; the others do).", "", *speed_table(), "",
             f"Quality on {opts.model_dir.name}, {opts.tokens} tokens of Python's documentation, windows of "
             f"{opts.ctx} (llama.cpp's Q8_0 on the same weights: see RESULTS-quality.md).", "",
             *quality_table(opts.model_dir, opts.tokens, opts.ctx)]
    machine.publish(lines, opts.out)


if __name__ == "__main__":
    main()
