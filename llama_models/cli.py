"""What every script does around its lesson: its flags, its start, its one-line errors and endings.

Plumbing, kept here once so that the scripts show only what they teach. Each flag that several
scripts take is defined once, in FLAGS: its help, its default and the rule its value must follow
(an argparse type that refuses a bad value in one line). A script picks the flags it takes and
may give its own default for what its reader would edit (the prompt, the longest answer).
"""

import argparse
import contextlib
import difflib
import os
import re
import stat
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .device import resolve_device
from .generation import NonFiniteLogits

# Where Meta's downloader (`llama model download`) puts checkpoints, and the one the scripts run
# unless told otherwise.
LLAMA_MODELS_DIR = Path("~/.llama/checkpoints").expanduser()
MODEL_NAME = "Llama3.2-1B-Instruct"


def default_threads() -> int:
    """CPU threads for the matrix products: one per core but one (torch's default is one per core).

    Every product waits for its slowest thread, and when another program holds a core, that
    thread waits whole time slices: on a busy machine all cores decode far slower than all but
    one (benchmarks/RESULTS-threads.md). Decoding is bound by memory bandwidth, so the core left
    free costs little on an idle machine; there, pass --threads with all of them.
    """
    return max(1, torch.get_num_threads() - 1)


# --- value rules: argparse types whose error says what the value must be ---------------------

def _rule(convert, ok, requirement: str):
    def check(text: str):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value
    check.__name__ = convert.__name__  # argparse names it in "invalid int value: 'x'"
    return check


def at_least(low: int):
    return _rule(int, lambda n: n >= low, f"at least {low}")


OFF_OR_MORE = _rule(int, lambda n: n >= 0, "0 (off) or more")
NON_NEGATIVE = _rule(float, lambda x: x >= 0, "0 or more")
PROBABILITY = _rule(float, lambda p: 0 < p <= 1, "in (0, 1]")


# --- the shared flags ---------------------------------------------------------------------------

FLAGS = {
    # what to run
    "--model-dir": dict(type=Path, default=LLAMA_MODELS_DIR / MODEL_NAME,
                        help="checkpoint directory (params.json, consolidated.00.pth, tokenizer.model)"),
    "--prompt": dict(help="the text to continue (with --chat: the user's message)"),
    "--prompt-file": dict(help="read the prompt from this file instead; - reads standard input"),
    "--chat": dict(action=argparse.BooleanOptionalAction,
                   help="wrap the prompt in the chat template (unset: when the checkpoint folder's name contains 'instruct')"),
    "--system": dict(default="", help="system prompt, chat mode only"),
    "--max-new-tokens": dict(type=at_least(1), help="the most tokens to generate (chat.py: in one reply)"),
    "--max-seq-len": dict(type=at_least(1), default=2048,
                          help="KV cache length, allocated up front: prompt (or conversation) + new tokens"),
    # where and how it runs
    "--device": dict(default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"),
    "--dtype": dict(choices=["float32", "bfloat16", "float16"],
                    help="weights, activations and KV cache (default: bfloat16 on CPU and most GPUs)"),
    "--threads": dict(type=at_least(1), default=default_threads(),
                      help="CPU threads (one per core but one: see llama_models.cli.default_threads)"),
    "--quantize": dict(choices=["int8", "int4"],
                       help="weight-only int8 or int4 (CPU) linear layers, made at load time (one process only)"),
    "--max-memory": dict(help="memory budget such as 4GB: stream transformer blocks from disk to stay within it"),
    "--compile": dict(action=argparse.BooleanOptionalAction, default=False,
                      help="compile the decode step: minutes the first time, then cached (10-20 s a start); "
                           "pays in long generations on small models, most with --quantize "
                           "(docs/benchmarks.md#compiled-decoding)"),
    # how to choose each token: see llama_models.generation.sampling_distribution
    "--temperature": dict(type=NON_NEGATIVE, default=0.6, help="sample: divide logits by this; 0 = greedy"),
    "--top-k": dict(type=OFF_OR_MORE, default=0, help="sample: keep the k most likely tokens; 0 = all"),
    "--top-p": dict(type=PROBABILITY, default=0.9, help="sample: keep the most likely tokens up to this mass, in (0, 1]"),
    "--seed": dict(type=int, default=0, help="sample: seed of the draws (chat.py: of the first reply)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """--help keeps the module docstring's line breaks and shows every flag's default; a bad flag
    or value is one line, `error: --top-p must be in (0, 1], got 2.0`, and exit status 1."""

    def __init__(self, description: str):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        # argparse says "argument --top-p: must be ...": name the flag as the rule's subject.
        sys.exit("error: " + re.sub(r"^argument ([-\w]+)[^:]*: (must )", r"\1 \2", message))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        # A default of None means "decided at run time", which the help text says in words.
        return action.help if action.default is None else super()._get_help_string(action)


def add_flags(parser: argparse.ArgumentParser, *names: str, **defaults) -> None:
    """Add the shared flags `names` ("--model-dir", ...) to `parser`, each as FLAGS defines it;
    a keyword (max_new_tokens=512) gives the script's own default."""
    for name in names:
        definition = dict(FLAGS[name])
        dest = name.removeprefix("--").replace("-", "_")
        if dest in defaults:
            definition["default"] = defaults.pop(dest)
        parser.add_argument(name, **definition)
    if defaults:
        raise TypeError(f"defaults for flags not added: {', '.join(defaults)}")


# --- the start ----------------------------------------------------------------------------------

def start(threads: int, device: str) -> torch.device:
    """What every script does before loading a model: the CPU threads, then the device."""
    torch.set_num_threads(threads)
    return resolve_device(device)


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


MISSING_CHECKPOINT = """\
no Llama checkpoint in {model_dir} ({reason})
Get Meta's weights with `llama model download --source meta --model-id {name}` (llama-stack's
CLI, after requesting access at https://www.llama.com/llama-downloads), or download the original/
folder of a Hugging Face repo (e.g. `huggingface-cli download meta-llama/Llama-3.2-1B-Instruct
--include "original/*" --local-dir DIR`) and pass --model-dir DIR/original.
To see the scripts work right now with a small open model, run `make demo`."""


def checkpoint_dir(model_dir: Path) -> Path:
    """model_dir, checked to hold a checkpoint. The model you have is the default: when model_dir
    is the default one and missing, and LLAMA_MODELS_DIR holds exactly one checkpoint, that one
    (say so). Else ValueError saying where to get one, or, when its folder holds other
    checkpoints, their names (a typo is likelier than a missing download)."""
    model_dir = Path(model_dir).expanduser()
    if (model_dir / "params.json").is_file():
        return model_dir
    if not model_dir.exists():
        others = sorted(p.parent.name for p in model_dir.parent.glob("*/params.json"))
        if model_dir == LLAMA_MODELS_DIR / MODEL_NAME and len(others) == 1:
            print(f"note: no {MODEL_NAME} in {LLAMA_MODELS_DIR}; using {others[0]}, the one checkpoint there "
                  f"(--model-dir chooses)", file=sys.stderr)
            return model_dir.parent / others[0]
        if others:
            close = difflib.get_close_matches(model_dir.name, others, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"checkpoint directory {model_dir} not found; {hint}"
                             f"checkpoints in {model_dir.parent}: {', '.join(others)}")
    reason = "it has no params.json" if model_dir.is_dir() else "no such directory"
    raise ValueError(MISSING_CHECKPOINT.format(model_dir=model_dir, reason=reason, name=model_dir.name))


# --- the endings --------------------------------------------------------------------------------

@contextlib.contextmanager
def user_errors():
    """Around what a user's input decides (flags, files, the checkpoint): a ValueError or a
    CheckpointError is one line, `error: ...`, and exit status 1, never a traceback."""
    try:
        yield
    except (ValueError, CheckpointError) as e:
        sys.exit(f"error: {e}")


def run(main) -> None:
    """Run a script's main() to one of the endings a user expects, never a traceback:

    Ctrl-C: "[interrupted]" and exit status 130, the shell's code for it (what was printed stays);
    non-finite logits: one line and status 1; a reader that closes the pipe early
    (`... | head`): nothing more, and status 141, a shell's code for a closed pipe.
    """
    try:
        main()
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT
    except NonFiniteLogits as e:
        sys.exit(f"error: {e}")
    except BrokenPipeError:
        # Python would try to flush stdout again at exit and fail again: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE
