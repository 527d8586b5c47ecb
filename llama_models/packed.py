"""CPU linear layers whose weights are reordered once, at load time, into oneDNN's own layout.

Decoding multiplies one activation vector by every weight matrix, so a CPU decode step is bound
by how fast the weights stream from memory. F.linear hands oneDNN (PyTorch's CPU matmul library)
a plain row-major matrix and lets it work from that on every call. Reordering ("prepacking") each
weight once into the blocked layout its kernels read best is what torch.compile's freezing does
behind the scenes; here it is done in the open, with no compiler. The packed weights stream
from memory faster than F.linear's, in bf16 and in float32 (measured:
docs/benchmarks.md#bf16-and-packed-weights). The results are those of F.linear up to float
rounding (bitwise the same in the bf16 checks we ran).
"""

import itertools
import platform

import torch
from fairscale.nn.model_parallel.layers import ColumnParallelLinear
from torch import nn

from .model import replace_linears


@torch.library.custom_op("llama_models::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """x @ W.T for a weight packed by PackedLinear. A custom op so that torch.compile can call it
    as it is: the compiler can neither look inside a packed tensor nor needs to."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@packed_linear.register_fake
def _(x, weight, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def _backward(ctx, grad_out):
    # Gradients flow to the input (saliency, attribution), not to the packed weight: load the
    # model with pack=False to take gradients with respect to the weights.
    return grad_out @ ctx.weight.to_dense().to(grad_out.dtype), None, None


def _save_weight(ctx, inputs, output):
    ctx.weight = inputs[1]


packed_linear.register_autograd(_backward, setup_context=_save_weight)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Packing is used on x86 CPUs with oneDNN (the only ones it was measured on), in float32, or in
    bf16 where oneDNN supports it (AVX512 and newer). Elsewhere (Apple and other ARM CPUs among
    them) the model keeps its plain linear layers."""
    if device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x @ W.T with W held in oneDNN's blocked layout, standing in for a linear layer of a
    1-process model. Layers that read the same input (wq, wk and wv; w1 and w3) share one packed
    matrix, their weights stacked in it (pack_linears): `rows` are this layer's rows of it, and
    model.project() computes the product once for all of them. The packed weight is opaque;
    `layer.weight.to_dense()[layer.rows]` gives back W."""

    def __init__(self, packed: torch.Tensor, rows: slice, in_features: int):
        super().__init__()
        # A plain attribute, not a Parameter or buffer: model.to() must not try to convert it.
        self.weight = packed  # (all the stacked layers' rows, in_features), in oneDNN's layout
        self.rows = rows
        self.product_features = packed.shape[0]
        self.out_features, self.in_features = rows.stop - rows.start, in_features
        self.tied = False  # replace_linears says whether a lone layer copies a tied tensor

    @staticmethod
    @torch.no_grad()
    def stack(weights: list, dtype: torch.dtype) -> list["PackedLinear"]:
        """One PackedLinear for each of `weights` (out_i, in), all sharing one packed copy of them
        stacked in `dtype`."""
        stacked = torch.cat([w.to(dtype) for w in weights]) if len(weights) > 1 else weights[0].to(dtype)
        # The second argument is the number of rows the layout is tuned for: one, a decode step.
        packed = torch.ops.mkldnn._reorder_linear_weight(stacked, 1)  # a packed copy
        ends = itertools.accumulate(w.shape[0] for w in weights)
        return [PackedLinear(packed, slice(end - w.shape[0], end), w.shape[1]) for w, end in zip(weights, ends)]

    def forward(self, x):
        out = self.product(x)
        # A layer packed alone owns the whole product: no slice, a view made on every call for nothing.
        return out if self.out_features == self.product_features else out[..., self.rows]

    def product(self, x):
        """x @ (the whole packed matrix).T: the outputs of every layer stacked in it."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            return packed_linear(x, self.weight, self.product_features)  # traceable, differentiable
        # Plain inference calls the kernel directly: a custom op adds a fixed cost to every call
        # in eager mode (measured: docs/benchmarks.md#calling-the-packed-kernel-directly).
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # model.state_dict() still gives the checkpoint's tensors, unpacked (a copy).
        destination[prefix + "weight"] = self.weight.to_dense()[self.rows].clone()

    def extra_repr(self):
        stacked = f", rows {self.rows.start}:{self.rows.stop} of {self.product_features} stacked" \
            if self.out_features < self.product_features else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}{stacked}"


# The layers that model.py's Attention and FeedForward read one input through (model.project).
SAME_INPUT = (("wq", "wk", "wv"), ("w1", "w3"))


def pack_linears(model: nn.Module, dtype: torch.dtype, release=lambda weight: None) -> None:
    """Replace every linear layer of `model` by a PackedLinear in `dtype`, in place (one process);
    the layers of each SAME_INPUT group share one matrix."""
    for module in list(model.modules()):
        for names in SAME_INPUT:
            if all(isinstance(getattr(module, name, None), ColumnParallelLinear) for name in names):
                weights = [getattr(module, name).weight for name in names]
                for name, layer in zip(names, PackedLinear.stack(weights, dtype)):
                    setattr(module, name, layer)
                for weight in weights:
                    release(weight)
    # The others (wo, w2, the output head) one by one.
    replace_linears(model, lambda weight: PackedLinear.stack([weight], dtype)[0], release)
