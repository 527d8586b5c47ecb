"""max_memory: transformer blocks streamed from the checkpoint file, checked against the OS's own counts.

What is resident is read from /proc/self/smaps (the pages of the checkpoint mapping that are in
this process), what was read from disk from /proc/self/io, what the page cache holds from
mincore(): never from the streamer's own bookkeeping.
"""

import ctypes
import errno
import gc
import mmap
import os
import re
import threading
from pathlib import Path

import pytest
import torch

import llama_models
import run_inference
from helpers import greedy_logits, run_script, tiny_params
from llama_models.offload import slot_layout, streamed_tensors
from llama_models.packed import PackedLinear, can_pack
from tools.make_checkpoint import make_checkpoint

# 16 blocks of 6.0 MB: big enough next to a page, the OS's unit of residency, that counting
# pages tells blocks apart, and a file (98 MB) big enough next to the kernel's readahead window.
PARAMS = tiny_params(dim=512, n_layers=16, n_heads=8, n_kv_heads=2, multiple_of=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("offload") / "model", PARAMS, seed=3)
    with open(path / "consolidated.00.pth", "rb") as f:
        os.fsync(f.fileno())  # dirty pages cannot be evicted: write them out first
    return path


def evict(model_dir):
    fd = os.open(model_dir / "consolidated.00.pth", os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def block_bytes(model):
    return sum(t.numel() * t.element_size() for t in streamed_tensors(model.layers[0]))


def kept_bytes(model):
    """The weights that stay resident: embeddings, norms, output head (all but the streamed blocks)."""
    everything = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return everything - len(model.layers) * block_bytes(model)


def load_streamed(model_dir, **kwargs):
    """load() with a budget that streams: what the too-small error says it needs, plus ~1.5 blocks.

    (A short KV cache: memory the probe allocated and freed may stay with the C heap, and count.)
    """
    kwargs.setdefault("max_seq_len", 128)
    with pytest.raises(ValueError, match="too small") as error:
        llama_models.load(model_dir, device="cpu", max_memory=1, **kwargs)
    amount, unit = re.search(r"needs at least ([0-9.]+) (MB|GB)", str(error.value)).groups()
    needed = float(amount) * {"MB": 1e6, "GB": 1e9}[unit]
    del error  # its traceback holds the model it was building, and that model's KV cache
    gc.collect()
    model, tokenizer = llama_models.load(model_dir, device="cpu", max_memory=int(needed + 10e6), **kwargs)
    assert model.block_streamer is not None and 1 + model.block_streamer.prefetch < PARAMS["n_layers"]
    return model, tokenizer


def mapping(address: int) -> tuple[int, int, int]:
    """(start, end, resident bytes in this process) of the mapping holding `address`, from /proc/self/smaps."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                inside = start <= address < end
            elif inside and line.startswith("Rss:"):
                return start, end, int(line.split()[1]) * 1024
    raise AssertionError("address not mapped")


class ResidencySampler:
    """The peak resident bytes of the mappings holding `addresses`, sampled by a thread every
    millisecond and by every block's hooks."""

    def __init__(self, model, addresses):
        self.addresses, self.peaks, self.running = addresses, [0] * len(addresses), True
        self.thread = threading.Thread(target=self._loop)
        for block in model.layers:
            block.register_forward_pre_hook(lambda *_: self.sample())
            block.register_forward_hook(lambda *_: self.sample())

    def sample(self):
        self.peaks = [max(peak, mapping(address)[2]) for peak, address in zip(self.peaks, self.addresses)]

    def _loop(self):
        while self.running:
            self.sample()
            threading.Event().wait(0.001)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def test_streamed_logits_tokens_and_beams_equal_in_memory(model_dir):
    # Streamed blocks keep plain linear layers (a packed copy would not be the file's pages): so
    # does the reference, where the CPU would pack them (bf16 with AVX512).
    reference, _ = llama_models.load(model_dir, device="cpu", max_batch_size=3, max_seq_len=128, pack=False)
    streamed, _ = load_streamed(model_dir, max_batch_size=3)
    prompt = [1, 50, 300, 7, 99, 12, 400, 3]
    with torch.inference_mode():
        expected, got = greedy_logits(reference, prompt, 12), greedy_logits(streamed, prompt, 12)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)  # the same weights, the same kernels: bit for bit
    beams = [run_inference.beam_search(m, prompt, beam_width=3, max_new_tokens=8, stop_tokens=set())
             for m in (reference, streamed)]
    assert beams[0] == beams[1]


def test_int8_blocks_are_written_once_then_streamed_with_the_same_logits(model_dir):
    reference, _ = llama_models.load(model_dir, device="cpu", quantize="int8")
    prompt = [1, 50, 300, 7, 99]
    with torch.inference_mode():
        expected = greedy_logits(reference, prompt, 6)
    for attempt in ("quantizes and writes model_dir/int8", "maps the files written before"):
        streamed, _ = load_streamed(model_dir, quantize="int8")
        weight = streamed.layers[3].feed_forward.w2.weight
        assert weight.dtype == torch.int8 and str(model_dir / "int8" / "layers.3.pth") in open("/proc/self/maps").read()
        with torch.inference_mode():
            got = greedy_logits(streamed, prompt, 6)
        assert all(torch.equal(a, b) for a, b in zip(expected, got)), attempt
        written = {p.name: p.stat().st_mtime_ns for p in (model_dir / "int8").iterdir()}
        if attempt.startswith("quantizes"):
            first = written
    assert written == first  # the second load wrote nothing
    assert sorted(written) == sorted([f"layers.{i}.pth" for i in range(PARAMS["n_layers"])] + ["source.json"])


def test_at_most_the_budgeted_blocks_are_resident(model_dir):
    streamed, _ = load_streamed(model_dir)
    resident = 1 + streamed.block_streamer.prefetch
    block, page = block_bytes(streamed), mmap.PAGESIZE
    # Between passes the weights are the mapped file's; while a block runs they are in the
    # streamer's slots, one anonymous mapping (found from its address; its size from smaps).
    in_file = streamed.layers[0].attention.wq.weight.data_ptr()
    slots_start, slots_end, _ = mapping(streamed.block_streamer.memory.data_ptr())
    elsewhere = []  # weights of a running block that are not in the slots' mapping
    for b in streamed.layers:  # after the streamer's own hook, which points the weights at a slot
        b.register_forward_pre_hook(lambda b, _: elsewhere.extend(
            t for t in streamed_tensors(b) if not slots_start <= t.data_ptr() < slots_end))
    with ResidencySampler(streamed, [in_file, slots_start]) as sampler, torch.inference_mode():
        greedy_logits(streamed, [1, 2, 3], 4)
    in_file_peak, slots_peak = sampler.peaks
    slot = slot_layout(streamed)[1]  # a block, each weight widened to whole disk blocks
    print(f"peak resident: slots {slots_peak / 1e6:.1f} MB for {resident} blocks of {block / 1e6:.1f} MB "
          f"(slots of {slot / 1e6:.2f} MB); the file's mapping {in_file_peak / 1e6:.1f} MB")
    assert not elsewhere
    # The slots hold `resident` blocks (their memory is touched at load, in huge pages of 2 MiB).
    assert resident * block <= slots_peak <= resident * slot + (2 << 20)
    # The file's mapping holds only the embeddings, norms and output head (kept), and pages a
    # streamed weight shares with them: a block's own pages are never touched there.
    assert in_file_peak <= kept_bytes(streamed) + sum(len(streamed_tensors(b)) for b in streamed.layers) * 2 * page

    # The same measurement on the in-memory model (unpacked: its weights stay pages of the
    # file) sees every block.
    reference, _ = llama_models.load(model_dir, device="cpu", pack=False)
    with ResidencySampler(reference, [reference.layers[0].attention.wq.weight.data_ptr()]) as sampler, \
            torch.inference_mode():
        greedy_logits(reference, [1, 2, 3], 1)
    assert sampler.peaks[0] >= len(reference.layers) * block


def disk_bytes_read() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("read_bytes"))


def pages_in_core(tensor: torch.Tensor) -> tuple[int, int]:
    """(pages of a mapped tensor in the OS page cache, its pages), from mincore."""
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    size = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    assert ctypes.CDLL(None).mincore(ctypes.c_void_p(start), ctypes.c_size_t(size), vec) == 0
    return sum(v & 1 for v in vec), len(vec)


def pages_cached(path: Path) -> int:
    """Pages of the file in the OS page cache, whether or not anyone maps them."""
    size = path.stat().st_size
    return pages_in_core(torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8))[0]  # reads nothing


def test_load_reads_the_output_head_not_the_first_pass(model_dir):
    # Every pass reads the output head whole: load() reads it, so that the first pass, often a
    # long prompt's prefill, waits only for blocks.
    gc.collect()
    evict(model_dir)
    streamed, _ = load_streamed(model_dir)
    cached, pages = pages_in_core(streamed.output.weight)
    assert cached == pages


def readahead_bytes(path: Path) -> int:
    """The kernel's readahead window for the disk holding `path`."""
    device = os.stat(path).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").read_text()) * 1024


def test_each_pass_reads_the_weights_once_and_the_page_cache_lets_go(model_dir):
    # Nothing else may map the file's pages, or the page cache could not drop them.
    gc.collect()
    evict(model_dir)
    streamed, _ = load_streamed(model_dir, max_batch_size=4)
    reads = streamed.block_streamer.loading.values()
    for read in reads:
        read.result()  # load() starts reading the first blocks
    before = disk_bytes_read()
    with torch.inference_mode():
        streamed(torch.randint(0, 512, (1, 40)), 0)  # a prefill of 40 tokens
        streamed.reorder_cache(torch.zeros(4, dtype=torch.long), 40)
        for pos in range(40, 43):
            streamed(torch.randint(0, 512, (4, 1)), pos)  # 4 beams, one pass per step
    for read in reads:
        read.result()  # and each pass ends reading the next one's first blocks
    block, n_blocks, resident = block_bytes(streamed), len(streamed.layers), 1 + streamed.block_streamer.prefetch
    read = disk_bytes_read() - before
    # 4 passes of all blocks, and nothing else: load() read the output head and norms, and the
    # embedding is read only at its tokens' rows.
    expected = 4 * n_blocks * block
    print(f"read {read / 1e6:.1f} MB from disk in 4 passes of {n_blocks} blocks of {block / 1e6:.1f} MB")
    # Not 40x (token by token) nor 4x (beam by beam). The kernel's readahead reads a little
    # around what is asked (re-reading, say, the end of the embedding as block 0 starts).
    assert 0.9 * expected <= read <= 1.15 * expected

    # The page cache keeps what is resident and what the kernel's readahead fetched beyond it
    # (blocks about to be read; we have seen up to ~4 of its windows), not the 4 x 16 blocks
    # read: without the eviction it would hold the whole file.
    path = model_dir / "consolidated.00.pth"
    cached = pages_cached(path) * mmap.PAGESIZE
    kept = kept_bytes(streamed)
    readahead = readahead_bytes(path)
    print(f"page cache holds {cached / 1e6:.1f} MB of the {path.stat().st_size / 1e6:.1f} MB file; {resident} "
          f"blocks + kept = {(resident * block + kept) / 1e6:.1f} MB, readahead window {readahead / 1e6:.1f} MB")
    assert cached <= resident * block + kept + 4 * readahead < path.stat().st_size


def test_without_o_direct_the_reads_go_through_the_page_cache_and_leave_it(model_dir, monkeypatch):
    # Some file systems refuse O_DIRECT (EINVAL): then the streamer reads through the page cache
    # and evicts what it read.
    real_open = os.open

    def no_o_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    prompt = [1, 50, 300, 7, 99]
    reference, _ = llama_models.load(model_dir, device="cpu")
    with torch.inference_mode():
        expected = greedy_logits(reference, prompt, 4)
    del reference  # unpacked (bf16 without AVX512), its weights are the file's pages, mapped: cached
    gc.collect()
    monkeypatch.setattr(os, "open", no_o_direct)
    evict(model_dir)
    streamed, _ = load_streamed(model_dir)
    with torch.inference_mode():
        got = greedy_logits(streamed, prompt, 4)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    path = model_dir / "consolidated.00.pth"
    assert pages_cached(path) * mmap.PAGESIZE <= kept_bytes(streamed) + 4 * readahead_bytes(path) < path.stat().st_size


def test_a_budget_too_small_is_a_clear_error(model_dir):
    with pytest.raises(ValueError, match=r"max_memory=1.0 MB is too small for this model: it needs at least "
                                         r"[0-9.]+ [MG]B \(this process now .* \+ 2 transformer blocks of 6.1 MB"):
        llama_models.load(model_dir, device="cpu", max_memory="1MB")
    with pytest.raises(ValueError, match="'4 parsecs' is not a size like 4GB"):
        llama_models.load(model_dir, device="cpu", max_memory="4 parsecs")
    with pytest.raises(ValueError, match=r"which holds torch.bfloat16; torch.float32 would be copies in memory"):
        llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_memory="1MB")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_budget_that_holds_the_whole_model_changes_nothing(model_dir, dtype):
    plain, _ = llama_models.load(model_dir, device="cpu", dtype=dtype, max_seq_len=32)
    budget, _ = llama_models.load(model_dir, device="cpu", dtype=dtype, max_seq_len=32, max_memory="64GB")
    assert budget.block_streamer is None
    # The same layers as without a budget (packed for oneDNN, on this x86 CPU), the same logits.
    assert [type(m) for m in budget.modules()] == [type(m) for m in plain.modules()]
    assert isinstance(budget.layers[0].attention.wq, PackedLinear) == can_pack(torch.device("cpu"), dtype)
    tokens = torch.tensor([[1, 50, 300, 7, 99]])
    with torch.inference_mode():
        assert torch.equal(budget(tokens, 0), plain(tokens, 0))


# Runs a script as `python SCRIPT ARGS` would, then prints the process's peak RSS (VmHWM: this
# process's own; getrusage's peak, which run_inference.py prints, starts from the parent's RSS
# when the child is forked from a big process such as pytest).
PEAK_RSS_AFTER = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")), file=sys.stderr)
"""


@pytest.mark.parametrize("script,extra", [
    ("minimal_run_inference.py", []),
    ("run_inference.py", ["--no-chat", "--decoding", "greedy"]),
    ("run_inference.py", ["--no-chat", "--decoding", "beam", "--beam-width", "3"]),
])
def test_scripts_stream_with_max_memory_and_print_the_same_text(model_dir, script, extra):
    args = ["--model-dir", str(model_dir), "--prompt", "Once upon a time", "--max-new-tokens", "12",
            "--device", "cpu", *extra]
    too_small = run_script(script, *args, "--max-memory", "1MB")
    assert too_small.returncode != 0 and "Traceback" not in too_small.stderr
    assert too_small.stderr.startswith("error: max_memory=1.0 MB is too small") and too_small.stderr.count("\n") == 1
    needed = float(re.search(r"needs at least ([0-9.]+) MB", too_small.stderr)[1]) * 1e6
    budget = int(needed + 10e6)  # two or three of the sixteen blocks
    streamed = run_script("-c", PEAK_RSS_AFTER, script, *args, "--max-memory", str(budget))
    in_memory = run_script(script, *args)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == in_memory.stdout and len(streamed.stdout) > len("Once upon a time")
    assert re.search(r"streaming 16 transformer blocks from disk, \d+ in memory at a time", streamed.stderr)
    whole = run_script(script, *args, "--max-memory", "64GB")
    assert whole.stdout == in_memory.stdout and "max_memory 64GB holds the whole model" in whole.stderr
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", streamed.stderr)[1]) * 1024
    assert peak <= budget
