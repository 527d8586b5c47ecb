"""Run a model bigger than memory: stream its transformer blocks from the checkpoint file.

The weights are mapped from consolidated.00.pth (llama_models.load maps the file), so a block
not in memory costs nothing but a read. Embeddings, norms and the output head stay resident;
each transformer block is read into one of a few fixed buffers (slots) just before it runs, and
its slot goes to another block right after. When the weights do not fit, every forward pass
must read every block from disk once, so the best possible speed is one pass over the file at
the disk's read bandwidth. To get there the disk must never wait for the CPU: while block i
computes, a background thread is already reading the next ones. And each read must count: a
forward pass takes the whole prompt (prefill) or all beams (beam search) through a block at
once, so one read serves them all.

Why slots, and not the mapped file's own pages: memory freshly handed out by the kernel is slow
on first touch in a virtual machine (the host backs it only then), and the page cache hands out
fresh pages for every block it reads, so a block's matrix-vector products ran far slower on
just-read file pages than on memory touched before. The slots are touched once, at load, and
read into with O_DIRECT (no page cache, nothing to evict); in huge pages, so each read is a few
large requests, faster than reads into 4 KiB pages. (Both measured:
docs/benchmarks.md#streaming-blocks.)

int8 blocks are streamed the same way once quantize_blocks_to_files has written them to files.
Linux only: it relies on O_DIRECT, madvise, posix_fadvise and /proc/self.
"""

import ctypes
import errno
import itertools
import json
import mmap
import os
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .pages import mapped_file, release_pages
from .quantize import quantize_linears

# madvise advice, numbered as in Linux's <sys/mman.h>:
MADV_RANDOM = 1  # a fault reads just its own page, not the 8 MB the kernel would read around it
ALIGN = 4096  # O_DIRECT reads whole disk blocks: offsets, lengths and buffers in multiples of this
HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 Linux: 2 MiB
# What a forward pass allocates besides the weights and the KV cache: PyTorch's kernels, loaded
# lazily on the first call (measured: docs/benchmarks.md#streaming-blocks), and the activations,
# mostly the float32 logits of a prefill (200 tokens over Llama 3's 128k vocabulary: 100 MB,
# plus their bf16 original).
ACTIVATIONS = 256 << 20

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(size: Union[int, str]) -> int:
    """Bytes in a size such as 4GB (10**9), 4GiB (2**30), 512MB, 1.5 GB or 4000000000."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size)
    if not match or match[2].upper() not in _UNITS:
        raise ValueError(f"max_memory {size!r} is not a size like 4GB, 4GiB or 512MB")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def streamed_tensors(block: nn.Module) -> list[torch.Tensor]:
    """The weights of a block that are read from disk each pass: all but its two small norms."""
    return [t for name, t in block.state_dict(keep_vars=True).items() if not name.endswith("norm.weight")]


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _process_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


def resident_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights that are pages of the file and stay in memory once read: embeddings, norms, output head."""
    streamed = {t.data_ptr() for block in model.layers for t in streamed_tensors(block)}
    everything = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # a tied head counts once
    return [t for ptr, t in everything.items() if ptr not in streamed and mapped_file(ptr) is not None]


def resident_blocks(model: nn.Module, max_memory: int, resident: list[torch.Tensor]) -> int:
    """How many transformer blocks may be in memory at once for the process to stay in max_memory.

    The budget covers the whole process: what it holds now (measured: the interpreter, PyTorch,
    the KV cache, int8 weights made in memory; so call this before the file's pages are
    touched), the file's weights that stay resident once read (embeddings, norms, output head),
    activations, and the streamed blocks. At least two blocks must fit: the one computing and the
    next one being read. `resident`: resident_weights(model).
    """
    resident_bytes = _nbytes(resident)
    block_bytes = slot_layout(model)[1]
    now = _process_rss()
    fixed = now + ACTIVATIONS + resident_bytes
    fits = (max_memory - fixed) // block_bytes
    if fits < 2:
        raise ValueError(
            f"max_memory={_size(max_memory)} is too small for this model: it needs at least "
            f"{_size(fixed + 2 * block_bytes)} (this process now {_size(now)} + activations {_size(ACTIVATIONS)} + "
            f"embeddings, norms and output head {_size(resident_bytes)} + 2 transformer blocks of "
            f"{_size(block_bytes)}: the one computing and the next one being read)")
    return min(fits, len(model.layers))


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def slot_layout(model: nn.Module) -> tuple[list[int], int]:
    """Where each streamed weight of a block goes in a slot (byte offsets), and the slot's size.

    Each weight gets its file range widened to ALIGN at both ends, so that it can be read whole
    with O_DIRECT wherever it starts in the file.
    """
    blocks = [streamed_tensors(block) for block in model.layers]
    sizes = [max(_up(t.nbytes, ALIGN) for t in same) + ALIGN for same in zip(*blocks)]
    return [0, *itertools.accumulate(sizes)][:-1], sum(sizes)


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """nbytes of zeroed memory, starting at a huge page boundary, in huge pages where the kernel has them."""
    # Anonymous (file descriptor -1: no file behind it) and private: anonymous memory shared
    # between processes (mmap's default) gets no huge pages.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory = torch.frombuffer(region, dtype=torch.uint8)  # keeps region alive
    start = -memory.data_ptr() % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, _up(nbytes, HUGE_PAGE))
    except OSError:
        pass  # a kernel without transparent huge pages: 4 KiB pages, slower reads, same results
    memory = memory[start:start + nbytes]
    memory.zero_()  # touch it now, at load, not in the first forward pass
    return memory


def _open_unbuffered(path: str) -> tuple[int, bool]:
    """(a file descriptor, whether it reads past the page cache); O_DIRECT where the file system allows it."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return os.open(path, os.O_RDONLY), False  # read through the page cache and evict after


class BlockStreamer:
    """Keeps at most 1 + `prefetch` transformer blocks of `model` in memory while it runs.

    The blocks take turns in 1 + prefetch slots. A forward pre-hook waits until block i has been
    read into its slot and points the block's weights there; a forward hook points them back at
    the mapped file (reading them there would read the file), frees the slot, and starts reading
    the block `prefetch` places ahead (wrapping around to the first blocks, which the next
    forward pass needs first). prefetch=0 is the naive way, for comparison: read a block,
    compute, release, read the next.
    """

    def __init__(self, model: nn.Module, prefetch: int):
        self.weights = [streamed_tensors(block) for block in model.layers]  # the Parameters and buffers themselves
        self.in_file = [[t.detach() for t in weights] for weights in self.weights]  # the same tensors, in the file
        self.where = [[mapped_file(t.data_ptr()) for t in weights] for weights in self.weights]  # (path, offset)
        self.files = {path: _open_unbuffered(path) for path in {path for path, _ in itertools.chain(*self.where)}}
        self.offsets, self.slot_bytes = slot_layout(model)
        self.memory = huge_page_buffer((1 + prefetch) * self.slot_bytes)
        self.free = list(range(1 + prefetch))  # slots that no block holds
        self.slot: dict[int, int] = {}  # block index -> its slot, from the start of its read until released
        self.prefetch = prefetch
        self.loading: dict[int, Future] = {}  # block index -> its read, until released
        self.waited_s = 0.0  # time forward passes spent waiting for a block's read: 0 if the disk kept up
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-prefetch")
        for i, block in enumerate(model.layers):
            block.register_forward_pre_hook(partial(self._before, i))
            block.register_forward_hook(partial(self._after, i))
        self._keep(range(1 + prefetch))

    def __str__(self):
        return (f"streaming {len(self.weights)} transformer blocks from disk, {1 + self.prefetch} in memory "
                f"at a time ({_size(self.slot_bytes)} each)")

    def __del__(self):
        for fd, _ in getattr(self, "files", {}).values():
            os.close(fd)

    def _range(self, i: int, j: int) -> tuple[int, int]:
        """Where in self.memory the read of weight j of block i goes, and how far into it the weight starts.

        The read starts at the disk block (ALIGN bytes) that holds the weight's first byte.
        """
        return self.slot[i] * self.slot_bytes + self.offsets[j], self.where[i][j][1] % ALIGN

    def _read(self, i: int) -> None:
        """Read block i's weights from disk into its slot (in the reader thread)."""
        for j, ((path, offset), t) in enumerate(zip(self.where[i], self.weights[i])):
            fd, direct = self.files[path]
            at, skew = self._range(i, j)
            length = _up(skew + t.nbytes, ALIGN)
            buffer = self.memory[at:at + length].numpy()
            done = 0
            while done < length:  # os.preadv lets go of the GIL: the model computes meanwhile
                n = os.preadv(fd, [buffer[done:]], offset - skew + done)
                if n == 0:
                    break  # the end of the file, inside the last disk block
                done += n
            if not direct:
                os.posix_fadvise(fd, offset - skew, length, os.POSIX_FADV_DONTNEED)

    def _keep(self, window: range) -> None:
        """Make the blocks in `window` (indices modulo n_layers) the ones in a slot or being read."""
        wanted = [i % len(self.weights) for i in window]
        for i in [i for i in self.loading if i not in wanted]:
            self.loading.pop(i).result()  # a read still in flight would write into the freed slot
            for t, in_file in zip(self.weights[i], self.in_file[i]):
                t.data = in_file
            self.free.append(self.slot.pop(i))
        for i in wanted:
            if i not in self.loading:
                self.slot[i] = self.free.pop()
                self.loading[i] = self._reader.submit(self._read, i)

    def _before(self, i: int, block, args) -> None:
        # Normally a no-op: block i and the next ones were requested when block i-1 finished.
        # After an interrupted pass, this drops whatever was read for the wrong blocks.
        self._keep(range(i, i + 1 + self.prefetch))
        start = time.perf_counter()
        self.loading[i].result()
        self.waited_s += time.perf_counter() - start
        for j, t in enumerate(self.weights[i]):
            at, skew = self._range(i, j)
            t.data = self.memory[at + skew:at + skew + t.nbytes].view(t.dtype).view(t.shape)

    def _after(self, i: int, block, args, output) -> None:
        # Release block i and read ahead up to block i + 1 + prefetch (prefetch=0: release only).
        self._keep(range(i + 1, i + 2 + self.prefetch) if self.prefetch else range(0))


def quantize_blocks_to_files(model: nn.Module, model_dir: Path, dtype: torch.dtype) -> None:
    """Make the transformer blocks int8, as pages of files in model_dir/int8/ (one per block).

    int8 weights made at load time would sit in anonymous memory, which cannot be given back
    and read again like a file's pages. So the first time, each block is quantized (its bf16
    pages read once and released), saved, and mapped back, which frees the int8 copy: memory
    stays near one block. Later loads only map the files. source.json records the checkpoint
    files and dtype they were made from; when those change, they are made again.
    """
    folder = model_dir / "int8"
    source = json.dumps({"dtype": str(dtype), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
                                                        for p in sorted(model_dir.glob("consolidated.*.pth"))]})
    stamp = folder / "source.json"
    fresh = not stamp.is_file() or stamp.read_text() != source
    try:
        if fresh:
            folder.mkdir(exist_ok=True)
            stamp.unlink(missing_ok=True)  # written last: the files are complete only once it is there
        for i, block in enumerate(model.layers):
            path = folder / f"layers.{i}.pth"
            if fresh:
                quantize_linears(block, "int8", dtype, release=release_pages)
                torch.save(block.state_dict(), path)
            else:
                # Only the structure, on the meta device (no memory, no arithmetic): Int8Linear
                # modules whose buffers the file's tensors replace.
                with torch.device("meta"):
                    quantize_linears(block.to("meta"), "int8", dtype)
            block.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
        if fresh:
            stamp.write_text(source)
    except OSError as e:
        raise ValueError(f"max_memory with quantize='int8' keeps int8 weights in {folder}, which failed: {e}") from None


def must_stream(model: nn.Module, max_memory: Union[int, str], dtype: torch.dtype, quantize: Optional[str]) -> bool:
    """Whether `model` (just loaded, its weights still untouched pages of the file) must stream its
    blocks to stay within max_memory, or fits whole, in `dtype` and quantized as asked.

    Called before the weights are packed, quantized or converted, so that a budget that holds the
    whole model changes nothing. The estimate counts the process as it is now, the KV cache,
    activations and every weight in its final form, a tied output head twice (packing and
    quantizing make it a copy of its own). Raises ValueError where streaming cannot work: not
    Linux, not the CPU, or a dtype other than the file's (the weights would be copies, not pages).
    """
    max_memory = parse_memory(max_memory)
    streamed = {t.data_ptr() for block in model.layers for t in streamed_tensors(block)}
    weights = [*(t for m in model.modules() for t in m.parameters(recurse=False))]  # the tied head twice
    size = sum(t.numel() + t.shape[0] * dtype.itemsize if quantize == "int8" and t.data_ptr() in streamed
               else t.numel() * dtype.itemsize for t in weights)
    cache = sum(b.numel() for name, b in model.named_buffers() if "cache" in name) * dtype.itemsize
    if _process_rss() + cache + ACTIVATIONS + size <= max_memory:
        return False
    if sys.platform != "linux":
        raise ValueError(f"max_memory needs Linux (O_DIRECT, madvise, /proc), not {sys.platform}")
    file_dtype = model.layers[0].attention.wq.weight.dtype
    if quantize is None and dtype != file_dtype:
        raise ValueError(f"max_memory streams the weights from the checkpoint file, which holds {file_dtype}; "
                         f"{dtype} would be copies in memory: use the file's dtype, or quantize='int8'")
    return True


def stream_blocks(model: nn.Module, max_memory: Union[int, str]) -> Optional[BlockStreamer]:
    """Stream `model`'s transformer blocks from its checkpoint file to stay within max_memory.

    Returns the BlockStreamer, or None when the whole model fits and there is nothing to stream.
    Raises ValueError for a budget too small even for two blocks, or weights that are not pages
    of a file (a dtype other than the file's, int8 made at load time: quantize_blocks_to_files).
    """
    if sys.platform != "linux":
        raise ValueError(f"max_memory needs Linux (O_DIRECT, madvise, /proc), not {sys.platform}")
    max_memory = parse_memory(max_memory)
    for name, t in model.layers[0].state_dict().items():
        if t.device.type != "cpu" or mapped_file(t.data_ptr()) is None:
            raise ValueError(f"max_memory streams the weights from the mmapped checkpoint file, but "
                             f"layers.0.{name} is not in it ({t.dtype} on {t.device}): load on the CPU, "
                             f"in the file's dtype")
    resident = resident_weights(model)
    n_blocks = resident_blocks(model, max_memory, resident)
    if n_blocks == len(model.layers):
        return None  # the whole model fits: nothing to stream
    libc = ctypes.CDLL(None)
    for t in resident:
        if t is model.tok_embeddings.weight and t is not model.output.weight:
            # A lookup reads only its tokens' rows: 200 tokens read 3 MB of Llama 3's 1 GB
            # embedding, where the kernel's read-around of each fault would read most of it.
            start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(t.data_ptr() + t.nbytes - start), MADV_RANDOM)
        else:
            # Every pass reads these whole (the output head: 1 GB in Llama 3 8B): read them now,
            # not in the middle of the first pass. A throwaway sum touches every page.
            with torch.no_grad():
                t.sum()
    return BlockStreamer(model, prefetch=n_blocks - 1)
