"""Load a Meta-format checkpoint directory: params.json, consolidated.00.pth, tokenizer.model."""

import json
import pickle
import zipfile
from pathlib import Path
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from . import offload
from .args import ModelArgs
from .device import available_memory, default_dtype, resolve_device
from .distributed import init_distributed
from .model import Transformer
from .packed import can_pack, pack_linears
from .pages import release_pages
from .quantize import QUANTIZED_LINEARS, quantize_linears
from .tokenizer import Tokenizer


class CheckpointError(Exception):
    """A checkpoint directory that cannot be loaded; the message says which file and why."""


def _read_params(model_dir: Path, **runtime) -> ModelArgs:
    path = model_dir / "params.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    try:
        return ModelArgs.from_params(params, source=str(path), **runtime)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _read_state_dict(path: Path) -> dict:
    # mmap=True: tensors stay in the file's pages until used, so loading costs no copy and the
    # OS can drop and re-read them under memory pressure. weights_only=True: the unpickler builds
    # only tensors and plain containers, so a malicious .pth cannot run code.
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"{path} holds Python objects other than tensors; refused to load it "
                              f"(nothing in it was run). {reason}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or another "
                              f"format?): {reason}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} must hold a dict of tensors")
    return state_dict


# Meta's layout of model-parallel shards, from fairscale's layers: a column-parallel weight
# (its output features split across processes) is cut along dim 0, a row-parallel one (input
# features split) along dim 1; norms are whole in every shard.
SPLIT_DIM = {"tok_embeddings": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def _slice_of_concat(parts: list, dim: int, start: int, stop: int) -> torch.Tensor:
    """torch.cat(parts, dim)[start:stop along dim], touching only the parts that overlap."""
    pieces, offset = [], 0
    for part in parts:
        lo, hi = max(start, offset), min(stop, offset + part.shape[dim])
        if lo < hi:
            pieces.append(part.narrow(dim, lo - offset, hi - lo))
        offset += part.shape[dim]
    # One piece cut along dim 0 is a view into the mmapped file: no copy. Otherwise copy just
    # this slice (a non-contiguous weight would be copied by every matmul instead).
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)).contiguous()


def reshard(shards: list[dict], rank: int, world_size: int, args: ModelArgs) -> dict:
    """The tensors process `rank` of `world_size` holds, from a checkpoint saved in len(shards) shards.

    Conceptually: concatenate the shards back into the whole tensor, then cut it into world_size
    equal slices and keep slice `rank`. With more processes than kv heads, each process instead
    gets a copy of the one kv head its query heads use.
    """
    out = {}
    for name, first in shards[0].items():
        dim = SPLIT_DIM.get(name.split(".")[-2])
        if dim is None:
            out[name] = first
            continue
        parts = [shard[name] for shard in shards]
        total = sum(part.shape[dim] for part in parts)
        start, stop = rank * total // world_size, (rank + 1) * total // world_size
        if name.split(".")[-2] in ("wk", "wv") and world_size > args.n_kv_heads:
            head = rank * args.n_kv_heads // world_size
            start, stop = head * args.head_dim, (head + 1) * args.head_dim
        out[name] = _slice_of_concat(parts, dim, start, stop)
    return out


def _check_tensors(model: Transformer, state_dict: dict, path: Path) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{path} does not match params.json: " + "; ".join(parts))
    for name, shape in expected.items():
        found = tuple(state_dict[name].shape)
        if found != shape:
            raise CheckpointError(f"{path}: {name} has shape {list(found)} but params.json implies "
                                  f"{list(shape)}")


def load(
    model_dir: Union[str, Path],
    *,
    device: Union[str, torch.device] = "auto",
    dtype: Union[None, str, torch.dtype] = None,
    max_seq_len: int = 2048,
    max_batch_size: int = 1,
    quantize: Optional[str] = None,
    max_memory: Union[None, int, str] = None,
    pack: bool = True,
) -> tuple[Transformer, Tokenizer]:
    """Build the model and tokenizer of a Meta-format checkpoint directory.

    Args:
        model_dir: directory with params.json, consolidated.*.pth and tokenizer.model. A checkpoint
            saved in M shards loads on N processes (torchrun) when M divides N or N divides M.
        device: "auto" (cuda, else mps, else cpu), "cpu", "cuda", "cuda:1", "mps", or a torch.device.
        dtype: weights' and KV cache's dtype, or its name ("bfloat16"); default: default_dtype(device).
        max_seq_len: longest prompt + generation the KV cache holds.
        max_batch_size: rows of the KV cache (the beam width, for beam search).
        quantize: None, "int8" or "int4" (CPU only): weight-only quantized linear layers
            (llama_models.quantize), made at load time from the checkpoint; activations and the
            KV cache stay in `dtype`.
        max_memory: None (the whole model in memory), or a budget for the process such as "4GB"
            (bytes, or a string; GB = 10**9, GiB = 2**30): embeddings, norms and the output head
            stay resident, transformer blocks are read from the checkpoint file as they run, the
            next ones read ahead in a background thread (llama_models.offload). CPU, Linux, one
            process, the file's dtype. With quantize="int8", the int8 blocks are written once
            into model_dir/int8/ (made again if the checkpoint changes) and streamed from there.
            A budget that holds the whole model changes nothing.
        pack: on an x86 CPU, in one process, without quantize or streaming, reorder the linear
            layers' weights into oneDNN's layout (llama_models.packed): faster decoding, the same
            results. False keeps them as plain Parameters, to change them in place or to take
            gradients with respect to them (gradients with respect to the inputs and embeddings
            work either way).
    Returns:
        (model, tokenizer). The model is in eval mode; wrap calls in torch.inference_mode()
        unless you want gradients.
    Raises:
        CheckpointError: a missing or unreadable file, or tensors that disagree with params.json.
        ValueError: a device that is not available, or a max_memory too small for two blocks.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or default_dtype(device)
    if quantize is not None and quantize not in QUANTIZED_LINEARS:
        raise ValueError(f"unknown quantization {quantize!r} (supported: int8, int4)")
    if quantize == "int4" and device.type != "cpu":
        raise ValueError("quantize='int4' runs on the CPU only")
    model_dir = Path(model_dir).expanduser()
    args, tokenizer, paths, shards = read(model_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    init_distributed(device)
    check_cache_fits(args, device, dtype)
    model = build(args, this_process_share(shards, args, model_dir), paths[0] if len(paths) == 1 else model_dir)
    model.vocab_in_use = tokenizer.n_words
    stream = choose_form(model, model_dir, device, dtype, quantize, max_memory, pack)
    # Place: the cache allocated and everything moved to the device, in dtype.
    model.setup_cache(device, dtype)
    model.to(device=device, dtype=dtype)  # no copy when the checkpoint is already there in dtype
    model.block_streamer = offload.stream_blocks(model, max_memory) if stream else None
    return model.eval(), tokenizer


def read(model_dir: Path, **runtime) -> tuple[ModelArgs, Tokenizer, list[Path], list[dict]]:
    """Stage 1, read: params.json, tokenizer.model, and the consolidated.*.pth shards, mapped
    from their files (nothing is read into memory yet)."""
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {model_dir} not found")
    args = _read_params(model_dir, **runtime)
    tokenizer_path = model_dir / "tokenizer.model"
    try:
        tokenizer = Tokenizer(tokenizer_path)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    if tokenizer.n_words > args.vocab_size:
        raise CheckpointError(f"{tokenizer_path} has {tokenizer.n_words} tokens but params.json "
                              f"says vocab_size={args.vocab_size}")
    paths = sorted(model_dir.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"no consolidated.*.pth in {model_dir}")
    shards = [_read_state_dict(path) for path in paths]  # mmapped: nothing is read yet
    for path, shard in zip(paths[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            raise CheckpointError(f"{path} and {paths[0]} hold different tensor names")
    return args, tokenizer, paths, shards


def check_cache_fits(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError, before allocating anything, if the KV cache (and the RoPE table) of
    max_seq_len positions would not fit in the memory the device has free: the kernel would
    otherwise kill the process part-way, with no message."""
    available = available_memory(device)
    if available is None:
        return
    world_size = fs_init.get_model_parallel_world_size()
    kv_heads = max(args.n_kv_heads, world_size) // world_size  # this process's share (Attention)
    # Keys and values, every layer, every batch row, in dtype; the RoPE table's cos and sin in float32.
    per_position = (2 * args.n_layers * args.max_batch_size * kv_heads * args.head_dim * dtype.itemsize
                    + args.head_dim * 4)
    if per_position * args.max_seq_len <= available:
        return
    rows = f" x {args.max_batch_size} rows" if args.max_batch_size > 1 else ""
    raise ValueError(f"a KV cache of {args.max_seq_len} positions{rows} (max_seq_len) would take "
                     f"{per_position * args.max_seq_len / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB "
                     f"of memory free on {device}; at most {available // per_position} positions fit there, fewer "
                     f"beside the weights: lower --max-seq-len")


def this_process_share(shards: list[dict], args: ModelArgs, model_dir: Path) -> dict:
    """The tensors this process holds: all of them alone, its slice under torchrun."""
    rank, world_size = fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
    if len(shards) % world_size and world_size % len(shards):
        raise CheckpointError(f"{model_dir} holds {len(shards)} shards, which cannot be split or merged for "
                              f"{world_size} processes: one count must divide the other")
    return reshard(shards, rank, world_size, args)


def build(args: ModelArgs, state_dict: dict, source: Path) -> Transformer:
    """Stage 2, build: the Transformer, its parameters made the checkpoint's mapped tensors.
    source: the file (or, for several shards, the directory) that errors name."""
    world_size = fs_init.get_model_parallel_world_size()
    # Build on the meta device: shapes only, no random weights to allocate and then overwrite.
    # fairscale creates its weights with the legacy torch.Tensor(...) constructor, which ignores
    # the meta device: that memory is allocated but never written, so the OS never backs it
    # with RAM, and assign=True below frees it. With several processes, fairscale also copies
    # each weight's slice out of a full-size scratch matrix, which cannot be done from the meta
    # device: there we build on the CPU, and each process briefly writes its share of the model
    # in float32 before assign=True frees it.
    with torch.device("meta") if world_size == 1 else torch.device("cpu"):
        model = Transformer(args)
    _check_tensors(model, state_dict, source)
    # assign=True makes the parameters *be* the checkpoint's (mmapped) tensors instead of
    # copying into freshly allocated ones: half the peak memory.
    model.load_state_dict(state_dict, strict=True, assign=True)
    if model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr():
        # A tied output head (SmolLM2: one tensor in the file for both): make it one Parameter,
        # or converting the dtype below would make two copies of it.
        model.output.weight = model.tok_embeddings.weight
    return model


def choose_form(model: Transformer, model_dir: Path, device: torch.device, dtype: torch.dtype,
                quantize: Optional[str], max_memory, pack: bool) -> bool:
    """Stage 3, the weights' form: streamed from disk, quantized, packed for oneDNN, or as they
    are. Replaces the linear layers accordingly; returns whether the blocks are streamed."""
    world_size = fs_init.get_model_parallel_world_size()
    # A budget that holds the whole model changes nothing: decide before packing or quantizing,
    # which both need to know whether the blocks will be streamed.
    stream = max_memory is not None and offload.must_stream(model, max_memory, dtype, quantize)
    if stream and quantize == "int4":
        raise ValueError("quantize='int4' needs the whole model in memory: raise max_memory, or use int8")
    if world_size > 1 and (stream or quantize is not None):
        raise ValueError(f"{'max_memory' if stream else f'quantize={quantize!r}'} runs in one process "
                         f"only (not under torchrun)")
    if quantize is not None:
        if stream:
            # Streamed blocks must be pages of a file, and int8 made here would not be: quantize
            # them into files once (model_dir/int8/) and map those.
            offload.quantize_blocks_to_files(model, model_dir, dtype)
        # Quantize straight from the mmapped file, releasing each bf16 weight's pages once it is
        # done, so the full-precision model is never in memory at once.
        quantize_linears(model, quantize, dtype, release=release_pages)
    elif pack and not stream and world_size == 1 and can_pack(device, dtype):
        # Each weight's file pages are released once it is copied: memory stays at one copy.
        pack_linears(model, dtype, release=release_pages)
    return stream
