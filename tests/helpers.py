"""Test helpers: random checkpoints, Meta's reference model, Hugging Face conversions."""

import torch

from tools.make_checkpoint import PRESETS, make_checkpoint


def tiny_params(**overrides) -> dict:
    return dict(PRESETS["tiny"], **overrides)


def checkpoint(tmp_path, seed=0, **overrides):
    """A random tiny checkpoint dir; overrides change params.json keys."""
    return make_checkpoint(tmp_path, tiny_params(**overrides), seed=seed)


def fp32_state_dict(model_dir):
    sd = torch.load(model_dir / "consolidated.00.pth", weights_only=True)
    return {k: v.float() for k, v in sd.items()}


def meta_transformer(params: dict, state_dict, *, max_seq_len=128, max_batch_size=4, dtype=torch.float32):
    """Meta's reference Transformer (llama-models 0.3.0) holding `state_dict` in `dtype`."""
    from models.llama3.args import ModelArgs as MetaArgs
    from models.llama3.model import Transformer as MetaTransformer

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # Meta builds its KV cache in the default dtype
    try:
        model = MetaTransformer(MetaArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size))
    finally:
        torch.set_default_dtype(previous)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()})
    return model


def hf_llama(args, state_dict):
    """transformers' LlamaForCausalLM with the same weights, in float32.

    Meta's RoPE rotates adjacent pairs (2i, 2i+1); HF's rotates (i, i + head_dim/2). So the rows
    of wq and wk are permuted per head, as transformers' convert_llama_weights_to_hf does.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def permute(w, n_heads):
        rows, cols = w.shape
        return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope.update(rope_type="llama3", factor=args.rope_scaling_factor, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps, rope_parameters=rope,
        max_position_embeddings=131072, tie_word_embeddings=False, torch_dtype=torch.float32,
    )
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
    model = LlamaForCausalLM(config).float().eval()
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=True)
    return model
