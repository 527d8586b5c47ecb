"""What every script does around its lesson: help text, the prompt's source, one-line errors.

Plumbing, kept here once so that the scripts show only what they teach.
"""

import argparse
import contextlib
import os
import stat
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, error_message


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's line breaks and shows every flag's default."""


def add_model_flags(parser: argparse.ArgumentParser, device: str, dtype, threads: int) -> None:
    """--device, --dtype and --threads: where the model runs and in which precision.

    The defaults are the script's globals (DEVICE, DTYPE, THREADS), whose comments explain them.
    """
    parser.add_argument("--device", default=device, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=dtype,
                        help="weights, activations and KV cache dtype (default: bfloat16 on CPU)")
    parser.add_argument("--threads", type=int, default=threads, help="CPU threads")


def add_memory_flags(parser: argparse.ArgumentParser, quantize, max_memory, compile: bool) -> None:
    """--quantize, --max-memory and --compile: how the weights are stored, held and run.

    The defaults are the script's globals (QUANTIZE, MAX_MEMORY, COMPILE).
    """
    parser.add_argument("--quantize", choices=["int8", "int4"], default=quantize,
                        help="weight-only int8 or int4 (CPU) linear layers (one process only)")
    parser.add_argument("--max-memory", default=max_memory,
                        help="memory budget such as 4GB: stream transformer blocks from disk to stay within it")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=compile,
                        help="torch.compile the decode step (the first step compiles)")


def read_prompt(prompt: str, prompt_file) -> str:
    """The prompt: `prompt`, or the text of prompt_file ("-" reads standard input to its end).

    Raises ValueError for a file that cannot be read, or an empty prompt.
    """
    if prompt_file is not None:
        try:
            prompt = sys.stdin.read() if str(prompt_file) == "-" else Path(prompt_file).read_text()
            # A file or `echo` ends its text with a newline; the prompt is what comes before it.
            prompt = prompt.removesuffix("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the prompt from {prompt_file}: {e}") from None
    elif not sys.stdin.isatty() and _stdin_has_data():
        print("note: standard input is not read; pass --prompt-file - to use it as the prompt", file=sys.stderr)
    if not prompt.strip():
        raise ValueError(f"the prompt{f' in {prompt_file}' if prompt_file else ''} is empty")
    return prompt


def _stdin_has_data() -> bool:
    # A pipe or a file redirected in, as opposed to a terminal or /dev/null.
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or (stat.S_ISREG(mode) and os.fstat(sys.stdin.fileno()).st_size > 0)


class NonFiniteLogits(ValueError):
    """The model's output holds NaN or infinity: there is no sensible next token."""


def check_finite(logits: torch.Tensor, position: int, dtype: torch.dtype) -> torch.Tensor:
    """`logits`, after checking that they are all finite; else raise NonFiniteLogits naming the likely cause.

    NaN logits make argmax pick an arbitrary token (often the end of text) and sampling fail: the
    run would end silently with an empty or garbled answer. `dtype` is the model's: in float16 the
    usual cause is an activation beyond 65504, its largest value.
    """
    if not torch.isfinite(logits).all():
        cause = ("float16 cannot hold this model's activations (its largest value is 65504): "
                 "use bfloat16 or float32" if dtype == torch.float16 else
                 "the checkpoint's weights may hold NaN or infinity")
        raise NonFiniteLogits(f"the model's logits at position {position} are not finite (NaN or inf); {cause}")
    return logits


@contextlib.contextmanager
def user_errors(model_dir: Path, model_name: str):
    """Turn what a user can cause into one line and an exit code, never a traceback.

    A bad flag, a missing or broken checkpoint, non-finite logits: `error: ...` (or, for a missing
    checkpoint, where to get one), exit status 1. Ctrl-C: exit status 130, the shell's code for it.
    """
    try:
        yield
    except (ValueError, CheckpointError) as e:
        sys.exit(error_message(e, model_dir, model_name))
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        sys.exit(130)
