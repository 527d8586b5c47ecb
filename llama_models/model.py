"""The Llama 3 Transformer, module for module the same tree as Meta's reference.

The module and parameter names are the keys of Meta's consolidated.*.pth files, so a checkpoint
loads with `load_state_dict(strict=True)` and no renaming. The linear layers are fairscale's
model-parallel ones: with one process they are plain linears; under torchrun each process holds
a slice of every matrix.

Shapes in comments: B batch, S new tokens in this call, P start_pos, D dim, H query heads,
K key/value heads, Hd head_dim, V vocab. "local" means this process's share under model
parallelism (all of it with one process).
"""

import math
from typing import Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

from .args import ModelArgs


def _keep(weight):
    # fairscale calls init_method on every new weight; the checkpoint overwrites them anyway.
    return weight


def replace_linears(model: nn.Module, make, release=lambda weight: None) -> None:
    """Swap every fairscale linear layer of a 1-process `model` for make(its weight), in place.

    How int8 quantization and CPU weight packing put their layers in. `release(old_weight)` is
    called after each swap so that the loader can let go of the file's pages right away: peak
    memory then stays near one copy of the model, never two.
    """
    if fs_init.get_model_parallel_world_size() > 1:
        raise ValueError("replacing linear layers works in one process only (not under torchrun)")
    linear = (ColumnParallelLinear, RowParallelLinear)
    # A tied output head (one checkpoint tensor for the embedding and the head, as in SmolLM2)
    # becomes a copy of its own, while the embedding stays plain for its lookups: memory, but not
    # another parameter. `layer.tied` says so to whoever counts them.
    others = {p.data_ptr() for m in model.modules() if not isinstance(m, linear) for p in m.parameters(recurse=False)}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, linear):
                layer = make(child.weight)
                layer.tied = child.weight.data_ptr() in others
                setattr(module, name, layer)
                release(child.weight)


def _plain_linear(weight: nn.Parameter) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = weight  # the same Parameter: no copy, and a tied head stays tied
    return layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (D,)

    def forward(self, x):
        # Normalise in float32 even for bf16 activations: the mean of squares loses too much
        # precision in 8 bits of mantissa. Then back to the activation dtype, then scale.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The rotation speed of each pair of dimensions in a head, in radians per position. (Hd/2,)"""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not args.use_scaled_rope:
        return freqs
    # Llama 3.1's long-context recipe: keep the fast-rotating (short-wavelength) pairs, slow down
    # the slow ones by `factor`, and blend smoothly in between. The constants are Meta's.
    factor, low_freq_factor, high_freq_factor, old_context_len = args.rope_scaling_factor, 1, 4, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_between, blended, scaled)


def rope_table(args: ModelArgs) -> torch.Tensor:
    """cos and sin of every position's rotation angles: (max_seq_len, Hd/2, 2), float32."""
    positions = torch.arange(args.max_seq_len, dtype=torch.float32)
    angles = torch.outer(positions, rope_frequencies(args))  # (max_seq_len, Hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its position's angle.

    x: (B, S, heads, Hd); rope: (S, Hd/2, 2). Meta's layout pairs *adjacent* dimensions (Hugging
    Face's pairs i with i + Hd/2, which is why HF conversions permute wq and wk). Meta does this
    with complex numbers; real arithmetic gives the same float32 result and also runs on MPS.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, heads, Hd/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos = rope[None, :, None, :, 0]  # (1, S, 1, Hd/2)
    sin = rope[None, :, None, :, 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world_size = fs_init.get_model_parallel_world_size()
        # Under model parallelism each process holds n_heads/world_size query heads and the kv
        # heads they use. With more processes than kv heads, each keeps its own copy of the one
        # kv head its query heads share (the loader replicates it): n_kv_heads acts as world_size.
        n_kv_heads = max(args.n_kv_heads, world_size)
        self.n_local_heads = args.n_heads // world_size
        self.n_local_kv_heads = n_kv_heads // world_size
        self.head_dim = args.head_dim

        self.wq = ColumnParallelLinear(args.dim, args.n_heads * args.head_dim, bias=False,
                                       gather_output=False, init_method=_keep)
        self.wk = ColumnParallelLinear(args.dim, n_kv_heads * args.head_dim, bias=False,
                                       gather_output=False, init_method=_keep)
        self.wv = ColumnParallelLinear(args.dim, n_kv_heads * args.head_dim, bias=False,
                                       gather_output=False, init_method=_keep)
        self.wo = RowParallelLinear(args.n_heads * args.head_dim, args.dim, bias=False,
                                    input_is_parallel=True, init_method=_keep)
        # The KV cache: keys and values of every position seen so far, so that each new token
        # attends to the past without recomputing it. Allocated once at full size
        # (Transformer.setup_cache), written in place. Not part of the checkpoint.
        cache_shape = (args.max_batch_size, args.max_seq_len, self.n_local_kv_heads, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(cache_shape), persistent=False)  # (B, max_seq_len, K, Hd)
        self.register_buffer("cache_v", torch.zeros(cache_shape), persistent=False)  # (B, max_seq_len, K, Hd)
        # A look inside (explore.py): when True, forward computes the attention probabilities
        # explicitly, keeps them in self.weights and uses them for its output. Off, it is one
        # attribute check per call: the fused kernel below never builds the (S, kv_len) matrix.
        self.record_weights = False
        self.weights = None  # (B, H, S, kv_len) float32, the last call's, while record_weights

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_len: int, rope: torch.Tensor, mask):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)  # (B, S, H, Hd)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (B, S, K, Hd)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (B, S, K, Hd)
        xq, xk = apply_rope(xq, rope), apply_rope(xk, rope)

        # Write this call's keys and values at their positions, then attend over the first
        # kv_len cache slots: the ones written so far (or, compiled, all of them; see forward).
        self.cache_k[:bsz].index_copy_(1, positions, xk)
        self.cache_v[:bsz].index_copy_(1, positions, xv)
        keys = self.cache_k[:bsz, :kv_len].transpose(1, 2)  # (B, K, kv_len, Hd)
        values = self.cache_v[:bsz, :kv_len].transpose(1, 2)  # (B, K, kv_len, Hd)

        if self.record_weights:
            out = self._attend_and_record(xq.transpose(1, 2), keys, values, mask)
        else:
            # Grouped-query attention: H/K query heads share each key/value head. enable_gqa does
            # the sharing inside the kernel instead of materialising repeated copies of the cache.
            out = F.scaled_dot_product_attention(
                xq.transpose(1, 2),  # (B, H, S, Hd)
                keys, values, attn_mask=mask, scale=1 / math.sqrt(self.head_dim),
                enable_gqa=self.n_local_heads != self.n_local_kv_heads,
            )  # (B, H, S, Hd)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (B, S, H*Hd)
        return self.wo(out)

    def _attend_and_record(self, xq, keys, values, mask):
        """What scaled_dot_product_attention computes, step by step, keeping the probabilities.

        xq: (B, H, S, Hd); keys, values: (B, K, kv_len, Hd); mask: (S, kv_len) bool or None.
        """
        group = self.n_local_heads // self.n_local_kv_heads
        keys = keys.repeat_interleave(group, dim=1)  # (B, H, kv_len, Hd): query head h reads kv head h // group
        values = values.repeat_interleave(group, dim=1)  # (B, H, kv_len, Hd)
        scores = xq @ keys.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, H, S, kv_len)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # a later position gets probability 0
        # The softmax in float32 even for bf16 activations, as transformers' eager attention does.
        self.weights = scores.float().softmax(dim=-1)  # (B, H, S, kv_len), each row sums to 1
        return self.weights.type_as(values) @ values  # (B, H, S, Hd)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)

    def forward(self, x):
        # SwiGLU: a SiLU-gated linear unit. w1 makes the gate, w3 the value, w2 projects back.
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, positions, kv_len: int, rope, mask):
        # Pre-norm residual block: normalise the input of each sub-layer, add its output back.
        h = x + self.attention(self.attention_norm(x), positions, kv_len, rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world_size = fs_init.get_model_parallel_world_size()
        if world_size not in args.process_counts():
            raise ValueError(f"cannot split {args.n_heads} heads and {args.n_kv_heads} kv heads over {world_size} "
                             f"processes: n_heads must be divisible by the number of processes, and n_kv_heads "
                             f"a multiple or a divisor of it; this model runs on "
                             f"{', '.join(map(str, args.process_counts()))} processes")
        self.params = args
        self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False, init_method=_keep)
        # A plain attribute, not a buffer, so that model.to(bfloat16) cannot round the angles:
        # positions in the thousands need float32. forward() moves it to the tokens' device.
        self.rope = rope_table(args)  # (max_seq_len, Hd/2, 2)
        self.compiled_forward = None  # set by compile_decode_step()

    def setup_cache(self, device, dtype):
        """(Re)allocate the RoPE table (float32) and an empty KV cache on `device` in `dtype`.

        Called by llama_models.load after weights are assigned to a model built on the meta
        device, whose buffers have no storage yet; also a way to clear the cache.
        """
        self.rope = rope_table(self.params).to(device)
        for layer in self.layers:
            attn = layer.attention
            attn.cache_k = torch.zeros(attn.cache_k.shape, device=device, dtype=dtype)
            attn.cache_v = torch.zeros(attn.cache_v.shape, device=device, dtype=dtype)

    def reorder_cache(self, rows: torch.Tensor, end: int) -> None:
        """Beam search: make cache row i a copy of row rows[i], positions < end, in every layer.

        When beams are re-ranked, new beam i continues old beam rows[i]; its keys and values must
        follow it. Two new beams may share one parent, so this is a gather, not a permutation.
        """
        n = len(rows)
        for layer in self.layers:
            for cache in (layer.attention.cache_k, layer.attention.cache_v):
                # Indexing with a tensor copies the rows first, so overwriting in place is safe.
                cache[:n, :end] = cache[rows, :end]  # (n, end, K, Hd)

    def compile_decode_step(self) -> None:
        """Make decode_step() run a torch.compile'd forward: one graph for every decode step.

        Static shapes: the position goes in as a tensor, so each step looks the same to the
        compiler and nothing recompiles as the text grows (see forward). The price: attention
        spans all max_seq_len cache slots, masked, so keep max_seq_len near what you need. The
        first step compiles (about 30 s for a 30-layer model here; torch caches the result on
        disk, in /tmp/torchinductor_$USER, which brings a later run down to a few seconds). With
        one process, fairscale's embedding makes one graph break (dynamo cannot trace its
        autograd Function); the blocks and the output head are one graph.

        fairscale's linear layers (left where nothing packed or quantized them: Apple and other
        ARM CPUs, bf16 without AVX512) would break the graph too, twice each: in one process their
        communication is the identity, so they become plain nn.Linear layers over the same weights.
        """
        if fs_init.get_model_parallel_world_size() == 1:
            replace_linears(self, _plain_linear)
        self.compiled_forward = torch.compile(self.forward, dynamic=False)

    def decode_step(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """forward() for one new token per row, (B, 1) at position start_pos: eager, or compiled
        after compile_decode_step(). Returns (B, 1, V) float32 logits."""
        if self.compiled_forward is None:
            return self(tokens, start_pos)
        return self.compiled_forward(tokens, torch.tensor(start_pos, device=tokens.device))

    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor]) -> torch.Tensor:
        """Logits for `tokens`, which sit at positions start_pos .. start_pos + seq - 1.

        Args:
            tokens: (batch, seq) token ids. The KV cache already holds positions < start_pos.
            start_pos: position of tokens[:, 0]. Prefill with start_pos=0 and the whole prompt,
                then call once per new token with seq=1 and start_pos = tokens so far. A 0-dim
                tensor instead of an int gives every call the same shapes, for torch.compile
                (compile_decode_step): attention then spans the whole cache, masked.
        Returns:
            (batch, seq, vocab) float32 logits for the token after each position.
        """
        bsz, seqlen = tokens.shape
        if bsz > self.params.max_batch_size:
            raise ValueError(f"batch of {bsz} exceeds max_batch_size={self.params.max_batch_size}")
        compiled = isinstance(start_pos, torch.Tensor)
        if compiled:
            # Positions as data, not as shapes: one compiled graph serves every step. The slots
            # not written yet hold zeros (or a longer, earlier sequence); the mask hides them.
            positions = start_pos + torch.arange(seqlen, device=tokens.device)  # (S,)
            kv_len = self.params.max_seq_len
        else:
            if start_pos + seqlen > self.params.max_seq_len:
                raise ValueError(f"positions up to {start_pos + seqlen} exceed max_seq_len={self.params.max_seq_len}")
            positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)  # (S,)
            kv_len = start_pos + seqlen
        h = self.tok_embeddings(tokens)  # (B, S, D)
        self.rope = self.rope.to(tokens.device)  # a no-op once it is there
        rope = self.rope[positions]  # (S, Hd/2, 2)

        mask = None
        if seqlen > 1 or compiled:
            # Token i of this call sits at position positions[i] and may attend to every earlier
            # position and to itself, but not to later ones: True = may attend. (A boolean
            # comparison rather than Meta's torch.triu of -inf, which returns NaN on MPS:
            # pytorch/pytorch#100005.) A single new token attending to exactly the slots written
            # so far may see all of them: no mask.
            key_pos = torch.arange(kv_len, device=tokens.device)  # (kv_len,)
            mask = key_pos[None, :] <= positions[:, None]  # (S, kv_len)

        for layer in self.layers:
            h = layer(h, positions, kv_len, rope, mask)
        h = self.norm(h)
        return self.output(h).float()  # (B, S, V)
