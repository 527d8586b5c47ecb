"""Speculative decoding on a real model: tokens per model pass, and decode speed against plain greedy.

    python benchmarks/speculative.py ~/.llama/checkpoints/SmolLM2-135M-Instruct
    python benchmarks/speculative.py MODEL_DIR --repeats 3 --out benchmarks/RESULTS-speculative.md

Every contender is a fresh `run_inference.py` process, greedy, on the same prompt and settings:

    plain             --decoding greedy
    lookup            --decoding speculative --draft prompt-lookup
    int4-draft        --decoding speculative --draft MODEL_DIR --draft-quantize int4
    plain-fp32        plain and lookup in float32 (--dtype float32)
    lookup-fp32
    plain-streamed    --decoding greedy, with a --max-memory budget that streams the model's blocks
    int4-streamed     int4-draft, the model streamed (the draft in memory)
    lookup-streamed   lookup, the model streamed

on two prompts: "repeat" asks to repeat a given paragraph word for word (what prompt lookup is
for), "open" asks for a story (nothing to copy). Within each repetition every contender runs
once, in turn, so that a change in the machine's load hits them all alike; each speed-up is the
median over repetitions of the ratio within a repetition. The disk bytes each process read come
from the OS (/proc/self/io), not from our code. The text of every speculative run is compared with
plain greedy's.

Then, in this process, the per-step costs that decide the speed-up: one step of the model, one
pass over k + 1 positions, one step of the int4 draft; and the speed-up they predict,
tokens per pass x t(step) / (k x t(draft step) + t(pass over k + 1)).
"""

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import machine  # beside this script

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than two hundred years. Every night its "
    "keeper climbed the narrow stairs, trimmed the wick and wound the clockwork that turned the great lens. "
    "Ships far out at sea saw the beam sweep across the water and knew where the rocks lay. When the keeper "
    "grew old, his daughter took over the work, and she kept the light burning through storms, fog and the "
    "long winter nights."
)
PROMPTS = {
    "repeat": "Repeat the following text exactly, word for word:\n\n" + PARAGRAPH,
    "open": "Write a short story about a lighthouse keeper.",
}

# Runs a script as `python SCRIPT ARGS` would, then prints what the OS counted: bytes read from
# storage (read_bytes: O_DIRECT reads of streamed blocks included).
WITH_IO_COUNTS = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    print(f"read_bytes {io['read_bytes']}", file=sys.stderr)
"""


def run_once(args: list) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-c", WITH_IO_COUNTS, "run_inference.py", *args],
                            capture_output=True, text=True, cwd=REPO, timeout=900)
    if result.returncode:
        sys.exit(f"run_inference.py {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout, result.stderr


def parse(stderr: str) -> dict:
    decode = re.search(r"decode: ([0-9.]+) tok/s \((\d+) tokens", stderr)
    out = {"tok_s": float(decode[1]), "tokens": int(decode[2]) + 1,
           "read_mb": int(re.search(r"read_bytes (\d+)", stderr)[1]) / 1e6}
    spec = re.search(r"speculative: (\d+) of (\d+) proposed tokens accepted.*?, ([0-9.]+) tokens per model pass "
                     r"\(\d+ tokens in (\d+) passes", stderr)
    if spec:
        out.update(kept=int(spec[1]), proposed=int(spec[2]), per_pass=float(spec[3]), passes=int(spec[4]))
    else:
        out.update(kept=0, proposed=0, per_pass=1.0, passes=out["tokens"] - 1)
    return out


def streaming_budget(common: list, extra: list) -> str:
    """A --max-memory that streams: what the too-small error says the process needs, plus 4 blocks."""
    result = subprocess.run([sys.executable, "run_inference.py", *common, *extra, "--max-memory", "1MB"],
                            capture_output=True, text=True, cwd=REPO, timeout=900)
    needed = re.search(r"needs at least ([0-9.]+) MB .* transformer blocks of ([0-9.]+) MB", result.stderr)
    if not needed:
        sys.exit(f"could not find the streaming budget:\n{result.stderr[-2000:]}")
    return f"{float(needed[1]) + 4 * float(needed[2]):.0f}MB"


def step_costs(model_dir: Path, k: int, threads: int, dtype: str, repeats: int = 15) -> dict:
    """Median seconds of: a one-token step of the model, a pass over k + 1 positions, a step of the int4 draft."""
    import torch

    import llama_models

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype)
    model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=dtype, max_seq_len=512)
    draft, _ = llama_models.load(model_dir, device="cpu", dtype=dtype, max_seq_len=512, quantize="int4")
    prompt_ids = tokenizer.encode(PROMPTS["repeat"], bos=True, eos=False)
    times = {"step": [], "pass": [], "draft step": []}
    with torch.inference_mode():
        for m in (model, draft):
            m(torch.tensor([prompt_ids]), 0)
        pos = len(prompt_ids)
        for _ in range(repeats):  # alternated, as the contenders are
            for name, m, n in (("step", model, 1), ("pass", model, k + 1), ("draft step", draft, 1)):
                start = time.perf_counter()
                m(torch.tensor([[42] * n]), pos)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=4, help="k")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the markdown results here")
    return parser.parse_args()


def contender_flags(model_dir: Path, k: int) -> dict:
    """The run_inference.py flags of each contender held in memory (the streamed ones depend on the prompt)."""
    int4_draft = ["--decoding", "speculative", "--draft", str(model_dir), "--draft-quantize", "int4",
                  "--draft-tokens", str(k)]
    lookup = ["--decoding", "speculative", "--draft", "prompt-lookup", "--draft-tokens", str(k)]
    fp32 = ["--dtype", "float32"]
    # No int4 draft in float32: int4 weights with float32 activations take a slow path (measured:
    # docs/benchmarks.md#int4-draft-in-float32); --dtype sets both models' dtype.
    return {"plain": [], "lookup": lookup, "int4-draft": int4_draft,
            "plain-fp32": fp32, "lookup-fp32": [*lookup, *fp32]}


def run_contenders(model_dir: Path, contenders: dict, repeats: int, max_new_tokens: int,
                   threads: int) -> tuple[dict, dict]:
    """Every contender on every prompt, alternated within each repetition. Returns
    (prompt, contender) -> [parsed runs], and (prompt, contender) -> the set of texts it printed."""
    rows = {}  # (prompt, contender) -> [parsed runs]
    texts = {}
    for prompt_name, prompt in PROMPTS.items():
        common = ["--model-dir", str(model_dir), "--chat", "--prompt", prompt, "--max-new-tokens",
                  str(max_new_tokens), "--threads", str(threads), "--device", "cpu"]
        flags = dict(contenders)
        for name in ("plain", "lookup", "int4-draft"):  # streaming reads the file's dtype: bf16 only
            flags[f"{name.split('-')[0]}-streamed"] = [*contenders[name], "--max-memory",
                                                       streaming_budget(common, contenders[name])]
        for repeat in range(repeats):
            for name, extra in flags.items():
                stdout, stderr = run_once([*common, *extra])
                if name.endswith("streamed") and "transformer blocks from disk" not in stderr:
                    sys.exit(f"{name} did not stream:\n{stderr[-2000:]}")
                rows.setdefault((prompt_name, name), []).append(parse(stderr))
                texts.setdefault((prompt_name, name), set()).add(stdout)
                print(f"{prompt_name} {name} #{repeat + 1}: {rows[(prompt_name, name)][-1]}", file=sys.stderr)
    return rows, texts


def results_table(rows: dict, texts: dict) -> list[str]:
    lines = [
        "| prompt | contender | decode tok/s | speed-up | accepted | tokens per model pass | disk MB / token | "
        "same text as plain greedy |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for (prompt_name, name), runs in rows.items():
        base = next(b for b in ("plain-streamed", "plain-fp32", "plain") if name.endswith(b.removeprefix("plain")))
        ratios = [r["tok_s"] / b["tok_s"] for r, b in zip(runs, rows[(prompt_name, base)])]
        kept, proposed = sum(r["kept"] for r in runs), sum(r["proposed"] for r in runs)
        same = texts[(prompt_name, name)] == texts[(prompt_name, "plain-fp32" if "fp32" in name else "plain")]
        lines.append(
            f"| {prompt_name} | {name} | {statistics.median(r['tok_s'] for r in runs):.1f} | "
            f"{statistics.median(ratios):.2f}x | {f'{kept / proposed:.0%}' if proposed else '-'} | "
            f"{statistics.median(r['per_pass'] for r in runs):.2f} | "
            f"{statistics.median(r['read_mb'] / r['tokens'] for r in runs):.1f} | {'yes' if same else 'NO'} |")
    return lines


def step_cost_lines(costs: dict, k: int) -> list[str]:
    lines = ["", "Per-step costs, in one process after the runs (int4 draft, medians of 15, alternated):", ""]
    for dtype, c in costs.items():
        lines.append(f"- {dtype}: one step of the model {c['step'] * 1e3:.1f} ms; a pass over k + 1 = {k + 1} "
                     f"positions {c['pass'] * 1e3:.1f} ms ({c['pass'] / c['step']:.2f}x a step); one step of the "
                     f"int4 draft {c['draft step'] * 1e3:.1f} ms ({c['draft step'] / c['step']:.2f}x)")
    return lines


def prediction_lines(rows: dict, costs: dict, k: int) -> list[str]:
    lines = ["", "What they predict for the in-memory runs: speed-up = tokens per pass x t(step) / cost of a pass, "
                 "where a pass with k guesses costs k x t(draft step) + t(pass over k + 1) and a pass without "
                 "(prompt lookup found nothing) costs t(step); f = the share of passes with guesses "
                 "(proposed / (k x passes)), the tokens per pass as measured above:", ""]
    for (prompt_name, name), runs in rows.items():
        if name.startswith(("lookup", "int4-draft")) and not name.endswith("streamed"):
            c = costs["float32" if name.endswith("fp32") else "bfloat16"]
            per_pass = sum(r["tokens"] - 1 for r in runs) / sum(r["passes"] for r in runs)
            f = min(1.0, sum(r["proposed"] for r in runs) / (k * sum(r["passes"] for r in runs)))
            draft_cost = k * c["draft step"] if name.startswith("int4") else 0.0
            cost = f * (draft_cost + c["pass"]) + (1 - f) * c["step"]
            lines.append(f"- {prompt_name}, {name}: {per_pass:.2f} x {c['step'] * 1e3:.1f} / "
                         f"({f:.2f} x ({draft_cost * 1e3:.1f} + {c['pass'] * 1e3:.1f}) + {1 - f:.2f} x "
                         f"{c['step'] * 1e3:.1f}) = {per_pass * c['step'] / cost:.2f}x")
    return lines


def main():
    opts = parse_options()
    model_dir = opts.model_dir.expanduser()
    k = opts.draft_tokens
    contenders = contender_flags(model_dir, k)
    load_before = os.getloadavg()
    started = datetime.datetime.now()
    rows, texts = run_contenders(model_dir, contenders, opts.repeats, opts.max_new_tokens, opts.threads)
    load_after = os.getloadavg()
    costs = {dtype: step_costs(model_dir, k, opts.threads, dtype) for dtype in ("bfloat16", "float32")}

    lines = [
        "# Speculative decoding on SmolLM2-135M-Instruct",
        "",
        f"Command: `python benchmarks/speculative.py {opts.model_dir} --repeats {opts.repeats} "
        f"--max-new-tokens {opts.max_new_tokens} --draft-tokens {k} --threads {opts.threads}`",
        "",
        f"Machine: {machine.describe()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}. Date: {started:%Y-%m-%d %H:%M}, "
        f"{(datetime.datetime.now() - started).seconds // 60} min. "
        f"Load average before: {load_before[0]:.2f}, {load_before[1]:.2f}, {load_before[2]:.2f}; "
        f"after: {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f}.",
        "",
        f"Greedy, bf16 (-fp32: float32), k = {k}, {opts.threads} thread(s), chat template, up to {opts.max_new_tokens} new tokens. "
        f"Medians of {opts.repeats} runs, contenders alternated; each ratio is the median of the per-repetition "
        f"ratios against `plain` (in memory) or `plain-streamed` (streamed). Disk MB/token: what the OS counted "
        f"the process reading (/proc/self/io read_bytes, load included) / new tokens.",
        "",
    ]
    lines += results_table(rows, texts) + step_cost_lines(costs, k) + prediction_lines(rows, costs, k)
    machine.publish(lines, opts.out)


if __name__ == "__main__":
    main()
