"""Model hyper-parameters, read from a checkpoint's params.json."""

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelArgs:
    # --- keys found in Meta's params.json (Llama 3, 3.1, 3.2) ---
    dim: int  # width of the residual stream
    n_layers: int  # number of transformer blocks
    n_heads: int  # query heads per attention layer
    vocab_size: int  # rows of tok_embeddings and of output
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); None means n_heads
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # scales the SwiGLU hidden size before rounding
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 500000.0  # RoPE base frequency
    use_scaled_rope: bool = False  # Llama 3.1+ long-context frequency scaling
    # Llama 3.1 uses 8; Llama 3.2 1B/3B use 32, which Meta's reference code does not know
    # (it hard-codes 8). None: derived from the shape in __post_init__.
    rope_scaling_factor: Optional[float] = None

    # --- runtime sizes, chosen by the caller, not by the checkpoint ---
    max_seq_len: int = 2048  # longest prompt + generation; sizes the KV cache and RoPE table
    max_batch_size: int = 1  # rows of the KV cache (beam search needs one per beam)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.rope_scaling_factor is None:
            self.rope_scaling_factor = 32.0 if self._is_llama32_small() else 8.0
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                     "max_seq_len", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "rope_scaling_factor", "ffn_dim_multiplier"):
            value = getattr(self, name)
            if value is None and name == "ffn_dim_multiplier":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"use_scaled_rope must be true or false, got {self.use_scaled_rope!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (dim / n_heads = {self.head_dim}) must be even for RoPE")

    def _is_llama32_small(self) -> bool:
        # Llama 3.2 1B and 3B: the only Llama 3 shapes whose RoPE scale factor is 32.
        return self.vocab_size == 128256 and (self.dim, self.n_layers) in ((2048, 16), (3072, 28))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Meta's recipe: start from 4*dim, take 2/3 of it (SwiGLU has three matrices instead of
        # two, so this keeps the parameter count of a plain 4*dim MLP), scale, round up.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def process_counts(self) -> list[int]:
        """The numbers of processes the model splits over (torchrun --nproc_per_node): each takes
        the same number of query heads, and n_kv_heads divides among them or each keeps a copy
        of one kv head."""
        return [n for n in range(1, self.n_heads + 1)
                if self.n_heads % n == 0 and (self.n_kv_heads % n == 0 or n % self.n_kv_heads == 0)]

    @classmethod
    def from_params(cls, params: dict, source: str = "params.json", **runtime) -> "ModelArgs":
        """Build ModelArgs from a params.json dict plus runtime sizes (max_seq_len, max_batch_size).

        Unknown keys are reported with a warning naming them; a missing or invalid value raises
        ValueError naming `source` and the key.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        for key in params:
            if key not in known:
                warnings.warn(f"{source}: unknown key {key!r} ignored", stacklevel=2)
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        for key in required:
            if key not in params:
                raise ValueError(f"{source}: missing required key {key!r}")
        try:
            return cls(**{k: v for k, v in params.items() if k in known}, **runtime)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
