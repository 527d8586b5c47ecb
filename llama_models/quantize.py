"""Weight-only int8 quantization: each weight stored in 1 byte instead of bf16's 2.

Decoding one token reads every weight once, so on a CPU it is limited by memory bandwidth:
half the bytes is up to twice the tokens per second, and half the memory (an 8B model in ~8 GB).
Activations stay in the model's dtype; only the weights are rounded.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .model import replace_linears


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * per-row scale).T, standing in for a linear layer of a 1-process model.

    Per-channel scales: each output row gets its own scale, max|row| / 127, so one large row
    does not crush the precision of the others.
    """

    @torch.no_grad()  # the weight is a Parameter: without this, autograd would record every block
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", torch.empty(weight.shape, dtype=torch.int8))  # (out, in)
        self.register_buffer("scales", torch.empty(weight.shape[0], dtype=dtype))  # (out,)
        # A block of rows at a time: float32 temporaries the size of a whole matrix would be
        # freed into the C heap, which does not give them back to the OS, and memory would grow
        # layer after layer.
        for start in range(0, weight.shape[0], 256):
            rows = slice(start, start + 256)
            w = weight[rows].float()  # (256, in)
            scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (256,)
            self.weight[rows] = torch.round(w / scales[:, None]).to(torch.int8)
            self.scales[rows] = scales.to(dtype)

    def forward(self, x):
        if x.device.type == "cuda":  # no fused kernel there: dequantize, then a normal matmul
            return F.linear(x, self.weight.to(x.dtype)) * self.scales
        # CPU and MPS: a kernel that reads the int8 weights directly (dequantizing on the fly).
        out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
        return out.view(*x.shape[:-1], -1)


def quantize_int8(model: nn.Module, dtype: torch.dtype, release=lambda weight: None) -> None:
    """Replace every linear layer of `model` by an Int8Linear, in place (one process only).

    The token embedding stays in `dtype`: a lookup reads only one row per token.
    """
    replace_linears(model, lambda weight: Int8Linear(weight, dtype), release)
