"""What the scripts print about a run: the model's size and memory, and how fast each phase went."""

import sys
import time

import torch

from .packed import PackedLinear
from .quantize import QUANTIZED_LINEARS

try:
    import resource  # peak memory of this process; Unix only
except ImportError:  # Windows
    resource = None


def model_summary(model) -> str:
    """Two lines: the model's shape and dtype, then the bytes of its weights and KV cache."""
    args = model.params
    # Weights: the parameters (counted once per storage: a tied output layer shares its tensor
    # with the embedding), plus the layers that hold their weights in other forms: int8 and int4
    # buffers, oneDNN-packed tensors. Parameters are counted as the checkpoint defines them; a
    # replaced layer made from a tensor that is still a parameter (a tied output head: the
    # embedding stays plain for its lookups) is a copy, counted under memory only.
    layers = [m for m in model.modules() if isinstance(m, (PackedLinear, *QUANTIZED_LINEARS.values()))]
    params = {t.data_ptr(): t for t in model.parameters()}
    copies = [m for m in layers if m.tied]
    n_params = (sum(t.numel() for t in params.values() if t.dim() == 2)
                + sum(m.in_features * m.out_features for m in layers if m not in copies))

    def nbytes(layers):  # a quantized layer's tensors are buffers; a packed layer's one tensor is an attribute
        tensors = {id(t): t for m in layers for t in ([*m.buffers()] or [m.weight])}  # stacked layers share theirs
        return sum(t.numel() * t.element_size() for t in tensors.values())

    weight_bytes = sum(t.numel() * t.element_size() for t in params.values()) + nbytes(layers)
    copy_note = f", of which {nbytes(copies) / 2**20:.1f} MiB the output head's copy of the tied embedding" if copies else ""
    cache_bytes = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "cache" in name)
    dtype = str(model.dtype).removeprefix("torch.")
    kinds = {type(m) for m in layers}
    for name, layer in QUANTIZED_LINEARS.items():
        if layer in kinds:
            dtype += f", {name} linear weights"
    if PackedLinear in kinds:
        dtype += ", linear weights packed for oneDNN"
    padding = args.vocab_size - model.vocab_in_use
    vocab = f"{args.vocab_size}" + (f" ({padding} ids beyond the tokenizer's {model.vocab_in_use}: never chosen)"
                                    if padding else "")
    return (f"model: {n_params / 1e6:.1f}M parameters, {args.n_layers} layers, dim {args.dim}, "
            f"{args.n_heads} heads / {args.n_kv_heads} kv heads of {args.head_dim}, vocab {vocab}, "
            f"{dtype}\n"
            f"memory: weights {weight_bytes / 2**20:.1f} MiB{copy_note} + KV cache {cache_bytes / 2**20:.1f} MiB "
            f"({args.max_batch_size} x {args.max_seq_len} positions)")


class Stats:
    """Times the phases of a run: prefill = up to the first new token; decode = after it (with
    --compile, after the first decode step, which compiles and is reported apart)."""

    def __init__(self, load_s: float, n_prompt: int, rows: int = 1, compiled: bool = False):
        self.load_s, self.n_prompt, self.rows, self.compiled = load_s, n_prompt, rows, compiled
        self.start = time.perf_counter()
        self.times = []  # when each new token (beam search: each step) was ready
        self.passes = self.proposed = self.kept = 0  # speculative decoding: verification passes, guesses

    def step(self):
        """A new token (beam search: a step) is ready."""
        self.times.append(time.perf_counter())

    def verified(self, proposed: int, kept: int):
        """Speculative decoding: one verification pass checked `proposed` guesses and kept `kept`."""
        self.passes, self.proposed, self.kept = self.passes + 1, self.proposed + proposed, self.kept + kept

    def report(self, device: torch.device) -> str:
        lines = [f"load: {self.load_s:.2f} s", f"prompt: {self.n_prompt} tokens"]
        if self.times:
            prefill = self.times[0] - self.start
            lines.append(f"prefill: {self.n_prompt / prefill:.1f} tok/s ({prefill:.3f} s, incl. the first new token)")
        if self.compiled and len(self.times) > 1:
            lines.append(f"compile: {self.times[1] - self.times[0]:.1f} s (the first decode step: compiling, or loading "
                         f"what an earlier run compiled)")
        decode_times = self.times[1:] if self.compiled else self.times
        if len(decode_times) > 1:
            decode, steps = decode_times[-1] - decode_times[0], len(decode_times) - 1
            per_row = f" = {steps} steps x {self.rows} beams" if self.rows > 1 else ""
            lines.append(f"decode: {steps * self.rows / decode:.1f} tok/s"
                         f" ({steps * self.rows} tokens{per_row} in {decode:.3f} s, after the first"
                         f"{' two' if self.compiled else ''})")
        if self.passes:
            # Every token after the first came from a verification pass: the tokens each pass
            # yields are what one read of the weights buys (plain decoding: exactly 1).
            rate = f" ({self.kept / self.proposed:.0%})" if self.proposed else ""
            lines.append(f"speculative: {self.kept} of {self.proposed} proposed tokens accepted{rate}, "
                         f"{(len(self.times) - 1) / self.passes:.2f} tokens per model pass "
                         f"({len(self.times) - 1} tokens in {self.passes} passes, after the first)")
        if device.type == "cpu":
            lines.append(f"threads: {torch.get_num_threads()}")
        lines.append(f"peak memory: {peak_memory(device)}")
        return "\n".join(lines)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated on {device}"
    if resource is None:
        return "not measured on this OS"
    # The process's peak resident set: weights read so far, cache, activations, Python, torch.
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{rss / 2**20:.0f} MiB resident (process peak)"
