"""Which device to run on, the dtype that suits it, and how much memory it has free."""

import os
from typing import Optional

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda, else mps, else cpu; any other name is checked to be usable here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (try auto, cpu, cuda, cuda:1, mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ValueError(f"device {name!r} is not available on this machine")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    # CPU: bfloat16. Decoding one token reads every weight once, so speed follows bytes read, and
    # bf16 reads half of float32's. It is also the dtype Meta ships, so loading needs no copy
    # (memory stays at the file size). On a CPU with native bf16 instructions, a matrix-vector
    # product reads bf16 at least as many bytes per second as fp32, so more than twice the weights
    # per second, packed (llama_models.packed) or not (measured:
    # docs/benchmarks.md#bf16-and-packed-weights). On a CPU without them, try --dtype float32.
    # CUDA: bfloat16 where supported (Meta's choice), else float16. MPS: float16, the dtype
    # Apple's GPU kernels are built for (bf16 needs macOS 14+). Neither measured here (no GPU).
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a new allocation on `device` can take without pushing anything out: free GPU memory,
    or Linux's MemAvailable (free RAM plus caches it can drop). None where it is not known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None
