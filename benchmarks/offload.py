"""A model bigger than the memory budget: seconds per forward pass against the disk's limit.

    python benchmarks/offload.py benchmarks/work/llama3.1-8b --max-memory 4GB
    python benchmarks/offload.py benchmarks/work/llama3.1-8b --max-memory 4GB --append benchmarks/RESULTS.md

When the weights do not fit, each forward pass reads every transformer block from disk once,
so the limit is checkpoint bytes / disk read bandwidth. This measures, in one run:
1. the disk's sequential read bandwidth on the checkpoint itself, page cache evicted first,
   three ways: O_DIRECT reads of 64 MiB into 4 KiB pages, the same into huge pages (the
   streamer's reader), and MADV_POPULATE_READ on the mmapped file (through the page cache);
   the fastest is the limit we compare against;
2. load(max_memory=...) in a fresh process, cache evicted before it starts: peak RSS (VmHWM,
   touched mmapped pages included), a prefill of --prompt-tokens, then --decode-steps one-token
   passes, each timed, and the bytes each pass read from disk (/proc/self/io);
3. the naive way, also in a fresh process: no read-ahead, each block read, computed, released.
"""

import argparse
import ctypes
import datetime
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama_models  # noqa: E402
from llama_models.pages import mapped_file, release_pages  # noqa: E402
from llama_models.offload import ALIGN, BlockStreamer, huge_page_buffer, parse_memory, streamed_tensors  # noqa: E402
import machine  # noqa: E402  (beside this script)
from run import KEEP_MARKER  # noqa: E402  (benchmarks/run.py, beside this script)

CHUNK = 64 << 20
MADV_POPULATE_READ = 22  # madvise advice (Linux 5.14+, <sys/mman.h>): read the pages in now, as faults would


def evict(path: Path) -> None:
    """Drop the whole file from the page cache, so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def direct_read_bandwidth(path: Path, huge_pages: bool) -> float:
    """Bytes/s reading the file front to back with O_DIRECT (no page cache at all), into a buffer
    in 4 KiB pages or in huge pages (as BlockStreamer does)."""
    evict(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    if huge_pages:
        aligned = huge_page_buffer(CHUNK).numpy()
    else:
        buffer = torch.empty(CHUNK + ALIGN, dtype=torch.uint8)
        aligned = buffer[-buffer.data_ptr() % ALIGN:][:CHUNK].numpy()  # O_DIRECT needs an aligned buffer
    start, total = time.perf_counter(), 0
    try:
        while n := os.readv(fd, [aligned]):
            total += n
    finally:
        os.close(fd)
    return total / (time.perf_counter() - start)


def page_in(tensor: torch.Tensor) -> None:
    """Read the pages of a mmapped tensor from disk into memory (Linux 5.14+: MADV_POPULATE_READ)."""
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = tensor.data_ptr() + tensor.nbytes - start
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_POPULATE_READ) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_READ) failed")


def mmap_read_bandwidth(path: Path) -> float:
    """Bytes/s paging the mmapped file in through the page cache, releasing as it goes."""
    evict(path)
    size = path.stat().st_size
    mapped = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    start = time.perf_counter()
    for offset in range(0, size, 8 * CHUNK):
        chunk = mapped[offset:offset + 8 * CHUNK]
        page_in(chunk)
        release_pages(chunk, evict=mapped_file(chunk.data_ptr()))
    return size / (time.perf_counter() - start)


def status(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def disk_bytes_read() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("read_bytes"))


def child(opts) -> dict:
    """One measured run in this (fresh) process; the parent evicted the file just before."""
    max_seq_len = opts.prompt_tokens + opts.decode_steps + 1
    start = time.perf_counter()
    if opts.mode == "stream":
        model, _ = llama_models.load(opts.model_dir, device="cpu", max_seq_len=max_seq_len,
                                     max_memory=opts.max_memory, quantize=opts.quantize)
        streamer = model.block_streamer
        if streamer is None:
            sys.exit(f"the whole model fits in --max-memory {opts.max_memory}: nothing to stream")
    else:  # naive: the same reads, one slot, no read-ahead (unpacked: BlockStreamer needs the file's weights)
        model, _ = llama_models.load(opts.model_dir, device="cpu", max_seq_len=max_seq_len, pack=False)
        streamer = BlockStreamer(model, prefetch=0)
    load_s = time.perf_counter() - start
    tokens = torch.randint(0, model.params.vocab_size, (1, opts.prompt_tokens + opts.decode_steps),
                           generator=torch.Generator().manual_seed(0))
    passes = []  # (tokens in the pass, seconds, bytes read from disk, seconds waiting for reads)
    with torch.inference_mode():
        n = opts.prompt_tokens
        steps = [(0, n)] + [(p, p + 1) for p in range(n, n + opts.decode_steps)]  # a prefill, then decode steps
        for begin, end in steps:
            read, waited, start = disk_bytes_read(), streamer.waited_s, time.perf_counter()
            model(tokens[:, begin:end], begin)
            passes.append((end - begin, time.perf_counter() - start, disk_bytes_read() - read,
                           streamer.waited_s - waited))
    return dict(mode=opts.mode, resident_blocks=1 + streamer.prefetch, n_layers=model.params.n_layers, load_s=load_s,
                passes=passes, peak_rss=status("VmHWM:"),
                block_bytes=sum(t.nbytes for block in model.layers for t in streamed_tensors(block)))


def streamed_files(opts) -> list[Path]:
    """The files whose blocks are read each pass: the checkpoint, or with int8 the files load() wrote."""
    if opts.quantize:
        return sorted((opts.model_dir / "int8").glob("*.pth"))
    return [opts.model_dir / "consolidated.00.pth"]


def run_child(opts, mode: str) -> dict:
    # Dirty pages (int8 files just written) can be neither evicted nor read at full speed while
    # their writeback competes for the disk: write everything out first.
    os.sync()
    for path in [opts.model_dir / "consolidated.00.pth", *streamed_files(opts)]:
        evict(path)
    cmd = [sys.executable, __file__, str(opts.model_dir), "--child", mode, "--max-memory", opts.max_memory,
           "--prompt-tokens", str(opts.prompt_tokens), "--decode-steps", str(opts.decode_steps),
           *(["--quantize", opts.quantize] if opts.quantize else [])]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{mode} run failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


SECTION = "## Streaming a model bigger than memory (`--max-memory`, benchmarks/offload.py)"


def report(opts, load_average, bandwidths, prepare, stream, naive) -> str:
    files = streamed_files(opts)
    size = sum(path.stat().st_size for path in files)
    bandwidth = max(bandwidths.values())
    limit = size / bandwidth
    prefill, decode = stream["passes"][0], stream["passes"][1:]
    decode_s = sorted(p[1] for p in decode)[len(decode) // 2]  # the median pass
    budget = parse_memory(opts.max_memory)
    lines = [
        f"### {opts.model_dir.name}, --max-memory {opts.max_memory}"
        + (f", --quantize {opts.quantize}" if opts.quantize else ""),
        "",
        f"`{' '.join(['python', *sys.argv])}`  ",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {machine.describe()}, "
        f"load average before the run {load_average:.1f}, torch {torch.__version__}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| streamed: {files[0].name if len(files) == 1 else f'{files[0].parent.name}/*.pth (written by load)'}"
        f" | {size / 1e9:.2f} GB, {stream['n_layers']} blocks |",
        *(f"| disk read bandwidth, cache evicted: {way} | {bw / 1e9:.2f} GB/s |" for way, bw in bandwidths.items()),
        f"| limit: file size / the fastest bandwidth | {limit:.2f} s per pass |",
        f"| (what a pass must read, the blocks ({stream['block_bytes'] / 1e9:.2f} GB) / the fastest bandwidth) | "
        f"{stream['block_bytes'] / bandwidth:.2f} s |",
        f"| blocks resident at once (budget {budget / 1e9:.1f} GB) | {stream['resident_blocks']} |",
        f"| peak RSS of the process (VmHWM) | {stream['peak_rss'] / 1e9:.2f} GB |",
        f"| decode pass, streamed with read-ahead (median of {len(decode)}) | {decode_s:.2f} s = "
        f"{decode_s / limit:.2f}x the limit |",
        f"| prefill of {prefill[0]} tokens, one pass | {prefill[1]:.2f} s = "
        f"{prefill[1] / decode_s:.2f}x a decode pass |",
        f"| bytes read from disk per pass (prefill, decode passes) | "
        f"{', '.join(f'{p[2] / 1e9:.2f}' for p in stream['passes'])} GB |",
        f"| of each pass, seconds spent waiting for a block's read (prefill, decode passes) | "
        f"{', '.join(f'{p[3]:.2f}' for p in stream['passes'])} |",
    ]
    if prepare:
        lines.append(f"| load before the runs (the first ever quantizes each block into {files[0].parent.name}/; "
                     f"later ones map the files) | "
                     f"{prepare['load_s']:.1f} s, peak RSS {prepare['peak_rss'] / 1e9:.2f} GB |")
    if naive:
        naive_s = sorted(p[1] for p in naive["passes"][1:])[len(naive["passes"][1:]) // 2]
        lines.append(f"| naive decode pass: read a block, compute, release (median of {len(naive['passes']) - 1}) | "
                     f"{naive_s:.2f} s = {naive_s / limit:.2f}x the limit, peak RSS {naive['peak_rss'] / 1e9:.2f} GB |")
        lines.append(f"| naive prefill of {naive['passes'][0][0]} tokens | {naive['passes'][0][1]:.2f} s = "
                     f"{naive['passes'][0][1] / naive_s:.2f}x its decode pass |")
    lines += ["", "All passes, seconds (tokens): streamed "
              + ", ".join(f"{p[1]:.2f} ({p[0]})" for p in stream["passes"])
              + ("; naive " + ", ".join(f"{p[1]:.2f} ({p[0]})" for p in naive["passes"]) if naive else "") + ".", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="checkpoint directory (one consolidated.00.pth)")
    parser.add_argument("--max-memory", default="4GB", help="the budget passed to load() (default: 4GB)")
    parser.add_argument("--prompt-tokens", type=int, default=200, help="prefill length (default: 200)")
    parser.add_argument("--decode-steps", type=int, default=3, help="one-token passes to time (default: 3)")
    parser.add_argument("--quantize", choices=["int8"], help="int8 blocks, streamed from the files load() writes "
                        "once into MODEL_DIR/int8 (no naive run: that needs the blocks as file pages)")
    parser.add_argument("--append", type=Path, help="append the results to this markdown file")
    parser.add_argument("--child", choices=["prepare", "stream", "naive"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child == "prepare":  # int8: the first load writes the int8 files
        start = time.perf_counter()
        llama_models.load(opts.model_dir, device="cpu", max_memory=opts.max_memory, quantize=opts.quantize)
        print(json.dumps(dict(load_s=time.perf_counter() - start, peak_rss=status("VmHWM:"))))
        return
    if opts.child:
        opts.mode = opts.child
        print(json.dumps(child(opts)))
        return
    path = opts.model_dir / "consolidated.00.pth"
    load_average = os.getloadavg()[0]
    bandwidths = {"O_DIRECT 64 MiB reads, 4 KiB pages": direct_read_bandwidth(path, huge_pages=False),
                  "O_DIRECT 64 MiB reads, huge pages (the streamer's reader)": direct_read_bandwidth(path, huge_pages=True),
                  "mmap + MADV_POPULATE_READ (page cache)": mmap_read_bandwidth(path)}
    print(", ".join(f"{way}: {bw / 1e9:.2f} GB/s" for way, bw in bandwidths.items()), file=sys.stderr)
    prepare = run_child(opts, "prepare") if opts.quantize else None
    stream = run_child(opts, "stream")
    naive = None if opts.quantize else run_child(opts, "naive")
    text = report(opts, load_average, bandwidths, prepare, stream, naive)
    print(text)
    if opts.append:
        existing = opts.append.read_text() if opts.append.exists() else ""
        with open(opts.append, "a") as f:
            f.write(("" if KEEP_MARKER in existing else "\n" + KEEP_MARKER)
                    + ("" if SECTION in existing else f"\n{SECTION}\n") + "\n" + text)


if __name__ == "__main__":
    main()
