"""How much each precision changes the model's predictions: perplexity, KL divergence, top-1.

    python benchmarks/quality.py benchmarks/work/SmolLM2-135M-Instruct            # ours only
    python benchmarks/quality.py benchmarks/work/SmolLM2-135M-Instruct --llama-cpp --out benchmarks/RESULTS-quality.md

Over a real English text, in windows of --ctx tokens (each starting with the begin-of-text
token), every mode scores the second half of each window, where each prediction has at least
ctx/2 tokens of context (as llama.cpp's `llama-perplexity` does). Against our float32 logits, the
reference, it reports what `llama-perplexity --kl-divergence` reports:
- perplexity: exp(mean negative log-likelihood of the text's next token);
- mean KL(reference || mode) over positions, in nats: how far the whole next-token distribution
  moved, not only the chosen token;
- top-1 agreement: how often the mode's most likely token is the reference's.

The text: Python's own documentation, the "topics" of the language reference that `pydoc`
shows (`pydoc_data/topics.py`, shipped with every CPython: English prose with code examples,
about 65,000 words), so it is there offline, on every machine, identical for every contender.

The compiled modes (`--compile`: llama_models.compiled) read each window as a user's text is
read: its first half in one eager prefill, then one compiled decode step per token, each step's
logits scored: the logits a `--compile` run chooses its tokens from.

With --llama-cpp, llama.cpp's F32, BF16, Q8_0 and Q4_1 GGUF files of the same weights (made by
`make bench`, beside the checkpoint: DIR-F32.gguf, ...) score the same token ids.
"""

import argparse
import datetime
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama_models  # noqa: E402
from llama_models import compiled  # noqa: E402
import machine  # noqa: E402  (beside this script)

THREADS = len(os.sched_getaffinity(0))
OURS = {  # name -> (dtype, quantize, compiled)
    "ours fp32": ("float32", None, False), "ours bf16": ("bfloat16", None, False),
    "ours int8": ("bfloat16", "int8", False), "ours int4": ("bfloat16", "int4", False),
    "ours bf16 compiled": ("bfloat16", None, True), "ours int8 compiled": ("bfloat16", "int8", True),
    "ours int4 compiled": ("bfloat16", "int4", True)}
LLAMA_CPP = ["F32", "BF16", "Q8_0", "Q4_1"]


def text_tokens(tokenizer, n_tokens: int) -> list[int]:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics))
    tokens = tokenizer.encode(text, bos=False, eos=False)
    if len(tokens) < n_tokens:
        sys.exit(f"the text has only {len(tokens)} tokens; ask for fewer with --tokens")
    return tokens[:n_tokens]


def windows(tokens: list[int], bos_id: int, ctx: int) -> list[list[int]]:
    """Each window: the begin-of-text token, then ctx - 1 tokens of text; windows do not overlap."""
    step = ctx - 1
    return [[bos_id] + tokens[i:i + step] for i in range(0, len(tokens) - step + 1, step)]


def kl_and_top1(ref: torch.Tensor, logp: torch.Tensor) -> tuple[float, int]:
    """Summed KL(ref || logp) over positions, and the positions whose most likely token agrees.
    ref, logp: (P, V) log-probabilities."""
    return (ref.exp() * (ref - logp)).sum().item(), (logp.argmax(-1) == ref.argmax(-1)).sum().item()


class Ours:
    def __init__(self, model_dir, dtype, quantize, compile_it, ctx):
        self.model, _ = llama_models.load(model_dir, device="cpu", dtype=getattr(torch, dtype), quantize=quantize,
                                          max_seq_len=ctx)
        self.compiled = compile_it
        if compile_it:
            compiled.compile_decode_step(self.model, model_dir)
            with torch.inference_mode():  # compiled now, while the cache directory is this model's
                self.model.decode_step(torch.tensor([[0]]), 0)

    def log_probs(self, window: list[int], first: int) -> torch.Tensor:
        """(P, V) float32 log-probabilities of the tokens after positions first .. S - 2."""
        with torch.inference_mode():
            if not self.compiled:
                return F.log_softmax(self.model(torch.tensor([window]), 0)[0, first:-1], dim=-1)
            self.model(torch.tensor([window[:first]]), 0)  # the prefill fills the cache; its logits are not scored
            steps = [self.model.decode_step(torch.tensor([[token]]), pos)[0, -1]
                     for pos, token in enumerate(window[first:-1], start=first)]
            return F.log_softmax(torch.stack(steps), dim=-1)


class LlamaCpp:
    def __init__(self, path: Path, ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=THREADS,
                                   n_threads_batch=THREADS, verbose=False)
        self.system_info = llama_cpp.llama_print_system_info().decode()

    def log_probs(self, window: list[int], first: int) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(window)
        logits = torch.from_numpy(self.llm.scores[first:len(window) - 1].copy())  # (P, V) float32
        return F.log_softmax(logits, dim=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=20480, help="tokens of text to score (windows of --ctx)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--llama-cpp", action="store_true", help="also llama.cpp's GGUF files beside model_dir")
    parser.add_argument("--out", type=Path, help="write the table to this markdown file")
    opts = parser.parse_args()
    torch.set_num_threads(THREADS)

    tokenizer = llama_models.Tokenizer(opts.model_dir / "tokenizer.model")
    tokens = text_tokens(tokenizer, opts.tokens)
    modes = {name: Ours(opts.model_dir, *how, opts.ctx) for name, how in OURS.items()}
    system_info = ""
    if opts.llama_cpp:
        for gguf_type in LLAMA_CPP:
            path = opts.model_dir.with_name(f"{opts.model_dir.name}-{gguf_type}.gguf")
            modes[f"llama.cpp {gguf_type}"] = LlamaCpp(path, opts.ctx)
            system_info = modes[f"llama.cpp {gguf_type}"].system_info

    scored_windows = windows(tokens, tokenizer.bos_id, opts.ctx)
    half = opts.ctx // 2
    totals = {name: {"nll": 0.0, "kl": 0.0, "top1": 0} for name in modes}
    scored = 0
    for n, window in enumerate(scored_windows, 1):
        targets = torch.tensor(window[half + 1:])  # the next token of positions half .. ctx - 2
        ref = modes["ours fp32"].log_probs(window, half)  # (P, V): the reference
        for name, mode in modes.items():
            logp = ref if name == "ours fp32" else mode.log_probs(window, half)
            totals[name]["nll"] -= logp.gather(1, targets[:, None]).sum().item()
            kl, top1 = kl_and_top1(ref, logp)
            totals[name]["kl"] += kl
            totals[name]["top1"] += top1
        scored += len(targets)
        print(f"window {n}/{len(scored_windows)}: " + ", ".join(
            f"{name} ppl {math.exp(t['nll'] / scored):.3f}" for name, t in totals.items()), file=sys.stderr)

    lines = [f"## Quality: {opts.model_dir.name}", "",
             f"{datetime.date.today()}, {machine.describe()}. {scored} scored positions: the second halves "
             f"of {len(scored_windows)} windows of {opts.ctx} tokens of Python's documentation (pydoc_data/topics.py). "
             f"KL divergence and top-1 agreement against ours fp32. Command: `python benchmarks/quality.py "
             f"{opts.model_dir} --tokens {opts.tokens} --ctx {opts.ctx}{' --llama-cpp' if opts.llama_cpp else ''}`",
             ""]
    if system_info:
        lines += [f"llama.cpp system info: `{system_info.strip()}`", ""]
    lines += ["| mode | perplexity | mean KL vs ours fp32 (nats) | top-1 agreement |", "|---|---|---|---|"]
    for name, t in totals.items():
        lines.append(f"| {name} | {math.exp(t['nll'] / scored):.4f} | {t['kl'] / scored:.5f} | "
                     f"{100 * t['top1'] / scored:.2f}% |")
    machine.publish(lines, opts.out)


if __name__ == "__main__":
    main()
