"""Stacked projections: the packed model's decode step with wq|wk|wv and w1|w3 stacked into one
matrix each (llama_models.packed, the CPU default) against the same model with every layer its own.

    python benchmarks/stacked.py ~/.llama/checkpoints/SmolLM2-135M-Instruct
    python benchmarks/stacked.py MODEL_DIR --out benchmarks/RESULTS-stacked.md

Both models are loaded in this one process and timed in alternating blocks of decode steps (the
same token at growing positions), so a change in the machine's state hits both alike; the table
gives medians over the blocks, and the ratio of each block pair. Eager decode steps, bf16 and
float32 (the dtypes packing applies to).
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama_models  # noqa: E402
import machine  # noqa: E402  (beside this script)
from llama_models import packed  # noqa: E402


def load(model_dir: Path, dtype: torch.dtype, stacked: bool):
    groups = packed.SAME_INPUT
    packed.SAME_INPUT = groups if stacked else ()  # () packs every layer on its own, as before stacking
    try:
        model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=dtype, max_seq_len=512)
    finally:
        packed.SAME_INPUT = groups
    attention = model.layers[0].attention
    assert (attention.wq.weight is attention.wk.weight) == stacked
    return model, tokenizer


def block_times(models: dict, prompt: list, blocks: int, steps: int) -> dict:
    """name -> seconds per decode step of each block, the models alternated block by block."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(torch.tensor([prompt]), 0)
        for _ in range(blocks):
            for name, model in models.items():
                start = time.perf_counter()
                for pos in range(len(prompt), len(prompt) + steps):
                    model.decode_step(torch.tensor([[prompt[-1]]]), pos)
                times[name].append((time.perf_counter() - start) / steps)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="decode steps per block")
    parser.add_argument("--out", type=Path, help="write the table to this markdown file")
    opts = parser.parse_args()

    lines = [f"## Stacked projections: {opts.model_dir.name}", "",
             f"{datetime.datetime.now().isoformat(timespec='minutes')}, {machine.describe()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}. Eager decode steps, "
             f"{opts.blocks} alternated blocks of {opts.steps}. Command: `python benchmarks/stacked.py "
             f"{opts.model_dir} --blocks {opts.blocks} --steps {opts.steps}`", "",
             "| dtype | stacked tok/s | separate tok/s | stacked / separate (median of block pairs) |",
             "|---|---:|---:|---:|"]
    for dtype in (torch.bfloat16, torch.float32):
        if not packed.can_pack(torch.device("cpu"), dtype):
            lines.append(f"| {dtype} | not packed on this CPU | | |")
            continue
        stacked, tokenizer = load(opts.model_dir, dtype, True)
        separate, _ = load(opts.model_dir, dtype, False)
        prompt = tokenizer.encode("Once upon a time", bos=True, eos=False)
        times = block_times({"stacked": stacked, "separate": separate}, prompt, opts.blocks, opts.steps)
        ratio = statistics.median(b / a for a, b in zip(times["stacked"], times["separate"]))
        lines.append(f"| {str(dtype).removeprefix('torch.')} | {1 / statistics.median(times['stacked']):.1f} | "
                     f"{1 / statistics.median(times['separate']):.1f} | {ratio:.2f}x |")
        del stacked, separate
    machine.publish(lines, opts.out)


if __name__ == "__main__":
    main()
