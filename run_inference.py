"""Decoding, annotated: greedy, sampling, speculative and true beam search over a Llama 3 checkpoint.

A language model gives, for the next position, one score (logit) per vocabulary entry. Decoding
is the rule that turns those scores into text, one token at a time. Greedy, sampling and
speculative decoding are generators in llama_models (generation.py, speculative.py): main()
below picks one and prints each token as it comes. Beam search, which keeps several texts at
once, is written out here. Read it top to bottom, or step through it.

Edit the globals below and run it, or override them with flags:
    python run_inference.py
    python run_inference.py --prompt "The capital of France is" --no-chat --show-top 5
    python run_inference.py --decoding sample --temperature 0.7 --top-p 0.9 --seed 1
    python run_inference.py --decoding beam --beam-width 4 --length-penalty 1.0
    python run_inference.py --decoding speculative --draft prompt-lookup --prompt-file text.txt
    python run_inference.py --decoding speculative --draft DRAFT_DIR --draft-quantize int4
    python run_inference.py --model-dir ~/.llama/checkpoints/Llama3.1-8B --no-chat --dtype float32
    python run_inference.py --model-dir ~/.llama/checkpoints/Llama3.1-8B --no-chat --max-memory 4GB
    python run_inference.py --chat --system "Answer in one word." --prompt "Capital of Peru?"
"""

import sys
import time
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

import llama_models
from llama_models import cli, compiled, generation, speculative
from llama_models.report import Stats, model_summary

# --- what to run (the model, the device and the rest: llama_models/cli.py, or --help) ---
INPUT_STRING = "The capital of France is"  # the text to continue, or the user's message in chat mode
# Instruct models were fine-tuned on conversations wrapped in special header tokens; fed bare text
# they still work, but answer better in the format they were trained on. None: chat mode when
# the checkpoint folder's name contains "instruct" (Llama3.2-1B-Instruct, SmolLM2-...-Instruct).
CHAT = None
MAX_NEW_TOKENS = 32  # stop after this many new tokens, or earlier at a stop token

# --- how to choose each token ---
# "greedy": the most likely token; "sample": draw one (temperature, top-k, top-p: see
# llama_models.generation.sampling_distribution); "beam": beam search, below; "speculative":
# greedy's text, "speculative-sample": sampling's distribution, each checking up to DRAFT_TOKENS
# proposed tokens per forward pass of the model (llama_models/speculative.py explains how).
DECODING = "greedy"
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
# Speculative decoding: who proposes. A checkpoint directory: a smaller model with the same
# tokenizer (Llama 3.2 1B for 3.1 8B; or the model's own folder with DRAFT_QUANTIZE), kept in
# memory; "prompt-lookup": no model, the continuation of an earlier occurrence of the last tokens.
DRAFT = None
DRAFT_QUANTIZE = None  # "int8" or "int4": the draft's linear layers, as --quantize does the model's
DRAFT_TOKENS = 4  # k, the most tokens proposed per pass: larger pays when most guesses pass


# ---------------------------------------------------------------------------------------------
# Beam search: keep the K best partial texts, expand them all in one batch.
# ---------------------------------------------------------------------------------------------
# Greedy commits to one token per step; a slightly less likely word now can lead to a much
# more likely sentence later. Beam search keeps K hypotheses ("beams") alive, each a row of the
# batch and of the KV cache. Each step scores all K * V one-token extensions by their total
# log-probability, log p(token | prompt, beam) + log p(beam | prompt), and keeps the best.
#
# This is transformers' algorithm (generation/utils.py, _beam_search), step for step, so that
# both give the same texts and scores (tests/test_run_inference.py holds them to it). One
# deliberate difference: we start with one beam (the prompt, prefilled once) where transformers
# starts with K copies, K-1 of them at score -1e9 so that they are never picked: the same
# thing, without wasted work.

class Candidate(NamedTuple):
    """One extension considered at a beam-search step: a row of the beam table."""
    tokens: list[int]  # generated so far, this step's token last (the prompt not included)
    parent: int  # the running beam (= KV-cache row) it extends
    logprob: float  # log p(tokens | prompt): the sum over its tokens, float32
    score: float  # logprob / len(tokens) ** length_penalty: its score if it finished now
    fate: str  # "runs": a beam of the next step; "finished": into the pool; "dropped"


@torch.inference_mode()
def beam_search(model, prompt_tokens: list[int], *, beam_width: int, max_new_tokens: int, stop_tokens,
                length_penalty: float = 1.0, early_stopping: Union[bool, str] = False,
                on_beam_step: Optional[Callable[[int, list[Candidate], list], None]] = None,
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
        on_beam_step: called as on_beam_step(step, candidates, finished) after each step: the
            beam table (best first) and the pool of finished hypotheses.
    Returns:
        [(generated tokens, score)]: K finished hypotheses, best first.
    """
    k = beam_width
    prompt_len = len(prompt_tokens)

    # Prefill once, as batch row 0: for now the only beam is the prompt itself.
    logits = model(torch.tensor([prompt_tokens], device=model.device), start_pos=0)[:, -1]  # (1, V)
    beams = [[]]  # generated tokens of each running beam; beam i lives in cache row i
    beam_logprobs = torch.zeros(1, device=model.device)  # (beams,) log p(beam | prompt), float32
    finished = []  # the pool: [(tokens, score)], best first, at most K

    for step in range(1, max_new_tokens + 1):  # step = tokens in each hypothesis after this step
        generation.check_finite(logits, prompt_len + step - 1, model.dtype)
        # Score every extension of every beam by its total log-probability: (beams, V).
        totals = F.log_softmax(logits, dim=-1) + beam_logprobs[:, None]
        candidates, top_totals = rank_candidates(totals, beams, step, k, last_step=step == max_new_tokens,
                                                 stop_tokens=stop_tokens, length_penalty=length_penalty)
        finished = sorted(finished + [(c.tokens, c.score) for c in candidates if c.fate == "finished"],
                          key=lambda hypothesis: -hypothesis[1])[:k]
        if on_beam_step:
            on_beam_step(step, candidates, finished)
        running = [rank for rank, c in enumerate(candidates) if c.fate == "runs"]
        if step == max_new_tokens or not _beam_search_continues(
                finished, top_totals[running[0]], k, step, max_new_tokens, length_penalty, early_stopping):
            break

        # The next beams, ranked by raw log-probability (not the normalised score: all running
        # beams have the same length, so the penalty would not change their order).
        beams = [candidates[rank].tokens for rank in running]
        beam_logprobs = top_totals[running]  # (K,)
        parents = torch.tensor([candidates[rank].parent for rank in running], device=model.device)  # (K,)
        tokens = torch.tensor([[candidates[rank].tokens[-1]] for rank in running], device=model.device)  # (K, 1)
        # Beam i now continues old beam parents[i]: give row i that beam's keys and values for
        # the positions seen so far, then feed each beam its new token.
        start_pos = prompt_len + step - 1
        model.reorder_cache(parents, end=start_pos)
        logits = model.decode_step(tokens, start_pos=start_pos)[:, -1]  # (K, V)
    return finished


def rank_candidates(totals: torch.Tensor, beams: list, step: int, k: int, *, last_step: bool, stop_tokens,
                    length_penalty: float) -> tuple[list[Candidate], torch.Tensor]:
    """The beam table of one step: the best extensions, best first, each with its fate; and their
    totals, (n_candidates,) float32. totals: (beams, V) the log-probability of each extension."""
    # Why more than K candidates: some of the best may end in a stop token and leave the race.
    # With n stop ids each beam has at most n such extensions, so keeping (1 + n) * K (at
    # least 2K) guarantees K that can run on.
    n_candidates = max(2, 1 + len(stop_tokens)) * k
    # Flattened so that one topk ranks them all; row-major order: entry i is beam i // V, token
    # i % V. torch.topk on CPU breaks exact ties in no documented order; so may transformers'.
    # Two extensions with bit-identical scores may therefore come out in either order.
    top_totals, top_indices = totals.flatten().topk(n_candidates)  # (n_candidates,), best first
    vocab_size = totals.shape[-1]
    # The length-normalised score each candidate would get if it finished now. Same float32
    # operation as transformers', so that ties and comparisons come out the same.
    top_scores = (top_totals / step ** length_penalty).tolist()
    candidates, n_running = [], 0
    for rank, (total, index) in enumerate(zip(top_totals.tolist(), top_indices.tolist())):
        parent, token = divmod(index, vocab_size)
        if token in stop_tokens or last_step:
            # Only candidates ranked in the top K may finish: the extra ones exist to keep K
            # beams running, not to fill the pool with stop tokens of weak beams.
            fate = "finished" if rank < k else "dropped"
        else:
            fate = "runs" if n_running < k else "dropped"
            n_running += fate == "runs"
        candidates.append(Candidate(beams[parent] + [token], parent, total, top_scores[rank], fate))
    return candidates, top_totals


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
# The command line: load, pick the decoding, print each token as it comes, then the numbers.
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    model, tokenizer, draft, prompt_tokens, load_s = load(args)
    max_new_tokens = min(args.max_new_tokens, args.max_seq_len - len(prompt_tokens))
    if max_new_tokens < args.max_new_tokens:
        print(f"note: at most {max_new_tokens} new tokens fit in --max-seq-len {args.max_seq_len}", file=sys.stderr)
    how = f" ({args.draft}, up to {args.draft_tokens} per pass)" if draft else ""
    print(f"{'chat' if args.chat else 'completion'}, {args.decoding} decoding{how}, "
          f"prompt of {len(prompt_tokens)} tokens\n", file=sys.stderr)
    beams = args.beam_width if args.decoding == "beam" else 1
    stats = Stats(load_s, len(prompt_tokens), rows=beams, compiled=model.compiled_step is not None)
    try:
        if args.decoding == "beam":
            print_beam_search(model, tokenizer, prompt_tokens, max_new_tokens, args.beam_width, args.length_penalty,
                              args.early_stopping, args.show_top, stats)
            return
        # The tokens, one at a time, from the decoding chosen. A generator: nothing runs until
        # the loop below asks for the next token.
        on_token = show_top_tokens(tokenizer, args.show_top) if args.show_top else None
        common = dict(max_new_tokens=max_new_tokens, stop_tokens=tokenizer.stop_tokens, on_token=on_token)
        if args.decoding == "greedy":
            tokens = generation.greedy(model, prompt_tokens, **common)
        elif args.decoding == "sample":
            tokens = generation.sample(model, prompt_tokens, temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, seed=args.seed, **common)
        else:
            sampled = args.decoding == "speculative-sample" and args.temperature > 0  # temperature 0: greedy
            distribution = (lambda logits: generation.sampling_distribution(
                logits, args.temperature, args.top_k, args.top_p)) if sampled else None
            tokens = speculative.speculative(model, draft, prompt_tokens, draft_tokens=args.draft_tokens,
                                             distribution=distribution, seed=args.seed,
                                             on_pass=on_pass(stats, tokenizer, args.show_top), **common)
        # With --show-top the per-step lines own the terminal: the text waits for the end (or Ctrl-C).
        text, later = generation.TextStream(tokenizer), []
        write = later.append if args.show_top else (lambda piece: print(piece, end="", flush=True))
        write("" if args.chat else args.prompt)  # a completion continues the prompt: show both
        try:
            for token in tokens:
                stats.step()
                write(text.add(token))
        finally:
            print("".join(later) + text.end())
    finally:
        print("\n" + stats.report(model.device), file=sys.stderr)


def load(args):
    """Check the flags, read the prompt, load the model (and a draft), encode the prompt."""
    with cli.user_errors():  # bad input or a missing checkpoint: one line and exit status 1
        check_speculative_flags(args)
        args.prompt = cli.read_prompt(args.prompt, args.prompt_file)
        device = cli.start(args.threads, args.device)
        args.model_dir = cli.checkpoint_dir(args.model_dir)
        if args.chat is None:
            args.chat = "instruct" in args.model_dir.name.lower()
        start = time.perf_counter()
        draft = None
        if args.draft == "prompt-lookup":
            draft = speculative.PromptLookup()
        elif args.draft is not None:
            # The draft first, so that a --max-memory budget for the model counts the draft's memory.
            args.draft = cli.checkpoint_dir(args.draft)
            draft_model, _ = llama_models.load(args.draft, device=device, dtype=args.dtype,
                                               max_seq_len=args.max_seq_len, quantize=args.draft_quantize)
            draft = speculative.DraftModel(draft_model)
        model, tokenizer = llama_models.load(
            args.model_dir, device=device, dtype=args.dtype, max_seq_len=args.max_seq_len,
            max_batch_size=args.beam_width if args.decoding == "beam" else 1,
            quantize=args.quantize, max_memory=args.max_memory)
        if isinstance(draft, speculative.DraftModel):
            speculative.check_same_vocabulary(args.model_dir, args.draft, model, draft.model)
        load_s = time.perf_counter() - start
        if args.compile:
            compiled.compile_decode_step(model, args.model_dir)  # compiles lazily, at the first decode step
        prompt_tokens = generation.encode_prompt(tokenizer, args.prompt, args.chat, args.system)
        if len(prompt_tokens) >= args.max_seq_len:
            raise ValueError(f"the prompt is {len(prompt_tokens)} tokens, which leaves no room for new ones "
                             f"in --max-seq-len {args.max_seq_len}")

    # Under torchrun, every process runs the same loop on its slice of the model.
    llama_models.print_on_first_process_only()
    print(f"loaded {args.model_dir} in {load_s:.1f} s", file=sys.stderr)
    print(model_summary(model), file=sys.stderr)
    if isinstance(draft, speculative.DraftModel):
        print(f"draft {args.draft}: {model_summary(draft.model)}", file=sys.stderr)
    if args.max_memory:
        print(model.block_streamer or f"max_memory {args.max_memory} holds the whole model: nothing is streamed",
              file=sys.stderr)
    return model, tokenizer, draft, prompt_tokens, load_s


def check_speculative_flags(args) -> None:
    if not args.decoding.startswith("speculative"):
        if args.draft is not None or args.draft_quantize is not None:
            raise ValueError("--draft and --draft-quantize apply to --decoding speculative or speculative-sample")
        return
    if args.draft is None:
        raise ValueError(f"--decoding {args.decoding} needs a proposer: --draft DIR or --draft prompt-lookup")
    if args.draft == "prompt-lookup" and args.draft_quantize is not None:
        raise ValueError("--draft prompt-lookup uses no draft model: drop --draft-quantize")


def show_top_tokens(tokenizer, n: int):
    """An on_token for --show-top: the chosen token, then the n most likely with probabilities."""
    def on_token(logits, token):
        probs = logits.softmax(dim=-1)  # the model's own distribution, before any sampling filter
        top = probs.topk(n)
        alternatives = "  ".join(f"{generation.token_text(tokenizer, int(t))} {float(p):.3f}"
                                 for p, t in zip(top.values, top.indices))
        print(f"-> {generation.token_text(tokenizer, token)} ({float(probs[token]):.3f})  |  {alternatives}",
              flush=True)
    return on_token


def on_pass(stats: Stats, tokenizer, show: int):
    """An on_pass for speculative decoding: count the guesses; with --show-top, print each pass's
    guesses, kept ones first, and how many passed."""
    def on_pass(guesses, kept):
        stats.verified(len(guesses), kept)
        if not show:
            return
        if not guesses:
            print("pass: no guesses (a plain step)", flush=True)
            return
        shown = [generation.token_text(tokenizer, t) for t in guesses]
        dropped = f"  dropped {' '.join(shown[kept:])}" if kept < len(guesses) else ""  # rejected, or after the end
        print(f"pass: {kept}/{len(guesses)} guesses accepted  {' '.join(shown[:kept]) or '-'}{dropped}", flush=True)
    return on_pass


def print_beam_search(model, tokenizer, prompt_tokens, max_new_tokens, beam_width, length_penalty, early_stopping,
                      show_top: int, stats: Stats) -> None:
    """Beam search: a progress line per step (or the beam table), then the n-best list."""
    latest = []  # the last step's candidates, to show the best beam on Ctrl-C

    def on_beam_step(step, candidates, finished):
        stats.step()
        latest[:] = candidates
        if show_top:
            print(f"step {step}: {len(finished)}/{beam_width} finished", flush=True)
            for c in candidates[:show_top]:
                print(f"  {c.fate:>8}  from beam {c.parent}  logprob {c.logprob:9.4f}  "
                      f"+{generation.token_text(tokenizer, c.tokens[-1])}  {tokenizer.decode(c.tokens)!r}", flush=True)
        elif sys.stderr.isatty():  # a line redrawn in place; in a log file it would be one endless line
            print(f"\rbeam search: step {step}/{max_new_tokens}, {len(finished)}/{beam_width} finished",
                  end="", file=sys.stderr, flush=True)

    try:
        hypotheses = beam_search(model, prompt_tokens, beam_width=beam_width, max_new_tokens=max_new_tokens,
                                 stop_tokens=tokenizer.stop_tokens, length_penalty=length_penalty,
                                 early_stopping=early_stopping, on_beam_step=on_beam_step)
    except KeyboardInterrupt:
        best = next((c for c in latest if c.fate == "runs"), None)
        if best:
            print(f"\nbest running beam so far (logprob {best.logprob:.4f}):\n{tokenizer.decode(best.tokens)}")
        raise
    print(file=sys.stderr)
    for rank, (tokens, score) in enumerate(hypotheses, 1):
        text = tokenizer.decode([t for t in tokens if t not in tokenizer.stop_tokens])
        print(f"#{rank}  score {score:.4f}  ({len(tokens)} tokens)\n{text}\n")


def parse_args(argv=None):
    parser = cli.ArgumentParser(__doc__)
    cli.add_flags(parser, "--model-dir", "--prompt", "--prompt-file", "--chat", "--system", "--max-new-tokens",
                  "--max-seq-len", "--device", "--dtype", "--threads", "--quantize", "--max-memory", "--compile",
                  prompt=INPUT_STRING, chat=CHAT, max_new_tokens=MAX_NEW_TOKENS)
    add = parser.add_argument
    add("--decoding", choices=["greedy", "sample", "beam", "speculative", "speculative-sample"], default=DECODING,
        help="how to pick tokens")
    cli.add_flags(parser, "--temperature", "--top-k", "--top-p", "--seed")
    add("--beam-width", type=cli.at_least(1), default=BEAM_WIDTH, help="beam: hypotheses kept at each step")
    add("--length-penalty", type=float, default=LENGTH_PENALTY, help="beam: score = logprob / length**this")
    add("--early-stopping", choices=["true", "false", "never"], default=str(EARLY_STOPPING).lower(),
        help="beam: when to stop searching (see EARLY_STOPPING)")
    add("--draft", default=DRAFT, metavar="DIR|prompt-lookup",
        help="speculative: who proposes tokens: a smaller checkpoint with the same tokenizer, or n-grams of the text")
    add("--draft-quantize", choices=["int8", "int4"], default=DRAFT_QUANTIZE,
        help="speculative: weight-only int8 or int4 (CPU) linear layers for the draft model")
    add("--draft-tokens", type=cli.at_least(1), default=DRAFT_TOKENS, metavar="K",
        help="speculative: the most tokens proposed per pass of the model")
    add("--show-top", type=cli.OFF_OR_MORE, default=0, metavar="N",
        help="print each step: the chosen token and the N most likely (beam: the N best candidates)")
    args = parser.parse_args(argv)
    args.early_stopping = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    return args


if __name__ == "__main__":
    cli.run(main)
