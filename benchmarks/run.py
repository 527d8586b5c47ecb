"""Benchmark this project against transformers and llama.cpp: same weights, same prompt token ids.

    python benchmarks/run.py                # SmolLM2-135M and a random Llama-3.2-1B shape -> benchmarks/RESULTS.md
    python benchmarks/run.py --quick        # a smoke test: 8 new tokens, one timed run
    python benchmarks/run.py --big          # memory of a random Llama-3.1-8B shape -> benchmarks/RESULTS-8b.md

`make bench` and `make bench-8b` first prepare what this reads in benchmarks/work/: each model as
a Meta checkpoint, a transformers directory (tools/hf_llama.py) and GGUF files at F32, BF16, Q8_0
and Q4_1 (tools/write_gguf.py). Each contender runs in a process of its own (benchmarks/contenders.py),
the contenders in turn, in 3 rounds (--rounds), so that a busy moment of the machine hits them
alike; the figures are medians of a contender's timed runs, and the ratios compare contenders of
this one run.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import machine  # noqa: E402  (beside this script)
from contenders import CONTENDERS, THREADS  # noqa: E402  (beside this script)
from llama_models import Tokenizer  # noqa: E402

WORK = Path(__file__).resolve().parent / "work"
ALL = list(CONTENDERS)
MODELS = {  # name -> (directory in WORK, what it is, contenders)
    # SmolLM2's 9 heads do not split over 2 processes.
    "smollm2": ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct, real weights (dequantized from Q4_1)",
                [name for name in ALL if CONTENDERS[name].processes == 1]),
    "1b": ("llama3.2-1b", "random weights, Llama-3.2-1B shape, Llama 3 tokenizer", ALL),
    "8b": ("llama3.1-8b", "random weights, Llama-3.1-8B shape (memory only)", ["ours-bf16", "ours-int8", "ours-int4"]),
}
# About 30 tokens with either vocabulary; every contender gets the same ids.
PROMPT = ("The history of the printing press begins in fifteenth-century Europe, where Johannes "
          "Gutenberg combined movable metal type with an oil-based ink and")
# Ratios reported: (ours, the other), each the same precision or the same library.
PAIRS = [("ours-fp32", "llama.cpp-F32"), ("ours-bf16", "llama.cpp-BF16"), ("ours-int8", "llama.cpp-Q8_0"),
         ("ours-int4", "llama.cpp-Q4_1"),
         ("ours-fp32", "transformers-fp32"), ("ours-bf16", "transformers-bf16"), ("ours-fp32", "recompute-fp32"),
         ("ours-bf16-2proc", "ours-bf16"), ("ours-bf16", "ours-bf16-unpacked"),
         ("ours-bf16-compile", "ours-bf16"), ("ours-int8-compile", "ours-int8"),
         ("ours-fp32-compile", "ours-fp32"), ("ours-int4-compile", "ours-int4"),
         ("ours-bf16-compile", "llama.cpp-BF16"), ("ours-int8-compile", "llama.cpp-Q8_0"),
         ("ours-fp32-compile", "llama.cpp-F32"), ("ours-int4-compile", "llama.cpp-Q4_1")]
# The baseline re-runs the whole sequence at every step, so its cost grows with the square of
# the length: on the 1B shape, 128 tokens take longer than all the other contenders together.
# One run of at most 32 new tokens shows the size of the gap; its tokens/s flatters it (a shorter
# sequence to re-run), so our speed-up over it is understated, not overstated.
SLOW = {"recompute-fp32"}
SLOW_NEW_TOKENS = 32
# The 8B shape's memory targets: bf16 should cost about the file size (the weights are mapped,
# not copied), int8 about half of it (quantized at load, the bf16 pages let go one by one).
RSS_TARGETS = {"8b": {"ours-bf16": 17e9, "ours-int8": 9.5e9}}


def memory_bandwidth() -> float:
    """Bytes per second read by summing a 1 GiB float32 tensor on all cores: the best of 10.

    Decoding one token streams every weight from memory once, so this is the ceiling of
    bytes-read-per-token x tokens-per-second. The best pass, not the median: a ceiling is what
    the machine can do, and other work on the machine only ever makes a pass slower.
    """
    torch.set_num_threads(THREADS)
    data = torch.ones(2**28)  # written once, so its pages are really there
    times = []
    for _ in range(10):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.nbytes / min(times)


def decode_weights(model_dir: Path) -> int:
    """Weights read per decoded token: every matrix but the embedding, of which one row is read."""
    state_dict = torch.load(model_dir / "consolidated.00.pth", mmap=True, weights_only=True)
    return sum(t.numel() for name, t in state_dict.items() if t.ndim == 2 and name != "tok_embeddings.weight")


def read_into_page_cache(paths: list) -> None:
    # Load time should be the library's work, not the disk's: a file another contender's run
    # pushed out of the page cache would otherwise be read from disk by this one.
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def run_contender(name: str, model_dir: Path, prompt: list, new_tokens: int, runs: int) -> dict:
    contender = CONTENDERS[name]
    read_into_page_cache(contender.engine.files(model_dir, contender.precision))
    launcher = [sys.executable]
    if contender.processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={contender.processes}"]
    command = launcher + [str(Path(__file__).with_name("contenders.py")), name, str(model_dir),
               "--prompt", ",".join(map(str, prompt)), "--new-tokens", str(new_tokens), "--runs", str(runs)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def leading_agreement(tokens: list, reference: list) -> int:
    count = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        count += 1
    return count


def table(results: dict, n_weights: int, bandwidth: float) -> list[str]:
    reference = results.get("ours-fp32", {}).get("tokens")
    lines = ["| contender | load s | first token s | first step s | peak RSS GB | prefill tok/s | decode tok/s "
             "| MB read/token | GB/s | % of bandwidth | tokens = ours-fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |")
            continue
        per_token = n_weights * CONTENDERS[name].bytes_per_weight
        decode = statistics.median(r["decode_tok_s"])
        compared = min(len(r["tokens"]), len(reference or []))
        agree = f"{leading_agreement(r['tokens'], reference)}/{compared}" if reference else "-"
        note = f" (1 run, {len(r['tokens'])} tokens)" if name in SLOW else ""
        lines.append(f"| {name}{note} | {r['load_s']:.2f} | {r['first_token_s']:.2f} | {r['first_step_s']:.2f} "
                     f"| {r['peak_rss'] / 1e9:.2f} "
                     f"| {statistics.median(r['prefill_tok_s']):.1f} | {decode:.1f} | {per_token / 1e6:.0f} "
                     f"| {per_token * decode / 1e9:.1f} | {100 * per_token * decode / bandwidth:.0f}% | {agree} |")
    return lines


def ratios(results: dict) -> list[str]:
    lines = []
    for ours, other in PAIRS:
        if "prefill_tok_s" not in results.get(ours, {}) or "prefill_tok_s" not in results.get(other, {}):
            continue
        speed = {key: statistics.median(results[ours][key]) / statistics.median(results[other][key])
                 for key in ("prefill_tok_s", "decode_tok_s")}
        memory = results[ours]["peak_rss"] / results[other]["peak_rss"]
        lines.append(f"- {ours} / {other}: decode {speed['decode_tok_s']:.2f}x, prefill "
                     f"{speed['prefill_tok_s']:.2f}x, peak RSS {memory:.2f}x")
    return lines


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 new tokens, 1 timed run")
    parser.add_argument("--big", action="store_true", help="the 8B shape only: memory and time to first token")
    parser.add_argument("--models", help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--contenders", help="comma-separated subset of: " + ", ".join(CONTENDERS))
    parser.add_argument("--new-tokens", type=int, help="greedy tokens per run (default: 128; --quick 8, --big 4)")
    parser.add_argument("--runs", type=int, help="timed runs per contender and round, after a warm-up "
                        "(default: 1)")
    parser.add_argument("--rounds", type=int, help="run every contender this many times in turn, pooling "
                        "their timed runs: a change in the machine's state hits them alike (default: 3; "
                        "--quick and --big 1)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: benchmarks/RESULTS.md, "
                        "with --big RESULTS-8b.md; none with --quick)")
    return parser.parse_args()


def measure(models: list, only: Optional[list], new_tokens: int, runs: int, rounds: int) -> dict:
    """Run each model's contenders (those in `only`, if given), all of them in turn in each of
    `rounds` rounds, a process each time: model -> (prompt, {contender: results}). A contender's
    timed runs of every round are pooled; its start-up figures are the first round's (where a
    compiled contender compiles), and `later_first_steps` the first steps of the later rounds."""
    measured = {}
    for model in models:
        directory, _, names = MODELS[model]
        prompt = Tokenizer(WORK / directory / "tokenizer.model").encode(PROMPT, bos=True, eos=False)
        names = [n for n in names if not only or n in only]
        measured[model] = prompt, {}
        results = measured[model][1]
        for round_ in range(1, rounds + 1):
            for name in names:
                if name in SLOW and round_ > 1:
                    continue
                print(f"{directory}: {name} (round {round_}/{rounds}) ...", file=sys.stderr, flush=True)
                if name in SLOW:
                    result = run_contender(name, WORK / directory, prompt, min(new_tokens, SLOW_NEW_TOKENS), 1)
                else:
                    result = run_contender(name, WORK / directory, prompt, new_tokens, runs)
                results[name] = pool(results[name], result) if name in results else result
    return measured


def pool(first: dict, later: dict) -> dict:
    """A contender's results of an earlier round, with a later round's timed runs added."""
    if "error" in first or "error" in later:
        return first if "error" in first else later
    return dict(first, prefill_tok_s=first["prefill_tok_s"] + later["prefill_tok_s"],
                decode_tok_s=first["decode_tok_s"] + later["decode_tok_s"],
                later_first_steps=first.get("later_first_steps", []) + [later["first_step_s"]])


def report(measured: dict, new_tokens: int, runs: int, rounds: int, loads: tuple, bandwidths: tuple) -> str:
    """RESULTS.md's text. loads, bandwidths: (at the start, at the end); the higher bandwidth is the ceiling."""
    (load_before, load_after), (bandwidth_before, bandwidth_after) = loads, bandwidths
    bandwidth = max(bandwidth_before, bandwidth_after)
    ram_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    lines = [
        "# Benchmark results", "",
        f"- command: `{' '.join([Path(sys.executable).name] + sys.argv)}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine.describe()}, {ram_gib:.0f} GiB RAM; load average (1 min) "
        f"{load_before:.2f} at the start, {load_after:.2f} at the end",
        f"- software: torch {torch.__version__}, transformers {version('transformers')}, "
        f"llama-cpp-python {version('llama_cpp_python')}, Python {platform.python_version()}",
        f"- memory read bandwidth: {bandwidth / 1e9:.1f} GB/s (sum of a 1 GiB float32 tensor on {THREADS} "
        f"threads, best of 10; {bandwidth_before / 1e9:.1f} at the start, {bandwidth_after / 1e9:.1f} at the end)",
        f"- {new_tokens} greedy new tokens per run; figures are medians of {runs} timed runs after a warm-up"
        + (f" in each of {rounds} rounds, the contenders in turn (a process each time)" if rounds > 1 else ""),
    ]
    for model, (prompt, results) in measured.items():
        directory, description, _ = MODELS[model]
        lines += ["", f"## {directory}: {description}", "", f"Prompt: {len(prompt)} tokens.", ""]
        lines += table(results, decode_weights(WORK / directory), bandwidth)
        lines += [""] + ratios(results)
        for name, r in results.items():
            if "later_first_steps" in r and (CONTENDERS[name].options or {}).get("compile"):
                lines.append(f"- {name}: first step {r['first_step_s']:.1f} s in the first round, "
                             f"{', '.join(f'{s:.1f}' for s in r['later_first_steps'])} s in the later ones "
                             f"(loading what the first compiled)")
        for name, target in RSS_TARGETS.get(model, {}).items():
            if "peak_rss" in results.get(name, {}):
                rss = results[name]["peak_rss"]
                verdict = "met" if rss <= target else "MISSED"
                lines.append(f"- {name} peak RSS {rss / 1e9:.2f} GB: target <= {target / 1e9:g} GB {verdict}")
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def main():
    opts = parse_options()
    short = opts.quick or opts.big
    new_tokens = opts.new_tokens or (8 if opts.quick else 4 if opts.big else 128)
    runs = opts.runs or 1
    rounds = opts.rounds or (1 if short else 3)
    models = opts.models.split(",") if opts.models else ["8b"] if opts.big else ["smollm2", "1b"]
    out = opts.out or (None if opts.quick else WORK.parent / ("RESULTS-8b.md" if opts.big else "RESULTS.md"))

    load_before, bandwidth_before = os.getloadavg()[0], memory_bandwidth()
    only = opts.contenders.split(",") if opts.contenders else None
    measured = measure(models, only, new_tokens, runs, rounds)
    # Measured again at the end: if other work slowed one measurement, the other may be clean.
    load_after, bandwidth_after = os.getloadavg()[0], memory_bandwidth()

    text = report(measured, new_tokens, runs, rounds, (load_before, load_after), (bandwidth_before, bandwidth_after))
    print(text)
    if out is not None:
        # Other benchmarks (benchmarks/offload.py) append their sections after KEEP_MARKER: keep them.
        kept = out.read_text().partition(KEEP_MARKER)[2] if out.exists() else ""
        out.write_text(text + "\n" + KEEP_MARKER + kept)
        print(f"wrote {out}", file=sys.stderr)
    if any("error" in r for _, results in measured.values() for r in results.values()):
        sys.exit("some contenders failed: see the table")


KEEP_MARKER = "<!-- Sections by other benchmarks follow; benchmarks/run.py keeps them when it rewrites the part above. -->\n"

NOTES = """\
How to read this:
- load s: building the model from files already in the page cache (imports not counted).
  first token s: load plus the first, cold prefill: what a user waits for. first step s: the
  first, cold decode step after it; for the -compile contenders it is the compile time, or the
  time to load what an earlier run compiled (llama_models.compiled keeps it in
  ~/.cache/llama_models/compiled, keyed by model, dtype, context size, threads, torch, CPU and code).
- peak RSS: the process's VmHWM, mmapped weight pages included; GB = 10^9 bytes.
- prefill tok/s: prompt tokens / time of the prompt's forward pass. decode tok/s: the timer
  starts once the first new token exists; new tokens after it / elapsed.
- MB read/token: the weights one decode step must read (every matrix except the embedding, of
  which one row is read; the KV cache, a few MB here, is left out), at the contender's bytes per
  weight (Q8_0: 34 bytes per 32 weights; Q4_1 and our int4: 20). GB/s = that x decode tok/s; % of bandwidth = GB/s over
  the read bandwidth above, the ceiling a decode step can approach.
- tokens = ours-fp32: how many of the greedy tokens agree with ours in float32 before the first
  difference (lower precisions may flip a near-tie and then diverge).
- recompute-fp32: our model with no KV cache, re-running the whole sequence every step (one
  run of at most 32 new tokens: its cost grows with the square of the length).
- ours-bf16 and ours-fp32 pack their linear weights for oneDNN (llama_models.packed, the CPU
  default); ours-bf16-unpacked is the same model with plain F.linear layers (load(pack=False)).
  -compile: the decode step through torch.compile with Inductor's freezing, max-autotune GEMM
  templates and C++ wrapper (llama_models.compiled); bf16 and fp32 weights stay packed for oneDNN.
- ours-bf16-2proc: the same bf16 model split over 2 processes by torchrun (gloo), 1 thread
  each instead of 2 threads in one process; peak RSS is the first process's alone."""


if __name__ == "__main__":
    main()
