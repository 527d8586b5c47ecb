"""Test helpers: random checkpoints, Meta's reference model, Hugging Face conversions."""

import torch

from tools.hf_llama import hf_llama  # noqa: F401  (the tests import it from here)
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
