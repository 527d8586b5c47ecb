"""Decode speed by CPU thread count and OpenMP wait policy, on an idle and on a busy machine.

    python benchmarks/threads.py ~/.llama/checkpoints/SmolLM2-135M-Instruct
    python benchmarks/threads.py MODEL_DIR --repeats 5 --append benchmarks/RESULTS-threads.md

Runs run_inference.py (greedy, a short prompt, --max-new-tokens tokens) in a fresh process for
every combination of --threads 1..cores and OMP_WAIT_POLICY (unset: libgomp spins a while before
sleeping; PASSIVE: sleeps at once; ACTIVE: spins), first alone, then next to a competing
CPU-bound process (one busy Python loop per --busy). The combinations are alternated within
each repetition, so a change in the machine's state hits all of them alike; the table gives
medians of the decode (and load) figures run_inference.py reports.
"""

import argparse
import datetime
import itertools
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import machine  # beside this script

REPO = Path(__file__).resolve().parent.parent
POLICIES = ["unset", "PASSIVE", "ACTIVE"]


def run_once(model_dir: Path, threads: int, policy: str, max_new_tokens: int, extra: list) -> tuple[float, float]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    result = subprocess.run([sys.executable, "run_inference.py", "--model-dir", str(model_dir), "--no-chat",
                             "--prompt", "The history of the city of Paris", "--max-new-tokens", str(max_new_tokens),
                             "--threads", str(threads), *extra],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    if result.returncode:
        sys.exit(f"run_inference.py failed:\n{result.stderr[-2000:]}")
    decode = float(re.search(r"decode: ([0-9.]+) tok/s", result.stderr).group(1))
    load = float(re.search(r"load: ([0-9.]+) s", result.stderr).group(1))
    return decode, load


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--busy", type=int, default=1, help="competing CPU-bound processes in the busy runs")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="pass --quantize to run_inference.py")
    parser.add_argument("--append", type=Path, help="append the table to this markdown file")
    opts = parser.parse_args()
    extra = ["--quantize", opts.quantize] if opts.quantize else []
    cores = os.cpu_count()
    combos = list(itertools.product(range(1, cores + 1), POLICIES))
    results = {}
    for state in ("idle", "busy"):  # the machine alone, then next to --busy CPU-bound processes
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(opts.busy if state == "busy" else 0)]
        try:
            for repeat in range(opts.repeats):
                for threads, policy in combos:
                    decode, load = run_once(opts.model_dir, threads, policy, opts.max_new_tokens, extra)
                    results.setdefault((state, threads, policy), []).append((decode, load))
                    print(f"{state} threads={threads} OMP_WAIT_POLICY={policy}: {decode:.1f} tok/s, load {load:.2f} s",
                          file=sys.stderr)
        finally:
            for hog in hogs:
                hog.kill()

    lines = [f"## Threads and OpenMP wait policy: {opts.model_dir.name}{', ' + opts.quantize if opts.quantize else ''}",
             "",
             f"{datetime.date.today()}, {machine.describe()}; busy = {opts.busy} competing CPU-bound process(es); "
             f"medians of {opts.repeats} alternated runs of {opts.max_new_tokens} new tokens. Command: "
             f"`python benchmarks/threads.py {opts.model_dir.name} --repeats {opts.repeats}"
             f"{' --quantize ' + opts.quantize if opts.quantize else ''}`",
             "",
             "| machine | threads | OMP_WAIT_POLICY | decode tok/s | vs default | load s |",
             "|---|---|---|---|---|---|"]
    for state in ("idle", "busy"):
        default = statistics.median(d for d, _ in results[(state, cores, "unset")])
        for threads, policy in combos:
            runs = results[(state, threads, policy)]
            decode = statistics.median(d for d, _ in runs)
            load = statistics.median(lo for _, lo in runs)
            lines.append(f"| {state} | {threads} | {policy} | {decode:.1f} | {decode / default:.2f}x | {load:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if opts.append:
        with open(opts.append, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
