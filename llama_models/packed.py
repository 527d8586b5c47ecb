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

import platform

import torch
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
    1-process model. The packed weight is opaque; `layer.weight.to_dense()` gives back W."""

    @torch.no_grad()
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # The second argument is the number of rows the layout is tuned for: one, a decode step.
        # A plain attribute, not a Parameter or buffer: model.to() must not try to convert it.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), 1)  # a packed copy

    def forward(self, x):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            return packed_linear(x, self.weight, self.out_features)  # traceable, differentiable
        # Plain inference calls the kernel directly: a custom op adds a fixed cost to every call
        # in eager mode, paid once per linear layer, 211 times in a SmolLM2 decode step
        # (measured: docs/benchmarks.md#calling-the-packed-kernel-directly).
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # model.state_dict() still gives the checkpoint's tensors, unpacked (a copy).
        destination[prefix + "weight"] = self.weight.to_dense()

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


def pack_linears(model: nn.Module, dtype: torch.dtype, release=lambda weight: None) -> None:
    """Replace every linear layer of `model` by a PackedLinear in `dtype`, in place (one process)."""
    replace_linears(model, lambda weight: PackedLinear(weight, dtype), release)
