"""Write a large random Meta-format checkpoint without holding it in memory.

    python benchmarks/make_big_checkpoint.py benchmarks/work/llama3.1-8b --preset llama3.1-8b \
        --tokenizer .cache/meta-reference/models/llama3/tokenizer.model

The same files as tools/make_checkpoint.py (params.json, consolidated.00.pth in bfloat16,
tokenizer.model), made another way: make_checkpoint builds the whole state dict in memory before
saving it, 16 GB for an 8B model. Here each tensor lives in a scratch file mapped into memory
(torch.from_file): its pages go to disk as they fill and the kernel may drop them, so neither
filling nor torch.save needs more than a few hundred MB of RAM (and twice the disk, briefly).
The values follow make_checkpoint's distributions (N(0, 0.02); norms N(1, 0.1)), not its numbers.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_models import ModelArgs, Transformer, init_distributed  # noqa: E402
from tools.make_checkpoint import PRESETS  # noqa: E402

ROWS = 1024  # rows filled at a time: float32 temporaries of at most 1024 x 14336 x 4 = 59 MB


def fill(tensor: torch.Tensor, gen: torch.Generator, mean: float, std: float) -> None:
    rows = tensor.view(tensor.shape[0], -1)
    for start in range(0, rows.shape[0], ROWS):
        block = rows[start:start + ROWS]
        block.copy_(torch.randn(block.shape, generator=gen) * std + mean)


def make_big_checkpoint(out_dir: Path, params: dict, tokenizer: Path, seed: int = 0) -> None:
    # The tensor names and shapes of the model, from a model built on the meta device (no memory).
    init_distributed(torch.device("cpu"))
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Transformer(ModelArgs.from_params(params)).state_dict().items()}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    scratch = tmp / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, shape in shapes.items():
        tensor = torch.from_file(str(scratch / name), shared=True, size=shape.numel(),
                                 dtype=torch.bfloat16).view(shape)
        fill(tensor, gen, *((1.0, 0.1) if len(shape) == 1 else (0.0, 0.02)))
        state_dict[name] = tensor
    torch.save(state_dict, tmp / "consolidated.00.pth")
    del state_dict
    shutil.rmtree(scratch)
    (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    os.rename(tmp, out_dir)  # out_dir appears complete or not at all


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="directory to create")
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True, help="model shape")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.model to copy (Llama 3's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    opts = parser.parse_args()
    make_big_checkpoint(opts.out_dir, PRESETS[opts.preset], opts.tokenizer, opts.seed)
    print(f"wrote {opts.out_dir}")


if __name__ == "__main__":
    main()
