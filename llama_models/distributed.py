"""Start torch.distributed and fairscale's model parallelism, which the model's layers need."""

import atexit
import contextlib
import io
import os
import sys

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import initialize_model_parallel, model_parallel_is_initialized


def init_distributed(device: torch.device) -> None:
    """Join (or, alone, form) the process group and split the model across all its processes.

    With no launcher this makes a group of one process from an in-memory store: no environment
    variables, no free port, works on macOS and Windows. Under torchrun (which sets WORLD_SIZE,
    RANK, MASTER_ADDR, ...) it joins the launcher's group. gloo on CPU and MPS, nccl on CUDA.
    Calling it again is a no-op.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            # torch.distributed prefixes every line of an uncaught exception's traceback with
            # "[rank0]:", which tells processes apart under a launcher but only puzzles a reader
            # of a single process: keep Python's own hook.
            excepthook = sys.excepthook
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            sys.excepthook = excepthook
        # Leave the group before the interpreter exits: a process that exits with gloo's
        # threads still running can die with "terminate called without an active exception".
        atexit.register(dist.destroy_process_group)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not model_parallel_is_initialized():
        # fairscale announces each group it creates on stdout; keep the scripts' output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            initialize_model_parallel(dist.get_world_size())


def print_on_first_process_only() -> None:
    """Under torchrun every process runs the same decode loop and gets the same tokens; silence
    all but the first, so the text is printed once."""
    if dist.get_rank() > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
