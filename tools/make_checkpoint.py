"""Write a random Meta-format checkpoint directory, for tests and benchmarks.

    python tools/make_checkpoint.py OUT_DIR --preset tiny
    python tools/make_checkpoint.py OUT_DIR --preset llama3.2-1b --tokenizer path/to/tokenizer.model
    python tools/make_checkpoint.py OUT_DIR --preset tiny --set n_kv_heads=1 --set use_scaled_rope=true

Writes params.json, consolidated.00.pth (bfloat16, Meta's tensor names) and tokenizer.model. The
weights are random, so the text is gibberish, but shapes, memory and speed are those of the real
model. Without --tokenizer, tokenizer.model is a byte-level vocabulary of 256 tokens (no merges),
which our Tokenizer extends with Llama 3's 256 special tokens: 512 ids, fine for any vocab_size.
"""

import argparse
import base64
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_models.args import ModelArgs  # noqa: E402

LLAMA3 = dict(vocab_size=128256, multiple_of=256, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                 norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=False),
    "llama3.2-1b": dict(LLAMA3, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5),
    "llama3.2-3b": dict(LLAMA3, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0),
    "llama3.1-8b": dict(LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                        multiple_of=1024),
}


def random_state_dict(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Meta's tensor names and shapes, random bf16 values (N(0, 0.02); norms near 1)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape, mean=0.0, std=0.02):
        return (torch.randn(*shape, generator=gen) * std + mean).to(torch.bfloat16)

    kv_dim, hidden = args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    sd = {"tok_embeddings.weight": normal(args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = normal(args.n_heads * args.head_dim, args.dim)
        sd[p + "attention.wk.weight"] = normal(kv_dim, args.dim)
        sd[p + "attention.wv.weight"] = normal(kv_dim, args.dim)
        sd[p + "attention.wo.weight"] = normal(args.dim, args.n_heads * args.head_dim)
        sd[p + "feed_forward.w1.weight"] = normal(hidden, args.dim)
        sd[p + "feed_forward.w2.weight"] = normal(args.dim, hidden)
        sd[p + "feed_forward.w3.weight"] = normal(hidden, args.dim)
        sd[p + "attention_norm.weight"] = normal(args.dim, mean=1.0, std=0.1)
        sd[p + "ffn_norm.weight"] = normal(args.dim, mean=1.0, std=0.1)
    sd["norm.weight"] = normal(args.dim, mean=1.0, std=0.1)
    sd["output.weight"] = normal(args.vocab_size, args.dim)
    return sd


def write_byte_tokenizer(path: Path) -> None:
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))


def make_checkpoint(out_dir, params: dict, *, seed: int = 0, tokenizer=None) -> Path:
    """Write params.json, consolidated.00.pth and tokenizer.model into out_dir; return it."""
    out_dir = Path(out_dir)
    args = ModelArgs.from_params(params)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    tmp = out_dir / "consolidated.00.pth.tmp"
    torch.save(random_state_dict(args, seed), tmp)
    os.replace(tmp, out_dir / "consolidated.00.pth")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out_dir / "tokenizer.model")
    else:
        write_byte_tokenizer(out_dir / "tokenizer.model")
    return out_dir


def parse_value(text: str):
    return json.loads(text) if text not in ("None", "none") else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (default: tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.json key, VALUE in JSON (e.g. n_kv_heads=1, use_scaled_rope=true)")
    parser.add_argument("--tokenizer", help="tokenizer.model to copy (e.g. Llama 3's); default: a byte-level one")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    opts = parser.parse_args()
    params = dict(PRESETS[opts.preset])
    for item in opts.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        params[key] = parse_value(value)
    out = make_checkpoint(opts.out_dir, params, seed=opts.seed, tokenizer=opts.tokenizer)
    size = (out / "consolidated.00.pth").stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB of weights)")


if __name__ == "__main__":
    main()
