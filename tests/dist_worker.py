"""Run under torchrun (or plain python) by test_model_parallel.py: load a checkpoint, then let
rank 0 save to OUT the float32 logits of a fixed prompt, and the tokens of greedy decoding,
seeded sampling (llama_models.generation) and beam search (run_inference.py)."""

import sys

import torch

import llama_models
import run_inference
from llama_models import generation

model_dir, out = sys.argv[1], sys.argv[2]
model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=64, max_batch_size=3)
prompt = [int(t) for t in torch.arange(1, 21).remainder(model.params.vocab_size)]
common = dict(max_new_tokens=12, stop_tokens=tokenizer.stop_tokens)
with torch.inference_mode():
    logits = model(torch.tensor([prompt]), 0)
results = {
    "logits": logits,
    "greedy": list(generation.greedy(model, prompt, **common)),
    "sample": list(generation.sample(model, prompt, temperature=1.0, top_k=50, top_p=0.95, seed=3, **common)),
    "beam": run_inference.beam_search(model, prompt, beam_width=3, **common),
    "world_size": torch.distributed.get_world_size(),
}
if torch.distributed.get_rank() == 0:
    torch.save(results, out)
