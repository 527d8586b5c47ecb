"""A compiled decode step worth turning on: what Inductor is asked to do, and where its work is kept.

Eagerly, a decode step is a few hundred small kernel calls (4 to 7 matrix products and ~20 small
ops a block), each dispatched from Python; on a CPU a small model spends much of a step between them.
torch.compile traces the step into one graph and Inductor, its compiler, writes C++ for it:
  - freezing: the weights become constants of the graph, and what depends on them alone is
    computed once, when compiling;
  - max_autotune, with its C++ GEMM templates: for each matrix product Inductor writes itself
    (the weight-only int8 and int4 layers' among them), several kernels are generated and timed on
    this machine, and the fastest kept. bf16 and float32 linear layers stay packed for oneDNN
    (llama_models.packed) and are called as they are: measured, that beat leaving them to
    Inductor (docs/benchmarks.md#compiled-decoding), and the eager prefill keeps them fast;
  - the C++ wrapper: the code between the kernels is C++ too, no Python on the way.
That search is why the first compile takes minutes. Inductor keeps what it made on disk; the
directory is keyed by everything that would make the result wrong or slow elsewhere, or compile
it again: the checkpoint's files, the dtype and quantization, the KV cache's size (a shape of the
graph), the number of threads, torch's version, the CPU, and this package's code.
A later run with the same key loads the compiled step: tens of seconds, not minutes.
"""

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from .quantize import QUANTIZED_LINEARS

# Inductor's options on the CPU (torch.compile(options=...)); on a GPU its defaults.
CPU_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "cpp_wrapper": True}
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "llama_models" / "compiled"


def compile_decode_step(model, model_dir: Path) -> None:
    """Compile `model`'s decode step (Transformer.compile_decode_step), its compiled code kept in
    a directory of CACHE_ROOT keyed for this model and machine; say on stderr whether this run
    compiles (minutes, once) or loads a step compiled before."""
    if model.block_streamer is not None or fs_init.get_model_parallel_world_size() > 1:
        print("--compile: the decode step stays eager: streamed blocks and torchrun's processes are not compiled",
              file=sys.stderr)
        return
    cache = CACHE_ROOT / cache_key(model, model_dir)
    if cache.is_dir() and any(cache.iterdir()):
        print(f"--compile: loading the decode step compiled before, from {cache}", file=sys.stderr)
    else:
        print(f"--compile: compiling the decode step at the first one, once: a few minutes, as Inductor "
              f"times its kernels on this machine; kept in {cache}", file=sys.stderr)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # where Inductor reads and writes its caches
    model.compile_decode_step(CPU_OPTIONS if model.device.type == "cpu" else None)


def cache_key(model, model_dir: Path) -> str:
    """A short hash of what the compiled code depends on."""
    model_dir = Path(model_dir).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in model_dir.iterdir() if p.suffix in (".pth", ".json"))
    quantized = sorted({name for name, layer in QUANTIZED_LINEARS.items()
                        if any(isinstance(m, layer) for m in model.modules())})
    what = dict(checkpoint=str(model_dir), files=files, dtype=str(model.dtype), quantized=quantized,
                cache=[model.params.max_batch_size, model.params.max_seq_len],
                device=str(model.device), threads=torch.get_num_threads(), torch=torch.__version__,
                python=sys.version.split()[0], cpu=_cpu(), code=_code())
    return f"{model_dir.name}-{hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]}"


def _code() -> str:
    """A hash of llama_models' source: the model's code is what gets compiled."""
    sources = sorted(Path(__file__).parent.glob("*.py"))
    return hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()


def _cpu() -> str:
    """The CPU's model and instruction sets: Inductor's kernels are built for this one."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()
