"""Decoding, annotated: greedy, sampling and true beam search over a Llama 3 checkpoint.

A language model gives, for the next position, one score (logit) per vocabulary entry. Decoding
is the rule that turns those scores into text, one token at a time. Everything here uses the
same two model calls: a prefill (the whole prompt at once, filling the KV cache) and then
one-token steps at `start_pos` = tokens so far. Read it top to bottom, or step through it.

Edit the globals below and run it, or override them with flags:
    python run_inference.py
    python run_inference.py --prompt "The capital of France is" --no-chat --show-top 5
    python run_inference.py --decoding sample --temperature 0.7 --top-p 0.9 --seed 1
    python run_inference.py --decoding beam --beam-width 4 --length-penalty 1.0
    python run_inference.py --decoding speculative --draft prompt-lookup --prompt-file text.txt
    python run_inference.py --decoding speculative --draft-model-dir DIR --draft-quantize int4
    python run_inference.py --model-dir ~/.llama/checkpoints/Llama3.1-8B --no-chat --dtype float32
    python run_inference.py --model-dir ~/.llama/checkpoints/Llama3.1-8B --no-chat --max-memory 4GB
    python run_inference.py --chat --system "Answer in one word." --prompt "Capital of Peru?"
"""

import argparse
import codecs
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

import llama_models
import llama_models.packed
import llama_models.quantize
import speculative
from llama_models import cli

try:
    import resource  # peak memory of this process; Unix only
except ImportError:  # Windows
    resource = None

# --- what to run ---
MODEL_NAME = "Llama3.2-1B-Instruct"  # a folder under LLAMA_MODELS_DIR
LLAMA_MODELS_DIR = Path("~/.llama/checkpoints").expanduser()  # where Meta's `llama model download` puts them
INPUT_STRING = "The capital of France is"  # the text to continue, or the user's message in chat mode
# Instruct models were fine-tuned on conversations wrapped in special header tokens; fed bare text
# they still work, but answer better in the format they were trained on. None: chat mode when
# the checkpoint folder's name contains "instruct" (Llama3.2-1B-Instruct, SmolLM2-...-Instruct).
CHAT = None
SYSTEM_PROMPT = ""  # chat mode only: a first message that sets the assistant's behaviour; "" for none
DEVICE = "auto"  # "auto" picks cuda, then mps, then cpu
DTYPE = None  # "float32", "bfloat16", "float16"; None: the device's default (bfloat16 on CPU)
# "int8": store the linear layers' weights in 1 byte each (per-row scales), made at load time.
# Decoding reads every weight once per token, so this halves the bytes read per token vs bf16.
# "int4": half a byte each, with a scale and a minimum per group of 32 weights (CPU only).
QUANTIZE = None
# A model bigger than memory: None keeps every weight in memory; a budget such as "4GB" keeps the
# process within it by reading transformer blocks from the checkpoint file as they run, the next
# ones read ahead while the current one computes (CPU, Linux). Each forward pass then reads the
# file once, for the whole prompt (prefill) or all beams (beam search) at a time.
MAX_MEMORY = None
# torch.compile the decode step: one graph for the whole model, with static shapes (the position
# goes in as a tensor), instead of running op by op. The first step compiles (tens of seconds,
# cached on disk for later runs); see Transformer.compile_decode_step.
COMPILE = False
MAX_NEW_TOKENS = 32  # stop after this many new tokens, or earlier at a stop token
MAX_SEQ_LEN = 2048  # prompt + new tokens; the KV cache is allocated for this many positions
# CPU threads for the matrix products: one per core but one (torch's default is one per core).
# Every product waits for its slowest thread, and when another program holds a core, that thread
# waits whole time slices: on 2 cores with one busy program, 2 threads decode at a third of the
# speed of 1 (benchmarks/RESULTS-threads.md). Decoding is bound by memory bandwidth, so the
# core left free costs little on an idle machine; there, pass --threads with all of them.
THREADS = max(1, torch.get_num_threads() - 1)

# --- how to choose each token ---
DECODING = "greedy"  # "greedy": the most likely token; "sample": draw one; "beam": beam search
# "speculative": greedy's text, "speculative-sample": sampling's distribution, each checking up to
# DRAFT_TOKENS proposed tokens per forward pass of the model (speculative.py explains how).
# Sampling: logits / TEMPERATURE (below 1 sharpens the distribution, above 1 flattens it; 0 is
# greedy), then keep the TOP_K most likely tokens (0: all), then the fewest most likely ones whose
# probabilities add up to TOP_P (1.0: all), then draw. SEED makes the draw repeatable.
TEMPERATURE = 0.6  # Meta's default for Llama 3 chat
TOP_K = 0
TOP_P = 0.9  # Meta's default
SEED = 0
# Beam search keeps the BEAM_WIDTH most likely partial texts instead of one.
BEAM_WIDTH = 4
# A finished text's score is its log-probability / (its length ** LENGTH_PENALTY). Every token
# adds a negative log-probability, so without this short answers always win; 1.0 compares the
# average per token, above 1 favours longer texts, 0 compares raw sums.
LENGTH_PENALTY = 1.0
# When to stop searching: True, as soon as BEAM_WIDTH texts are finished; False, when the best
# running beam, were it to finish now, would not beat the worst finished text; "never", when it
# could not even at MAX_NEW_TOKENS. (transformers' generate(early_stopping=...) semantics.)
EARLY_STOPPING = False
# Speculative decoding: who proposes. "model": DRAFT_MODEL_DIR, a smaller model with the same
# tokenizer (Llama 3.2 1B for 3.1 8B; or the model's own folder with DRAFT_QUANTIZE), kept in
# memory; "prompt-lookup": no model, the continuation of an earlier occurrence of the last tokens.
DRAFT = "model"
DRAFT_MODEL_DIR = None
DRAFT_QUANTIZE = None  # "int8" or "int4": the draft's linear layers, as QUANTIZE does the model's
DRAFT_TOKENS = 4  # k, the most tokens proposed per pass: larger pays when most guesses pass


# ---------------------------------------------------------------------------------------------
# Greedy and sampling: one sequence, one token per step.
# ---------------------------------------------------------------------------------------------

def sampling_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The probabilities to draw the next token from.

    Args:
        logits: (V,) float32 scores of the last position.
        temperature: > 0; logits are divided by it before the softmax.
        top_k: keep only the top_k highest logits (and any tied with the k-th); 0 keeps all.
        top_p: then keep the smallest set of most likely tokens whose probability reaches top_p
            (nucleus sampling, Holtzman et al. 2019); 1.0 keeps all.
    Returns:
        (V,) float32 probabilities summing to 1, zero outside the kept tokens.
    """
    # Dividing by T before the softmax raises every probability to the power 1/T (then
    # renormalises): T < 1 moves mass to the likely tokens, T > 1 spreads it to unlikely ones.
    logits = logits / temperature
    if top_k:
        kth_best = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))  # -inf: probability 0
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        # Walk down from the most likely token, keeping each one while the mass kept *before* it
        # is still below top_p. The cut adapts to the shape: a confident step keeps a handful of
        # tokens, an open-ended one keeps many. The first token is always kept (0 < top_p).
        sorted_probs, order = probs.sort(descending=True)  # (V,), (V,)
        mass_before = sorted_probs.cumsum(dim=0) - sorted_probs
        probs[order[mass_before >= top_p]] = 0.0
        probs = probs / probs.sum()
    return probs


def decode_loop(model, prompt_tokens: list[int], *, max_new_tokens: int, stop_tokens,
                choose: Callable[[torch.Tensor], int],
                on_step: Optional[Callable[[torch.Tensor, int], None]] = None, start_pos: int = 0) -> Iterator[int]:
    """The loop greedy() and sample() share; `choose` picks a token id from (V,) logits."""
    device, dtype = model.tok_embeddings.weight.device, model.norm.weight.dtype
    # Prefill: the whole prompt in one forward pass writes the keys and values of positions
    # start_pos .. start_pos + len(prompt) - 1 into the cache; only the last position's logits
    # are needed. (start_pos > 0: the cache already holds what came before, chat.py's earlier turns.)
    logits = model(torch.tensor([prompt_tokens], device=device), start_pos=start_pos)[0, -1]  # (V,)
    end = start_pos + len(prompt_tokens)
    for pos in range(end, end + max_new_tokens):
        cli.check_finite(logits, pos, dtype)  # NaN logits have no sensible next token: stop, say why
        token = choose(logits)
        if on_step:
            on_step(logits, token)
        yield token
        if token in stop_tokens:
            return
        # Decode step: only the new token goes in, at its position; the cache holds the rest.
        logits = model.decode_step(torch.tensor([[token]], device=device), start_pos=pos)[0, -1]  # (V,)


@torch.inference_mode()  # no autograd graph: it would chain every step through the cache
def greedy(model, prompt_tokens: list[int], *, max_new_tokens: int, stop_tokens,
           on_step=None, start_pos: int = 0) -> Iterator[int]:
    """Yield the most likely next token, step after step; a stop token, if hit, comes last.

    Args:
        model: a llama_models.Transformer; its KV cache from start_pos on is overwritten.
        prompt_tokens: token ids, e.g. tokenizer.encode(text, bos=True, eos=False).
        max_new_tokens: the most tokens to yield.
        stop_tokens: ids that end the text (tokenizer.stop_tokens).
        on_step: called as on_step(logits, token) at each step, logits (V,) float32.
        start_pos: the position of prompt_tokens[0]; the cache must hold the tokens before it.
    Every token yielded is fed back to the model, except a stop token.
    """
    yield from decode_loop(model, prompt_tokens, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                           choose=lambda logits: int(logits.argmax()), on_step=on_step, start_pos=start_pos)


@torch.inference_mode()
def sample(model, prompt_tokens: list[int], *, max_new_tokens: int, stop_tokens, temperature: float,
           top_k: int, top_p: float, seed: int, on_step=None, start_pos: int = 0) -> Iterator[int]:
    """Yield tokens drawn from sampling_distribution(); temperature 0 is greedy().

    Same arguments as greedy(), plus those of sampling_distribution() and the seed of the draws:
    the same seed on the same device gives the same text.
    """
    if temperature == 0:
        # The limit T -> 0 puts all the mass on the argmax; dividing by 0 would give NaNs.
        yield from greedy(model, prompt_tokens, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                          on_step=on_step, start_pos=start_pos)
        return
    device = model.tok_embeddings.weight.device
    # A private generator: reproducible whatever else in the process draws random numbers.
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(logits):
        probs = sampling_distribution(logits, temperature, top_k, top_p)
        return int(torch.multinomial(probs, num_samples=1, generator=generator))

    yield from decode_loop(model, prompt_tokens, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                           choose=draw, on_step=on_step, start_pos=start_pos)


# ---------------------------------------------------------------------------------------------
# Beam search: keep the K best partial texts, expand them all in one batch.
# ---------------------------------------------------------------------------------------------
# Greedy commits to one token per step; a slightly less likely word now can lead to a much
# more likely sentence later. Beam search keeps K hypotheses ("beams") alive, each a row of the
# batch and of the KV cache. Each step scores all K * V one-token extensions by their total
# log-probability, log p(token | prompt, beam) + log p(beam | prompt), and keeps the best.
#
# This is transformers' algorithm (generation/utils.py, _beam_search, v5.23), step for step, so
# that both give the same texts and scores. One deliberate difference: we start with one beam
# (the prompt, prefilled once) where transformers starts with K copies, K-1 of them at score
# -1e9 so that they are never picked: the same thing, without wasted work.

class Candidate(NamedTuple):
    """One extension considered at a beam-search step: a row of the beam table."""
    tokens: list[int]  # generated so far, this step's token last (the prompt not included)
    parent: int  # the running beam (= KV-cache row) it extends
    logprob: float  # log p(tokens | prompt): the sum over its tokens, float32
    fate: str  # "runs": a beam of the next step; "finished": into the pool; "dropped"


@torch.inference_mode()
def beam_search(model, prompt_tokens: list[int], *, beam_width: int, max_new_tokens: int, stop_tokens,
                length_penalty: float = 1.0, early_stopping: Union[bool, str] = False,
                on_step: Optional[Callable[[int, list[Candidate], list], None]] = None,
                ) -> list[tuple[list[int], float]]:
    """Beam search with the KV cache; the same results as transformers' generate(num_beams=...).

    Args:
        model: a llama_models.Transformer with max_batch_size >= beam_width.
        prompt_tokens: token ids.
        beam_width: K, the number of hypotheses kept.
        max_new_tokens: the most tokens in a hypothesis; at this length every beam finishes.
        stop_tokens: ids that finish a hypothesis (and are part of it).
        length_penalty: finished score = log-probability / length ** length_penalty.
        early_stopping: True, False or "never": see EARLY_STOPPING at the top of this file.
        on_step: called as on_step(step, candidates, finished) after each step: the beam table
            (best first) and the pool of finished hypotheses.
    Returns:
        [(generated tokens, score)]: K finished hypotheses, best first.
    """
    device = model.tok_embeddings.weight.device
    k = beam_width
    # Why more than K candidates: some of the best may end in a stop token and leave the race.
    # With n stop ids each beam has at most n such extensions, so keeping (1 + n) * K (at
    # least 2K) guarantees K that can run on.
    n_candidates = max(2, 1 + len(stop_tokens)) * k
    prompt_len = len(prompt_tokens)

    # Prefill once, as batch row 0: for now the only beam is the prompt itself.
    logits = model(torch.tensor([prompt_tokens], device=device), start_pos=0)[:, -1]  # (1, V)
    beams = [[]]  # generated tokens of each running beam; beam i lives in cache row i
    beam_logprobs = torch.zeros(1, device=device)  # (beams,) log p(beam | prompt), float32
    finished = []  # the pool: [(tokens, score)], best first, at most K

    for step in range(1, max_new_tokens + 1):  # step = tokens in each hypothesis after this step
        cli.check_finite(logits, prompt_len + step - 1, model.norm.weight.dtype)
        # Score every extension of every beam: (beams, V), flattened so that one topk ranks them
        # all. Row-major order: entry i is beam i // V, token i % V.
        totals = F.log_softmax(logits, dim=-1) + beam_logprobs[:, None]
        vocab_size = totals.shape[-1]
        # torch.topk on CPU breaks exact ties in no documented order; so may transformers'. Two
        # extensions with bit-identical scores may therefore come out in either order.
        top_totals, top_indices = totals.flatten().topk(n_candidates)  # (n_candidates,), best first
        # The length-normalised score each candidate would get if it finished now. Same float32
        # operation as transformers', so that ties and comparisons come out the same.
        top_scores = (top_totals / step ** length_penalty).tolist()

        candidates, running = [], []
        for rank, (total, index) in enumerate(zip(top_totals.tolist(), top_indices.tolist())):
            parent, token = divmod(index, vocab_size)
            tokens = beams[parent] + [token]
            if token in stop_tokens or step == max_new_tokens:
                # Only candidates ranked in the top K may finish: the extra ones exist to keep K
                # beams running, not to fill the pool with stop tokens of weak beams.
                fate = "finished" if rank < k else "dropped"
                if rank < k:
                    finished.append((tokens, top_scores[rank]))
            else:
                fate = "runs" if len(running) < k else "dropped"
                if fate == "runs":
                    running.append(rank)
            candidates.append(Candidate(tokens, parent, total, fate))
        finished = sorted(finished, key=lambda hypothesis: -hypothesis[1])[:k]
        if on_step:
            on_step(step, candidates, finished)

        if step == max_new_tokens or not _beam_search_continues(
                finished, top_totals[running[0]], k, step, max_new_tokens, length_penalty, early_stopping):
            break

        # The next beams, ranked by raw log-probability (not the normalised score: all running
        # beams have the same length, so the penalty would not change their order).
        beams = [candidates[rank].tokens for rank in running]
        beam_logprobs = top_totals[running]  # (K,)
        parents = torch.tensor([candidates[rank].parent for rank in running], device=device)  # (K,)
        tokens = torch.tensor([[candidates[rank].tokens[-1]] for rank in running], device=device)  # (K, 1)
        # Beam i now continues old beam parents[i]: give row i that beam's keys and values for
        # the positions seen so far, then feed each beam its new token.
        start_pos = prompt_len + step - 1
        model.reorder_cache(parents, end=start_pos)
        logits = model.decode_step(tokens, start_pos=start_pos)[:, -1]  # (K, V)
    return finished


def _beam_search_continues(finished, best_running: torch.Tensor, k: int, step: int, max_new_tokens: int,
                           length_penalty: float, early_stopping) -> bool:
    """Whether a running beam could still enter the pool of K finished hypotheses."""
    if len(finished) < k:
        return True
    if early_stopping is True:
        return False
    # A heuristic, not a bound: a beam's log-probability can only fall as it grows, but its
    # normalised score can rise, since the divisor length ** length_penalty grows too. We guess
    # the best beam's best future score at the length it has now, or, with "never" and a
    # positive penalty, at the longest length allowed (which can stop too late but never too
    # early for its length). The running beams are ranked best first: best_running is beam 0.
    length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step
    return float(best_running / length ** length_penalty) > finished[-1][1]


# ---------------------------------------------------------------------------------------------
# The command line: prompt, output, a look inside, and the numbers.
# ---------------------------------------------------------------------------------------------

def encode_prompt(tokenizer, prompt: str, chat: bool, system_prompt: str) -> list[int]:
    if chat:
        # The chat template wraps each message in header tokens and ends with the assistant's
        # header: the model's reply is the continuation.
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return llama_models.ChatFormat(tokenizer).encode_dialog_prompt(messages)
    return tokenizer.encode(prompt, bos=True, eos=False)  # plain completion: bos + the text


def model_summary(model) -> str:
    args = model.params
    # Weights: the parameters (counted once per storage: a tied output layer shares its tensor
    # with the embedding), plus the layers that hold their weights in other forms: int8 and int4
    # buffers, oneDNN-packed tensors. Parameters are counted as the checkpoint defines them; a
    # replaced layer made from a tensor that is still a parameter (a tied output head: the
    # embedding stays plain for its lookups) is a copy, counted under memory only.
    special = (llama_models.packed.PackedLinear, *llama_models.quantize.QUANTIZED_LINEARS.values())
    layers = [m for m in model.modules() if isinstance(m, special)]
    params = {t.data_ptr(): t for t in model.parameters()}
    copies = [m for m in layers if m.tied]
    n_params = (sum(t.numel() for t in params.values() if t.dim() == 2)
                + sum(m.in_features * m.out_features for m in layers if m not in copies))

    def nbytes(layers):  # a quantized layer's tensors are buffers; a packed layer's one tensor is an attribute
        return sum(t.numel() * t.element_size() for m in layers for t in ([*m.buffers()] or [m.weight]))

    weight_bytes = sum(t.numel() * t.element_size() for t in params.values()) + nbytes(layers)
    copy_note = f", of which {nbytes(copies) / 2**20:.1f} MiB the output head's copy of the tied embedding" if copies else ""
    cache_bytes = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "cache" in name)
    dtype = str(model.norm.weight.dtype).removeprefix("torch.")
    kinds = {type(m) for m in layers}
    for name, layer in llama_models.quantize.QUANTIZED_LINEARS.items():
        if layer in kinds:
            dtype += f", {name} linear weights"
    if llama_models.packed.PackedLinear in kinds:
        dtype += ", linear weights packed for oneDNN"
    return (f"model: {n_params / 1e6:.1f}M parameters, {args.n_layers} layers, dim {args.dim}, "
            f"{args.n_heads} heads / {args.n_kv_heads} kv heads of {args.head_dim}, vocab {args.vocab_size}, "
            f"{dtype}\n"
            f"memory: weights {weight_bytes / 2**20:.1f} MiB{copy_note} + KV cache {cache_bytes / 2**20:.1f} MiB "
            f"({args.max_batch_size} x {args.max_seq_len} positions)")


def token_text(tokenizer, token: int) -> str:
    raw = tokenizer.decode_bytes([token])
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:  # a piece of a multi-byte character: show its bytes, b'\xf0'
        return repr(raw)


def show_top_tokens(tokenizer, n: int):
    """An on_step for greedy/sample: the chosen token, then the n most likely with probabilities."""
    def on_step(logits, token):
        probs = logits.softmax(dim=-1)  # the model's own distribution, before any sampling filter
        top = probs.topk(n)
        alternatives = "  ".join(f"{token_text(tokenizer, int(t))} {float(p):.3f}"
                                 for p, t in zip(top.values, top.indices))
        print(f"-> {token_text(tokenizer, token)} ({float(probs[token]):.3f})  |  {alternatives}", flush=True)
    return on_step


def show_passes(tokenizer):
    """An on_pass for speculative decoding: each pass's guesses, kept ones first, and how many passed."""
    def on_pass(guesses, kept):
        if not guesses:
            print("pass: no guesses (a plain step)", flush=True)
            return
        shown = [token_text(tokenizer, t) for t in guesses]
        rejected = f"  rejected {' '.join(shown[kept:])}" if kept < len(guesses) else ""
        print(f"pass: {kept}/{len(guesses)} guesses accepted  {' '.join(shown[:kept]) or '-'}{rejected}", flush=True)
    return on_pass


def stream_text(tokenizer, tokens: Iterator[int], stop_tokens, write) -> list[int]:
    """Consume `tokens`, calling write(text) as soon as each character is complete; return them.

    One character (an emoji, a CJK ideograph) can span several byte-level tokens: an incremental
    UTF-8 decoder holds the bytes of an unfinished character until the rest arrives. A stop token
    is returned but not written. Invalid bytes become U+FFFD, as in tokenizer.decode().
    """
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    generated = []
    try:
        for token in tokens:
            generated.append(token)
            if token not in stop_tokens:
                write(utf8.decode(tokenizer.decode_bytes([token])))
    finally:  # also on Ctrl-C: flush a partial character
        write(utf8.decode(b"", final=True))
    return generated


class Stats:
    """Times the phases of a run: prefill = up to the first new token; decode = after it (with
    --compile, after the first decode step, which compiles and is reported apart)."""

    def __init__(self, load_s: float, n_prompt: int, rows: int = 1, compiled: bool = False):
        self.load_s, self.n_prompt, self.rows, self.compiled = load_s, n_prompt, rows, compiled
        self.start = time.perf_counter()
        self.times = []  # when each new token (beam search: each step) was ready
        self.passes = self.proposed = self.kept = 0  # speculative decoding: verification passes, guesses

    def step(self):
        self.times.append(time.perf_counter())

    def verified(self, proposed: int, kept: int):
        """Speculative decoding: one verification pass checked `proposed` guesses and kept `kept`."""
        self.passes, self.proposed, self.kept = self.passes + 1, self.proposed + proposed, self.kept + kept

    def report(self, device) -> str:
        lines = [f"load: {self.load_s:.2f} s", f"prompt: {self.n_prompt} tokens"]
        if self.times:
            prefill = self.times[0] - self.start
            lines.append(f"prefill: {self.n_prompt / prefill:.1f} tok/s ({prefill:.3f} s, incl. the first new token)")
        if self.compiled and len(self.times) > 1:
            lines.append(f"compile: {self.times[1] - self.times[0]:.1f} s (the first decode step)")
        decode_times = self.times[1:] if self.compiled else self.times
        if len(decode_times) > 1:
            decode, steps = decode_times[-1] - decode_times[0], len(decode_times) - 1
            per_row = f" = {steps} steps x {self.rows} beams" if self.rows > 1 else ""
            lines.append(f"decode: {steps * self.rows / decode:.1f} tok/s"
                         f" ({steps * self.rows} tokens{per_row} in {decode:.3f} s, after the first"
                         f"{' two' if self.compiled else ''})")
        if self.passes:
            # Every token after the first came from a verification pass: the tokens each pass
            # yields are what one read of the weights buys (plain decoding: exactly 1).
            rate = f" ({self.kept / self.proposed:.0%})" if self.proposed else ""
            lines.append(f"speculative: {self.kept} of {self.proposed} proposed tokens accepted{rate}, "
                         f"{(len(self.times) - 1) / self.passes:.2f} tokens per model pass "
                         f"({len(self.times) - 1} tokens in {self.passes} passes, after the first)")
        if device.type == "cpu":
            lines.append(f"threads: {torch.get_num_threads()}")
        lines.append(f"peak memory: {peak_memory(device)}")
        return "\n".join(lines)


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated on {device}"
    if resource is None:
        return "not measured on this OS"
    # The process's peak resident set: weights read so far, cache, activations, Python, torch.
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{rss / 2**20:.0f} MiB resident (process peak)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    add = parser.add_argument
    add("--model-dir", type=Path, default=LLAMA_MODELS_DIR / MODEL_NAME,
        help="checkpoint directory (params.json, consolidated.00.pth, tokenizer.model)")
    add("--prompt", default=INPUT_STRING, help="text to continue, or the user's message with --chat")
    add("--prompt-file", help="read the prompt from this file instead; - reads standard input")
    add("--chat", action=argparse.BooleanOptionalAction, default=CHAT,
        help="wrap the prompt in the chat template (default: when the folder name contains 'instruct')")
    add("--system", default=SYSTEM_PROMPT, help="system prompt, chat mode only")
    add("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="most tokens to generate")
    add("--max-seq-len", type=int, default=MAX_SEQ_LEN, help="KV cache length: prompt + new tokens")
    cli.add_model_flags(parser, DEVICE, DTYPE, THREADS)
    cli.add_memory_flags(parser, QUANTIZE, MAX_MEMORY, COMPILE)
    add("--decoding", choices=["greedy", "sample", "beam", "speculative", "speculative-sample"], default=DECODING,
        help="how to pick tokens")
    add("--temperature", type=float, default=TEMPERATURE, help="sample: divide logits by this; 0 = greedy")
    add("--top-k", type=int, default=TOP_K, help="sample: keep the k most likely tokens; 0 = all")
    add("--top-p", type=float, default=TOP_P, help="sample: keep the most likely tokens up to this mass, in (0, 1]")
    add("--seed", type=int, default=SEED, help="sample: random seed")
    add("--beam-width", type=int, default=BEAM_WIDTH, help="beam: hypotheses kept at each step")
    add("--length-penalty", type=float, default=LENGTH_PENALTY, help="beam: score = logprob / length**this")
    add("--early-stopping", choices=["true", "false", "never"], default=str(EARLY_STOPPING).lower(),
        help="beam: when to stop searching (see EARLY_STOPPING)")
    add("--draft", choices=["model", "prompt-lookup"], default=DRAFT,
        help="speculative: who proposes tokens: --draft-model-dir, or n-grams of the text itself")
    add("--draft-model-dir", type=Path, default=DRAFT_MODEL_DIR,
        help="speculative: a smaller checkpoint with the same tokenizer, to propose tokens")
    add("--draft-quantize", choices=["int8", "int4"], default=DRAFT_QUANTIZE,
        help="speculative: weight-only int8 or int4 (CPU) linear layers for the draft model")
    add("--draft-tokens", type=int, default=DRAFT_TOKENS, metavar="K",
        help="speculative: the most tokens proposed per pass of the model")
    add("--show-top", type=int, default=0, metavar="N",
        help="print each step: the chosen token and the N most likely (beam: the N best candidates)")
    args = parser.parse_args(argv)
    args.early_stopping = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    if args.chat is None:
        args.chat = "instruct" in args.model_dir.name.lower()
    return args


def check_args(args) -> None:
    """Raise ValueError naming the first flag out of range."""
    rules = [
        (args.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {args.max_new_tokens}"),
        (args.max_seq_len >= 2, f"--max-seq-len must be at least 2, got {args.max_seq_len}"),
        (args.beam_width >= 1, f"--beam-width must be at least 1, got {args.beam_width}"),
        (args.temperature >= 0, f"--temperature must be 0 or more, got {args.temperature}"),
        (args.top_k >= 0, f"--top-k must be 0 (off) or more, got {args.top_k}"),
        (0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.show_top >= 0, f"--show-top must be 0 (off) or more, got {args.show_top}"),
        (args.threads >= 1, f"--threads must be at least 1, got {args.threads}"),
        (args.draft_tokens >= 1, f"--draft-tokens must be at least 1, got {args.draft_tokens}"),
    ]
    if args.decoding.startswith("speculative"):
        rules += [
            (args.draft == "prompt-lookup" or args.draft_model_dir is not None,
             f"--decoding {args.decoding} needs a proposer: --draft-model-dir DIR or --draft prompt-lookup"),
            (args.draft == "model" or (args.draft_model_dir is None and args.draft_quantize is None),
             "--draft prompt-lookup uses no draft model: drop --draft-model-dir and --draft-quantize"),
            (not args.compile, f"--compile does not apply to --decoding {args.decoding}: "
                               f"its passes take k + 1 tokens, not the one of a compiled step"),
        ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)


def main(argv=None):
    args = parse_args(argv)
    # Bad input, a missing checkpoint or Ctrl-C while loading: one line and an exit code.
    with cli.user_errors(args.model_dir, MODEL_NAME):
        check_args(args)
        args.prompt = cli.read_prompt(args.prompt, args.prompt_file)
        torch.set_num_threads(args.threads)
        device = llama_models.resolve_device(args.device)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        start = time.perf_counter()
        draft = None
        if args.decoding.startswith("speculative") and args.draft == "model":
            # The draft first, so that a --max-memory budget for the model counts the draft's memory.
            with cli.user_errors(args.draft_model_dir, args.draft_model_dir.name):
                draft, _ = llama_models.load(args.draft_model_dir, device=device, dtype=dtype,
                                             max_seq_len=args.max_seq_len, quantize=args.draft_quantize)
        model, tokenizer = llama_models.load(
            args.model_dir, device=device, dtype=dtype,
            max_seq_len=args.max_seq_len, max_batch_size=args.beam_width if args.decoding == "beam" else 1,
            quantize=args.quantize, max_memory=args.max_memory)
        if draft is not None:
            speculative.check_same_vocabulary(args.model_dir, args.draft_model_dir, model, draft)
        load_s = time.perf_counter() - start
        if args.compile:
            model.compile_decode_step()  # compiles lazily, at the first decode step
        prompt_tokens = encode_prompt(tokenizer, args.prompt, args.chat, args.system)
        if len(prompt_tokens) >= args.max_seq_len:
            raise ValueError(f"the prompt is {len(prompt_tokens)} tokens, which leaves no room for new ones "
                             f"in --max-seq-len {args.max_seq_len}")

    # Under torchrun, every process runs this same loop on its slice of the model.
    llama_models.print_on_first_process_only()
    print(f"loaded {args.model_dir} in {load_s:.1f} s", file=sys.stderr)
    print(model_summary(model), file=sys.stderr)
    if draft is not None:
        print(f"draft {args.draft_model_dir}: {model_summary(draft)}", file=sys.stderr)
    if args.max_memory:
        print(model.block_streamer or f"max_memory {args.max_memory} holds the whole model: nothing is streamed",
              file=sys.stderr)
    max_new_tokens = min(args.max_new_tokens, args.max_seq_len - len(prompt_tokens))
    if max_new_tokens < args.max_new_tokens:
        print(f"note: at most {max_new_tokens} new tokens fit in --max-seq-len {args.max_seq_len}", file=sys.stderr)
    mode = "chat" if args.chat else "completion"
    how = f" ({args.draft}, up to {args.draft_tokens} per pass)" if args.decoding.startswith("speculative") else ""
    print(f"{mode}, {args.decoding} decoding{how}, prompt of {len(prompt_tokens)} tokens\n", file=sys.stderr)

    if args.decoding == "beam":
        run = run_beam_search
    elif args.decoding.startswith("speculative"):
        proposer = speculative.DraftModel(draft) if draft is not None else speculative.PromptLookup()
        run = partial(run_streaming, proposer=proposer)
    else:
        run = run_streaming
    stats = Stats(load_s, len(prompt_tokens), rows=args.beam_width if args.decoding == "beam" else 1,
                  compiled=args.compile)
    interrupted = False
    try:
        run(model, tokenizer, prompt_tokens, max_new_tokens, args, stats)
    except KeyboardInterrupt:
        interrupted = True
        print("\n[interrupted]", file=sys.stderr)
    except cli.NonFiniteLogits as e:
        sys.exit(f"error: {e}")
    print("\n" + stats.report(device), file=sys.stderr)
    if interrupted:
        sys.exit(130)  # the shell's code for "ended by Ctrl-C"


def run_streaming(model, tokenizer, prompt_tokens, max_new_tokens, args, stats, proposer=None):
    """Greedy, sampling or speculative, printing text as it comes (or, with --show-top, a line per
    step; speculative: and one per pass, with its guesses)."""
    stop = tokenizer.stop_tokens
    show = show_top_tokens(tokenizer, args.show_top) if args.show_top else None
    show_pass = show_passes(tokenizer) if args.show_top else None

    def on_step(logits, token):
        stats.step()
        if show:
            show(logits, token)

    def on_pass(guesses, kept):
        stats.verified(len(guesses), kept)
        if show_pass:
            show_pass(guesses, kept)

    if args.decoding == "greedy":
        tokens = greedy(model, prompt_tokens, max_new_tokens=max_new_tokens, stop_tokens=stop, on_step=on_step)
    elif args.decoding.startswith("speculative"):
        sampled = args.decoding == "speculative-sample" and args.temperature > 0  # temperature 0: greedy
        distribution = partial(sampling_distribution, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p) if sampled else None
        tokens = speculative.speculative(model, proposer, prompt_tokens, max_new_tokens=max_new_tokens,
                                         stop_tokens=stop, draft_tokens=args.draft_tokens,
                                         distribution=distribution, seed=args.seed, on_step=on_step, on_pass=on_pass)
    else:
        tokens = sample(model, prompt_tokens, max_new_tokens=max_new_tokens, stop_tokens=stop,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        on_step=on_step)
    prefix = "" if args.chat else args.prompt  # a completion continues the prompt: show both
    if show:  # the per-step lines own the terminal: the text comes once, at the end (or on Ctrl-C)
        pieces = []
        try:
            stream_text(tokenizer, tokens, stop, pieces.append)
        finally:
            print(prefix + "".join(pieces))
    else:
        print(prefix, end="", flush=True)
        try:
            stream_text(tokenizer, tokens, stop, lambda text: print(text, end="", flush=True))
        finally:
            print()


def run_beam_search(model, tokenizer, prompt_tokens, max_new_tokens, args, stats):
    """Beam search: a progress line per step (or the beam table), then the n-best list."""
    latest = {}  # the last step's candidates, to show the best beam on Ctrl-C

    def on_step(step, candidates, finished):
        stats.step()
        latest["candidates"] = candidates
        if args.show_top:
            print(f"step {step}: {len(finished)}/{args.beam_width} finished", flush=True)
            for c in candidates[:args.show_top]:
                print(f"  {c.fate:>8}  from beam {c.parent}  logprob {c.logprob:9.4f}  "
                      f"+{token_text(tokenizer, c.tokens[-1])}  {tokenizer.decode(c.tokens)!r}", flush=True)
        elif sys.stderr.isatty():  # a line redrawn in place; in a log file it would be one endless line
            print(f"\rbeam search: step {step}/{max_new_tokens}, {len(finished)}/{args.beam_width} finished",
                  end="", file=sys.stderr, flush=True)

    try:
        hypotheses = beam_search(model, prompt_tokens, beam_width=args.beam_width, max_new_tokens=max_new_tokens,
                                 stop_tokens=tokenizer.stop_tokens, length_penalty=args.length_penalty,
                                 early_stopping=args.early_stopping, on_step=on_step)
    except KeyboardInterrupt:
        best = next((c for c in latest.get("candidates", []) if c.fate == "runs"), None)
        if best:
            print(f"\nbest running beam so far (logprob {best.logprob:.4f}):\n{tokenizer.decode(best.tokens)}")
        raise
    print(file=sys.stderr)
    for rank, (tokens, score) in enumerate(hypotheses, 1):
        text = tokenizer.decode([t for t in tokens if t not in tokenizer.stop_tokens])
        print(f"#{rank}  score {score:.4f}  ({len(tokens)} tokens)\n{text}\n")


if __name__ == "__main__":
    main()
