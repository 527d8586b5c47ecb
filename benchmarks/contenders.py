"""One benchmark contender in a process of its own: load, warm up, then time prefill and decode.

    python benchmarks/contenders.py ours-bf16 benchmarks/work/llama3.2-1b --prompt 128000,791,6864 \
        --new-tokens 128 --runs 3

Prints one line of JSON (the measurements) on stdout; benchmarks/run.py starts one such process
per contender, so each peak RSS is that contender's alone and no allocator state, thread pool or
library loaded by another contender carries over.

Every contender decodes greedily from the same prompt token ids, one token per step, with its
own cache of past keys and values (except the full-recompute baseline). Each exposes the same two
calls: prefill(prompt ids) -> first new token, decode(last token) -> next token. Importing the
library happens in the constructor, outside the load time; load() reads the weights.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # llama_models, when run as a script

# The machine's cores, as `nproc` counts them; every contender computes on all of them (split
# evenly between the processes of a model-parallel run, which torchrun tells us by WORLD_SIZE).
THREADS = len(os.sched_getaffinity(0)) // int(os.environ.get("WORLD_SIZE", 1))
# Warm-up decode steps, after a warm-up prefill: the first use of each weight is slow (page
# faults on mmapped files, first-touch allocations, kernel selection); we time the steady state.
WARMUP_STEPS = 8


class Ours:
    """This project's model with its preallocated KV cache: prefill once, then one token a step."""

    def __init__(self):
        import torch

        import llama_models

        torch.set_num_threads(THREADS)
        self.torch, self.llama_models = torch, llama_models

    @staticmethod
    def files(work: Path, dtype: str) -> list:
        return [work / "consolidated.00.pth"]

    def load(self, work: Path, dtype: str, max_seq_len: int, quantize=None, pack=True, compile=False):
        self.model, _ = self.llama_models.load(work, device="cpu", dtype=getattr(self.torch, dtype),
                                               max_seq_len=max_seq_len, quantize=quantize, pack=pack)
        if compile:  # as --compile does: compiles at the first decode step, or loads what it compiled before
            from llama_models import compiled

            compiled.compile_decode_step(self.model, work)

    def _next_token(self, tokens: list, start_pos: int, forward=None) -> int:
        with self.torch.inference_mode():
            logits = (forward or self.model)(self.torch.tensor([tokens]), start_pos)  # (1, len(tokens), vocab)
        return int(logits[0, -1].argmax())

    def prefill(self, prompt: list) -> int:
        self.pos = len(prompt)  # prefill at position 0 overwrites whatever the cache held
        return self._next_token(prompt, 0)

    def decode(self, token: int) -> int:
        self.pos += 1
        return self._next_token([token], self.pos - 1, self.model.decode_step)


class Recompute(Ours):
    """The naive way, as a baseline: every step re-runs the whole sequence from position 0."""

    def prefill(self, prompt: list) -> int:
        self.tokens = list(prompt)
        return self._next_token(self.tokens, 0)

    def decode(self, token: int) -> int:
        self.tokens.append(token)
        return self._next_token(self.tokens, 0)


class Transformers:
    """transformers' LlamaForCausalLM, loaded the way its users do, with its default KV cache."""

    def __init__(self):
        import torch
        import transformers

        torch.set_num_threads(THREADS)
        self.torch, self.transformers = torch, transformers

    @staticmethod
    def files(work: Path, dtype: str) -> list:
        return sorted(hf_dir(work).glob("*.safetensors"))

    def load(self, work: Path, dtype: str, max_seq_len: int):
        self.model = self.transformers.LlamaForCausalLM.from_pretrained(
            hf_dir(work), dtype=getattr(self.torch, dtype)).eval()

    def _next_token(self, tokens: list) -> int:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([tokens]), past_key_values=self.cache, use_cache=True)
        return int(out.logits[0, -1].argmax())

    def prefill(self, prompt: list) -> int:
        self.cache = self.transformers.DynamicCache()
        return self._next_token(prompt)

    def decode(self, token: int) -> int:
        return self._next_token([token])


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level eval of token ids (no sampler, no text)."""

    def __init__(self):
        import llama_cpp
        import numpy

        self.llama_cpp, self.numpy = llama_cpp, numpy

    @staticmethod
    def files(work: Path, gguf_type: str) -> list:
        return [gguf_path(work, gguf_type)]

    def load(self, work: Path, gguf_type: str, max_seq_len: int):
        self.llm = self.llama_cpp.Llama(str(gguf_path(work, gguf_type)), n_ctx=max_seq_len, n_batch=max_seq_len,
                                        n_threads=THREADS, n_threads_batch=THREADS, verbose=False)

    def _eval(self, tokens: list) -> int:
        self.llm.eval(tokens)
        # Llama.eval keeps no logits unless asked for all positions' (logits_all): read the last
        # position's straight from llama.cpp, as its own sampler does.
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.numpy.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),)).argmax())

    def prefill(self, prompt: list) -> int:
        self.llm.reset()  # forget the previous run: the next eval starts at position 0
        return self._eval(prompt)

    def decode(self, token: int) -> int:
        return self._eval([token])


@dataclass
class Contender:
    engine: type  # one of the classes above
    precision: str  # passed to the engine: a torch dtype name or a GGUF type
    bytes_per_weight: float  # what decoding one token reads per weight of a linear layer
    options: dict = None  # further keyword arguments of the engine
    processes: int = 1  # > 1: model-parallel, launched by torchrun (ours only)


# Q8_0 stores blocks of 32 int8 weights with one float16 scale: 34 bytes per 32 weights. Q4_1
# stores 32 4-bit weights with a float16 scale and minimum (20 bytes), as our int4 does in bf16.
CONTENDERS = {
    "ours-bf16": Contender(Ours, "bfloat16", 2),
    "ours-fp32": Contender(Ours, "float32", 4),
    "ours-int8": Contender(Ours, "bfloat16", 1, {"quantize": "int8"}),
    "ours-int4": Contender(Ours, "bfloat16", 20 / 32, {"quantize": "int4"}),
    "ours-bf16-compile": Contender(Ours, "bfloat16", 2, {"compile": True}),
    "ours-int8-compile": Contender(Ours, "bfloat16", 1, {"quantize": "int8", "compile": True}),
    "ours-fp32-compile": Contender(Ours, "float32", 4, {"compile": True}),
    "ours-int4-compile": Contender(Ours, "bfloat16", 20 / 32, {"quantize": "int4", "compile": True}),
    "ours-bf16-unpacked": Contender(Ours, "bfloat16", 2, {"pack": False}),
    "ours-bf16-2proc": Contender(Ours, "bfloat16", 2, processes=2),
    "recompute-fp32": Contender(Recompute, "float32", 4),
    "transformers-bf16": Contender(Transformers, "bfloat16", 2),
    "transformers-fp32": Contender(Transformers, "float32", 4),
    "llama.cpp-BF16": Contender(LlamaCpp, "BF16", 2),
    "llama.cpp-F32": Contender(LlamaCpp, "F32", 4),
    "llama.cpp-Q8_0": Contender(LlamaCpp, "Q8_0", 34 / 32),
    "llama.cpp-Q4_1": Contender(LlamaCpp, "Q4_1", 20 / 32),
}


# Where `make bench` puts each form of a model named by its Meta-format directory `work`.
def hf_dir(work: Path) -> Path:
    return work.with_name(work.name + "-hf")


def gguf_path(work: Path, gguf_type: str) -> Path:
    return work.with_name(f"{work.name}-{gguf_type}.gguf")


def peak_rss_bytes() -> int:
    # VmHWM: the most resident memory this process ever had, mmapped file pages included (a
    # weight read from a mapped checkpoint is memory the model uses, just like a copied one).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def generate(engine, prompt: list, new_tokens: int) -> tuple[list, float, float]:
    """Greedy tokens, prefill seconds, and seconds of the new_tokens - 1 decode steps."""
    start = time.perf_counter()
    tokens = [engine.prefill(prompt)]
    first = time.perf_counter()  # the decode timer starts once the first new token exists
    while len(tokens) < new_tokens:
        tokens.append(engine.decode(tokens[-1]))
    return tokens, first - start, time.perf_counter() - first


def measure(name: str, work: Path, prompt: list, new_tokens: int, runs: int) -> dict:
    contender = CONTENDERS[name]
    engine = contender.engine()
    start = time.perf_counter()
    engine.load(work, contender.precision, len(prompt) + new_tokens, **(contender.options or {}))
    load_s = time.perf_counter() - start
    # The first prefill and decode step, timed apart: first uses are slow, and a compiled
    # contender compiles in its first decode step.
    start = time.perf_counter()
    token = engine.prefill(prompt)
    cold_prefill_s = time.perf_counter() - start
    engine.decode(token)
    first_step_s = time.perf_counter() - start - cold_prefill_s
    generate(engine, prompt, min(WARMUP_STEPS, new_tokens))
    prefill, decode = [], []
    for _ in range(runs):
        tokens, prefill_s, decode_s = generate(engine, prompt, new_tokens)
        prefill.append(len(prompt) / prefill_s)
        decode.append((new_tokens - 1) / decode_s if new_tokens > 1 else float("nan"))
    return {"load_s": load_s, "first_token_s": load_s + cold_prefill_s, "first_step_s": first_step_s,
            "peak_rss": peak_rss_bytes(),
            "prefill_tok_s": prefill, "decode_tok_s": decode, "tokens": tokens}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("contender", choices=sorted(CONTENDERS), help="what to run")
    parser.add_argument("work", type=Path, help="the model's Meta-format directory (its HF and GGUF forms "
                        "lie beside it)")
    parser.add_argument("--prompt", required=True, help="prompt token ids, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens to generate per run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up")
    opts = parser.parse_args()
    prompt = [int(t) for t in opts.prompt.split(",")]
    result = measure(opts.contender, opts.work, prompt, opts.new_tokens, opts.runs)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, every process has the same tokens
        print(json.dumps(result))


if __name__ == "__main__":
    main()
