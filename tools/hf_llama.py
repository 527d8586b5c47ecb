"""A Meta-format checkpoint as Hugging Face transformers' LlamaForCausalLM (the same weights).

    python tools/hf_llama.py META_DIR OUT_DIR    # writes config.json + model.safetensors

The tests compare our model with transformers' on the same weights (hf_llama), and the
benchmarks load OUT_DIR with LlamaForCausalLM.from_pretrained, the way transformers' users do.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_models.args import ModelArgs  # noqa: E402


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32):
    """transformers' LlamaConfig for the shape in `args`."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope.update(rope_type="llama3", factor=args.rope_scaling_factor, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps, rope_parameters=rope,
        max_position_embeddings=131072, tie_word_embeddings=False, torch_dtype=dtype,
    )


def hf_state_dict(args: ModelArgs, state_dict: dict) -> dict:
    """Meta's tensor names and layout -> Hugging Face's.

    Meta's RoPE rotates adjacent pairs (2i, 2i+1); HF's rotates (i, i + head_dim/2). So the rows
    of wq and wk are permuted per head, as transformers' convert_llama_weights_to_hf does.
    """
    def permute(w, n_heads):
        rows, cols = w.shape
        return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    hf = {"model.embed_tokens.weight": state_dict["tok_embeddings.weight"],
          "model.norm.weight": state_dict["norm.weight"], "lm_head.weight": state_dict["output.weight"]}
    for i in range(args.n_layers):
        m, p = f"layers.{i}.", f"model.layers.{i}."
        hf[p + "self_attn.q_proj.weight"] = permute(state_dict[m + "attention.wq.weight"], args.n_heads)
        hf[p + "self_attn.k_proj.weight"] = permute(state_dict[m + "attention.wk.weight"], args.n_kv_heads)
        hf[p + "self_attn.v_proj.weight"] = state_dict[m + "attention.wv.weight"]
        hf[p + "self_attn.o_proj.weight"] = state_dict[m + "attention.wo.weight"]
        hf[p + "mlp.gate_proj.weight"] = state_dict[m + "feed_forward.w1.weight"]
        hf[p + "mlp.down_proj.weight"] = state_dict[m + "feed_forward.w2.weight"]
        hf[p + "mlp.up_proj.weight"] = state_dict[m + "feed_forward.w3.weight"]
        hf[p + "input_layernorm.weight"] = state_dict[m + "attention_norm.weight"]
        hf[p + "post_attention_layernorm.weight"] = state_dict[m + "ffn_norm.weight"]
    return hf


def hf_llama(args: ModelArgs, state_dict: dict):
    """transformers' LlamaForCausalLM with the same weights, in float32."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_config(args)).float().eval()
    hf = hf_state_dict(args, state_dict)
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=True)
    return model


def save_hf(model_dir: Path, out_dir: Path) -> None:
    """Write a from_pretrained-loadable directory with the checkpoint's weights in its own dtype."""
    from safetensors.torch import save_file

    args = ModelArgs.from_params(json.loads((model_dir / "params.json").read_text()))
    state_dict = torch.load(model_dir / "consolidated.00.pth", mmap=True, weights_only=True)
    dtype = state_dict["tok_embeddings.weight"].dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config(args, dtype).save_pretrained(out_dir)
    # clone(): safetensors refuses tensors that share memory, and a tied checkpoint (SmolLM2)
    # stores tok_embeddings and output as one tensor; HF's config here keeps them untied.
    save_file({k: v.clone() for k, v in hf_state_dict(args, state_dict).items()},
              out_dir / "model.safetensors", metadata={"format": "pt"})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="Meta-format checkpoint directory (one shard)")
    parser.add_argument("out_dir", type=Path, help="directory to write config.json and model.safetensors into")
    opts = parser.parse_args()
    save_hf(opts.model_dir, opts.out_dir)
    print(f"wrote {opts.out_dir}")


if __name__ == "__main__":
    main()
