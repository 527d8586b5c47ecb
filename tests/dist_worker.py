"""Run under torchrun (or plain python) by test_model_parallel.py: load a checkpoint, compute
float32 logits of a fixed prompt and 12 greedy tokens, and let rank 0 save them to OUT."""

import sys

import torch

import llama_models

model_dir, out = sys.argv[1], sys.argv[2]
model, _ = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=64)
prompt = torch.arange(1, 21).remainder(model.params.vocab_size)[None]  # (1, 20)
with torch.inference_mode():
    logits = model(prompt, 0)
    tokens, step = [], logits
    for pos in range(20, 32):
        tokens.append(int(step[0, -1].argmax()))
        step = model(torch.tensor([[tokens[-1]]]), pos)
if torch.distributed.get_rank() == 0:
    torch.save({"logits": logits, "tokens": tokens, "world_size": torch.distributed.get_world_size()}, out)
