"""Weight-only quantization: each weight stored in 1 byte (int8) or half a byte (int4), not bf16's 2.

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
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", torch.empty(weight.shape, dtype=torch.int8))  # (out, in)
        self.register_buffer("scales", torch.empty(weight.shape[0], dtype=dtype))  # (out,)
        # A block of rows at a time: float32 temporaries the size of a whole matrix would be
        # freed into the C heap, which does not give them back to the OS, and memory would grow
        # layer after layer.
        for start in range(0, weight.shape[0], 256):
            block = slice(start, start + 256)
            w = weight[block].float()  # (256, in)
            scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (256,)
            self.weight[block] = torch.round(w / scales[:, None]).to(torch.int8)
            self.scales[block] = scales.to(dtype)

    MANY_ROWS = 16  # from here on, on the CPU, the float matmul wins (measured: docs/benchmarks.md#int8-prompts)
    CHUNK = 1024  # output rows dequantized at a time: scratch memory of CHUNK x in_features

    def forward(self, x):
        if x.device.type == "cuda":  # no fused kernel there: dequantize, then a normal matmul
            return F.linear(x, self.weight.to(x.dtype) * self.scales[:, None])
        rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
        if rows.shape[0] < self.MANY_ROWS or x.device.type != "cpu":
            # Decoding, and MPS: a kernel that reads the int8 weights directly, dequantizing on
            # the fly. On the CPU it is made for a few rows: a prompt's many rows go faster
            # through the float matmul below.
            out = torch._weight_int8pack_mm(rows, self.weight, self.scales)
        else:
            # A prompt on the CPU: dequantize CHUNK output rows at a time into a float matmul.
            # Scaled before the matmul, not after it: x @ W_int8.T sums products of up to 127 x
            # |x| and overflows float16 (65504) on real activations. One rounding more than the
            # kernel (each weight * scale is rounded to x's dtype).
            out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
            for start in range(0, self.out_features, self.CHUNK):
                chunk = slice(start, start + self.CHUNK)
                weight = self.weight[chunk].to(x.dtype) * self.scales[chunk, None]  # (CHUNK, in)
                torch.mm(rows, weight.T, out=out[:, chunk])
        return out.view(*x.shape[:-1], -1)


class Int4Linear(nn.Module):
    """y = x @ W.T with W in 4 bits, for a 1-process model on the CPU: a quarter of bf16's bytes.

    Each group of 32 consecutive weights of a row gets its own scale and minimum (asymmetric, the
    information llama.cpp's Q4_1 keeps: 20 bytes per 32 weights with bf16 scales), so the 16
    levels span just that group's range. The values are packed two per byte into the layout of
    PyTorch's CPU int4 kernel.
    """

    GROUP = 32

    @torch.no_grad()
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = n_out, n_in = weight.shape
        if n_in % self.GROUP or n_out % 16:
            raise ValueError(f"int4 needs a weight's columns in groups of {self.GROUP} and rows in multiples of 16, "
                             f"not {tuple(weight.shape)}")
        self.register_buffer("weight", torch.empty(n_out, n_in // 2, dtype=torch.uint8))  # (out, in/2)
        # The kernel's layout: (in/32, out, 2), [..., 0] the scale, [..., 1] the value of level 8,
        # so that a weight is (level - 8) * scale + zero.
        self.register_buffer("scales_and_zeros", torch.empty(n_in // self.GROUP, n_out, 2, dtype=dtype))
        for start in range(0, n_out, 256):  # a block of rows at a time, as in Int8Linear
            block = slice(start, start + 256)
            w = weight[block].float().unflatten(1, (-1, self.GROUP))  # (256, in/32, 32)
            low, high = w.amin(dim=2), w.amax(dim=2)  # (256, in/32)
            # Rounded to dtype first, so the levels are chosen against the scales the kernel uses.
            scale = ((high - low).clamp(min=1e-6) / 15).to(dtype).float()
            zero = (low + 8 * scale).to(dtype).float()
            levels = torch.round((w - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp(0, 15)
            self.weight[block] = torch._convert_weight_to_int4pack_for_cpu(levels.flatten(1).int(), 2)
            self.scales_and_zeros[:, block] = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(dtype)

    def forward(self, x):
        out = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), self.weight, self.GROUP,
                                                self.scales_and_zeros)
        return out.view(*x.shape[:-1], -1)


QUANTIZED_LINEARS = {"int8": Int8Linear, "int4": Int4Linear}


def quantize_linears(model: nn.Module, kind: str, dtype: torch.dtype, release=lambda weight: None) -> None:
    """Replace every linear layer of `model` by an Int8Linear ("int8") or Int4Linear ("int4"), in
    place (one process only). The token embedding stays in `dtype`: a lookup reads one row."""
    layer = QUANTIZED_LINEARS[kind]
    replace_linears(model, lambda weight: layer(weight, dtype), release)
