"""The machine a result was measured on, for the line every results file records beside it.

Which kernels run depends on the CPU's vector features (oneDNN packs bfloat16 weights only with
AVX512-BF16 or AMX; integer dot products need VNNI), so the features go with the model name.
"""

import os
import platform
from pathlib import Path

# /proc/cpuinfo flag -> how vendors write it; the ones that decide which kernels torch and llama.cpp use.
FEATURES = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
            "avx512_bf16": "AVX512-BF16", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


def cpu_features() -> str:
    flags = set((_cpuinfo("flags") or "").split())
    return ", ".join(name for flag, name in FEATURES.items() if flag in flags) or "none of " + ", ".join(FEATURES.values())


def describe() -> str:
    """E.g. 'AMD EPYC, 2 cores (`nproc`), AVX2' (this project's machine on 2026-12-03)."""
    return f"{cpu_model()}, {os.cpu_count()} cores (`nproc`), {cpu_features()}"


def _cpuinfo(key: str):
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == key), None)


def publish(lines: list, out) -> None:
    """A results file's lines: printed, and written to `out` when one is given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
