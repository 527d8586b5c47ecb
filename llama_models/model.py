"""The Llama 3 Transformer, module for module the same tree as Meta's reference.

The module and parameter names are the keys of Meta's consolidated.*.pth files, so a checkpoint
loads with `load_state_dict(strict=True)` and no renaming. The linear layers are fairscale's
model-parallel ones: with one process they are plain linears; under torchrun each process holds
a slice of every matrix.

Shapes in comments: B batch, S new tokens in this call, P start_pos, D dim, H query heads,
K key/value heads, Hd head_dim, V vocab; "B|1": B, or 1 when every row shares it (the positions
of a batch whose rows are all at the same point). "local" means this process's share under model
parallelism (all of it with one process).
"""

import math
from typing import Optional, Sequence, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

from .args import ModelArgs


def _no_init(weight):
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


def project(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], for linear layers that read the same x (wq, wk and wv; w1
    and w3). Where they share one matrix, their weights stacked in it (llama_models.packed does
    that on the CPU), one product gives all their outputs: the same arithmetic in fewer, larger
    kernels, as a decode step on a small model pays a fixed cost for each."""
    first = layers[0]
    if hasattr(first, "rows") and all(layer.weight is first.weight for layer in layers):
        stacked = first.product(x)  # (..., their out_features together)
        return [stacked[..., layer.rows] for layer in layers]
    return [layer(x) for layer in layers]


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

    x: (B, S, heads, Hd); rope: (B|1, S, Hd/2, 2), the angles of each row's positions. Meta's
    layout pairs *adjacent* dimensions (Hugging Face's pairs i with i + Hd/2, which is why HF
    conversions permute wq and wk). Meta does this with complex numbers; real arithmetic gives the
    same float32 result and also runs on MPS.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, heads, Hd/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos = rope[:, :, None, :, 0]  # (B|1, S, 1, Hd/2)
    sin = rope[:, :, None, :, 1]
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
                                       gather_output=False, init_method=_no_init)
        self.wk = ColumnParallelLinear(args.dim, n_kv_heads * args.head_dim, bias=False,
                                       gather_output=False, init_method=_no_init)
        self.wv = ColumnParallelLinear(args.dim, n_kv_heads * args.head_dim, bias=False,
                                       gather_output=False, init_method=_no_init)
        self.wo = RowParallelLinear(args.n_heads * args.head_dim, args.dim, bias=False,
                                    input_is_parallel=True, init_method=_no_init)
        # The KV cache: keys and values of every position seen so far, so that each new token
        # attends to the past without recomputing it. Allocated once at full size
        # (Transformer.setup_cache), written in place. Not part of the checkpoint.
        cache_shape = (args.max_batch_size, args.max_seq_len, self.n_local_kv_heads, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(cache_shape), persistent=False)  # (B, max_seq_len, K, Hd)
        self.register_buffer("cache_v", torch.zeros(cache_shape), persistent=False)  # (B, max_seq_len, K, Hd)
        # The attention itself, softmax(q k^T / sqrt(Hd)) v, as a module of its own so that code
        # that wants to look inside (explore.py) can swap in one that records the probabilities.
        self.attend = ScaledDotProductAttention(self.n_local_heads, self.n_local_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, rows: slice, positions: torch.Tensor, kv_len: int, rope: torch.Tensor, mask):
        """rows: the batch's rows of the cache; positions: (B|1, S), where each row's new tokens go."""
        bsz, seqlen, _ = x.shape
        xq, xk, xv = project(x, self.wq, self.wk, self.wv)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)  # (B, S, H, Hd)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (B, S, K, Hd)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (B, S, K, Hd)
        xq, xk = apply_rope(xq, rope), apply_rope(xk, rope)

        # Write this call's keys and values into the batch's rows, each row at its own positions
        # (cache[b, positions[b, s]] = xk[b, s]), then attend over the first kv_len slots of each
        # row: the ones written so far (the rows behind, masked past their own). Slicing the rows
        # gives views: nothing is copied, whichever rows the batch lives in.
        cache_k, cache_v = self.cache_k[rows], self.cache_v[rows]  # (B, max_seq_len, K, Hd) each
        batch = torch.arange(bsz, device=x.device)[:, None]  # (B, 1): with positions, one (row, position) per token
        cache_k[batch, positions] = xk
        cache_v[batch, positions] = xv
        keys = cache_k[:, :kv_len].transpose(1, 2)  # (B, K, kv_len, Hd)
        values = cache_v[:, :kv_len].transpose(1, 2)  # (B, K, kv_len, Hd)
        out = self.attend(xq.transpose(1, 2), keys, values, mask)  # (B, H, S, Hd)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (B, S, H*Hd)
        return self.wo(out)


class ScaledDotProductAttention(nn.Module):
    """Each query's weighted mean of the values, weighted by softmax(q . k / sqrt(Hd)) over the keys."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def forward(self, xq, keys, values, mask):
        """xq: (B, H, S, Hd); keys, values: (B, K, kv_len, Hd); mask: (B|1, 1, S, kv_len) bool,
        True = may attend, or None. Returns (B, H, S, Hd)."""
        # Grouped-query attention: the H/K query heads that share a key/value head are, to that
        # head, just more queries. Stacked as query rows of their kv head (head h is kv head
        # h // group's, as in Meta's repeat_kv), they make one attention per kv head over H/K * S
        # queries: no repeated copies of the cache, and on the CPU in bfloat16 a decode step's
        # attention several times faster than the kernel's own enable_gqa, which runs each query
        # head apart (docs/benchmarks.md#grouped-query-attention). The fused kernel never builds
        # the matrix of probabilities either.
        bsz, _, seqlen, head_dim = xq.shape
        group = self.n_heads // self.n_kv_heads
        xq = xq.reshape(bsz, self.n_kv_heads, group * seqlen, head_dim)  # (B, K, H/K * S, Hd): rows (head in group, s)
        if mask is not None:
            mask = mask.repeat(1, 1, group, 1)  # (B|1, 1, H/K * S, kv_len): each head of a group masks alike
        out = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, scale=1 / math.sqrt(head_dim))
        return out.reshape(bsz, self.n_heads, seqlen, head_dim)  # (B, H, S, Hd)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_no_init)
        self.w2 = RowParallelLinear(hidden, args.dim, bias=False, input_is_parallel=True, init_method=_no_init)
        self.w3 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_no_init)

    def forward(self, x):
        # SwiGLU: a SiLU-gated linear unit. w1 makes the gate, w3 the value, w2 projects back.
        gate, value = project(x, self.w1, self.w3)
        return self.w2(F.silu(gate) * value)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, rows: slice, positions, kv_len: int, rope, mask):
        # Pre-norm residual block: normalise the input of each sub-layer, add its output back.
        h = x + self.attention(self.attention_norm(x), rows, positions, kv_len, rope, mask)
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
        self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim, init_method=_no_init)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False, init_method=_no_init)
        # A plain attribute, not a buffer, so that model.to(bfloat16) cannot round the angles:
        # positions in the thousands need float32. forward() moves it to the tokens' device.
        self.rope = rope_table(args)  # (max_seq_len, Hd/2, 2)
        # Ids 0 .. vocab_in_use - 1 are the tokenizer's; load() lowers it for a checkpoint whose
        # vocabulary is padded beyond its tokenizer (rows never trained, ids nothing decodes).
        self.vocab_in_use = args.vocab_size
        self.compiled_step = None  # the compiled decode step, once compile_decode_step() made it
        # Set by llama_models.load when the blocks are streamed from disk (llama_models.offload):
        # the BlockStreamer that reads them in; it prints what it holds.
        self.block_streamer = None

    @property
    def device(self) -> torch.device:
        """Where the model runs. (The norms' weights are plain tensors whatever form the linear
        layers' weights take: packed, quantized or streamed.)"""
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations and the KV cache (int8/int4 weights compute in it)."""
        return self.norm.weight.dtype

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

    def move_cache_row(self, source: int, target: int, end: int) -> None:
        """Continuous batching (llama_models.batching): cache row `target` takes the keys and
        values of row `source`, positions < end, in every layer; `source` is free after."""
        for layer in self.layers:
            for cache in (layer.attention.cache_k, layer.attention.cache_v):
                cache[target, :end] = cache[source, :end]  # (end, K, Hd)

    def forward(self, tokens: torch.Tensor, start_pos: Union[int, Sequence[int]], first_row: int = 0) -> torch.Tensor:
        """Logits for `tokens`, which sit at positions start_pos .. start_pos + seq - 1.

        Args:
            tokens: (batch, seq) token ids. The KV cache already holds positions < start_pos.
            start_pos: position of tokens[:, 0]. Prefill with start_pos=0 and the whole prompt,
                then call once per new token with seq=1 and start_pos = tokens so far. A list
                gives each row its own (serve.py: a batch of conversations, each at its own point).
            first_row: the KV-cache row of tokens[0]; row b is cache row first_row + b (serve.py
                prefills each new conversation alone, into the row it will decode in).
        Returns:
            (batch, seq, vocab) float32 logits for the token after each position.
        """
        seqlen = tokens.shape[1]
        starts = list(start_pos) if isinstance(start_pos, (list, tuple)) else [int(start_pos)]  # one, or one per row
        kv_len = max(starts) + seqlen  # attend over the cache slots written so far, these included
        self._check_room(tokens, first_row, kv_len)
        positions = (torch.tensor(starts, device=tokens.device)[:, None]
                     + torch.arange(seqlen, device=tokens.device))  # (B|1, S)
        # A single new token may see every slot written so far: no mask. Unless the rows are at
        # different positions: then a row behind the others must not see the slots past its own
        # (zeros, or what the row's previous conversation left there).
        mask = causal_mask(positions, kv_len) if seqlen > 1 or len(set(starts)) > 1 else None
        return self._logits(tokens, slice(first_row, first_row + tokens.shape[0]), positions, kv_len, mask)

    def _check_room(self, tokens: torch.Tensor, first_row: int, kv_len: int) -> None:
        if first_row + tokens.shape[0] > self.params.max_batch_size:
            raise ValueError(f"rows up to {first_row + tokens.shape[0]} exceed max_batch_size="
                             f"{self.params.max_batch_size}")
        if kv_len > self.params.max_seq_len:
            raise ValueError(f"positions up to {kv_len} exceed max_seq_len={self.params.max_seq_len}")

    def _logits(self, tokens: torch.Tensor, rows: slice, positions: torch.Tensor, kv_len: int, mask) -> torch.Tensor:
        """The network itself: embed, the blocks, the final norm, the output head. (B, S, V) float32."""
        h = self.tok_embeddings(tokens)  # (B, S, D)
        self.rope = self.rope.to(tokens.device)  # a no-op once it is there
        rope = self.rope[positions]  # (B|1, S, Hd/2, 2)
        for layer in self.layers:
            h = layer(h, rows, positions, kv_len, rope, mask)
        return self.output_logits(self.norm(h))

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head: (..., D) final-norm states -> (..., V) float32 scores, one per id."""
        logits = self.output(h).float()  # (..., V)
        if self.vocab_in_use < logits.shape[-1]:
            # Ids the tokenizer does not have get the lowest score: never chosen, probability 0.
            logits[..., self.vocab_in_use:] = torch.finfo(logits.dtype).min
        return logits

    def compile_decode_step(self, options: Optional[dict] = None) -> None:
        """Make decode_step() run through torch.compile: one compiled graph for every step.

        A graph has its shapes fixed when it is compiled, and a decode step's only shape that
        changes from one step to the next is the number of cache slots attention reads, the text
        so far. It goes in as the length of an empty tensor marked dynamic: a symbol in the
        graph, not a constant, so one graph serves every position and a step costs what the text
        so far costs. Everything else (one token per row, the weights) is fixed, and the
        compiler specialises on it. A new shape (beam search's K rows, speculative decoding's
        k + 1 tokens) compiles a graph of its own, once.

        fairscale's layers would break the graph (its linears twice each, its embedding once: the
        compiler cannot trace their autograd Functions). In one process their communication is
        the identity, so they become plain nn.Linear and nn.Embedding layers over the same
        weights. options: Inductor's (torch.compile(options=...)); llama_models.compiled chooses
        them and where the compiled code is kept between runs.
        """
        if fs_init.get_model_parallel_world_size() == 1:
            replace_linears(self, _plain_linear)
            embedding = nn.Embedding(*self.tok_embeddings.weight.shape, device="meta")
            embedding.weight = self.tok_embeddings.weight  # the same Parameter: a tied head stays tied
            self.tok_embeddings = embedding
        self.compiled_step = torch.compile(self._compiled_step, options=options)

    def decode_step(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """forward() for the new tokens of a decode step, (B, S) at position start_pos: eager, or
        compiled after compile_decode_step(). Returns (B, S, V) float32 logits."""
        if self.compiled_step is None:
            return self(tokens, start_pos)
        self._check_room(tokens, 0, start_pos + tokens.shape[1])
        span = torch.empty(start_pos + tokens.shape[1], dtype=torch.uint8, device=tokens.device)
        torch._dynamo.mark_dynamic(span, 0)  # its length is a symbol of the graph: see compile_decode_step
        return self.compiled_step(tokens, torch.tensor(start_pos, device=tokens.device), span)

    def _compiled_step(self, tokens: torch.Tensor, start_pos: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        """forward(), compiled: the position as a 0-dim tensor, the slots to attend over as the
        length of `span` (start_pos + seq)."""
        positions = start_pos + torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, S)
        kv_len = span.shape[0]
        mask = causal_mask(positions, kv_len) if tokens.shape[1] > 1 else None
        return self._logits(tokens, slice(0, tokens.shape[0]), positions, kv_len, mask)


def causal_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B|1, 1, S, kv_len) bool, True = may attend: the token at positions[b, i] sees every
    earlier position of its row and itself, not later ones. positions: (B|1, S)."""
    # A boolean comparison rather than Meta's torch.triu of -inf, which returns NaN on MPS
    # (pytorch/pytorch#100005). The 1 is the heads' dimension: every head masks alike.
    key_pos = torch.arange(kv_len, device=positions.device)  # (kv_len,)
    return (key_pos <= positions[:, :, None])[:, None]  # (B|1, 1, S, kv_len)
