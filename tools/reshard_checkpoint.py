"""Split a Meta-format checkpoint into N model-parallel shards, or merge shards into one.

    python tools/reshard_checkpoint.py IN_DIR OUT_DIR --shards 2   # consolidated.00.pth, .01.pth
    python tools/reshard_checkpoint.py IN_DIR OUT_DIR --shards 1   # merge back into one file

The shards follow Meta's layout (see llama_models.checkpoint.SPLIT_DIM): what the shard files of
Llama 3.1 70B (8 shards) look like. The other files (params.json, tokenizer files) are copied.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_models.args import ModelArgs  # noqa: E402
from llama_models.checkpoint import CheckpointError, _read_state_dict, reshard  # noqa: E402


def reshard_checkpoint(in_dir, out_dir, n_shards: int) -> list[Path]:
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    args = ModelArgs.from_params(json.loads((in_dir / "params.json").read_text()))
    if args.n_kv_heads % n_shards:
        raise ValueError(f"{n_shards} shards would split {args.n_kv_heads} kv heads unevenly; Meta's "
                         f"checkpoints never do (processes beyond n_kv_heads replicate them at load time)")
    paths = sorted(in_dir.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"no consolidated.*.pth in {in_dir}")
    shards = [_read_state_dict(path) for path in paths]
    out_dir.mkdir(parents=True, exist_ok=False)
    for rank in range(n_shards):
        # clone(): a slice still points into the whole mmapped input, and torch.save would
        # write all of that storage, not just the slice.
        shard = {name: t.clone() for name, t in reshard(shards, rank, n_shards, args).items()}
        torch.save(shard, out_dir / f"consolidated.{rank:02d}.pth")
    for path in in_dir.iterdir():
        if path.is_file() and not path.name.startswith("consolidated."):
            shutil.copyfile(path, out_dir / path.name)
    return sorted(out_dir.iterdir())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_dir", type=Path, help="checkpoint directory to read")
    parser.add_argument("out_dir", type=Path, help="new directory to write (must not exist)")
    parser.add_argument("--shards", type=int, required=True, help="number of shards to write (1 merges)")
    opts = parser.parse_args()
    if opts.shards < 1:
        parser.error("--shards must be at least 1")
    try:
        written = reshard_checkpoint(opts.in_dir, opts.out_dir, opts.shards)
    except (CheckpointError, ValueError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    print(f"wrote {opts.shards} shard(s) to {opts.out_dir}:")
    for path in written:
        print(f"  {path.name}  {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
