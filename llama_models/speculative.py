"""Speculative decoding, annotated: a cheap proposer guesses k tokens, the model checks them in one pass.

    python run_inference.py --decoding speculative --draft prompt-lookup --prompt-file essay.txt
    python run_inference.py --decoding speculative --draft DIR --draft-quantize int4
    python run_inference.py --decoding speculative-sample --draft DIR --temperature 0.7

Decoding one token reads every weight of the model once. Where that read is the cost (a CPU is
bound by memory bandwidth; with --max-memory, by the disk), a forward pass over k + 1 positions
costs about as much as a pass over one: the weights are read once for all of them, as in a
prefill. So if something could guess the next k tokens, the model could check them all for the
price of one step and keep the ones it agrees with (Leviathan et al. 2023, Chen et al. 2023):

  1. a proposer guesses d1 .. dk, the tokens after the text so far;
  2. one forward pass over [last token, d1, .., dk], at start_pos = the last token's position.
     Row i of its logits is the model's next-token distribution after d1 .. di: what i + 1
     one-token steps would have computed, had the guesses been the text;
  3. the guesses are checked left to right. The first one the model rejects is replaced by the
     model's own token and the rest are dropped; if all k pass, row k gives one more token, the
     bonus token, for free. A pass thus yields from 1 to k + 1 tokens, never fewer than a step.

Greedy: a guess passes when it is the model's argmax, so the text is plain greedy's, token for
token. Sampling: the rejection rule in verify_sampled() keeps the model's distribution exactly.

When it pays: a pass costs the proposer's guesses plus one (k+1)-position pass of the model. If
each guess passes with probability a, a pass yields 1 + a + .. + a^k tokens on average, and

    speed-up = tokens per pass * t(one step) / (k * t(draft step) + t(pass over k + 1)).

It turns into a slow-down when the draft is wrong too often (a small: the k draft steps and the
wider pass are paid for one token), when the draft is too slow (t(draft step) near t(one step)),
or when a pass over k + 1 positions costs much more than one step: where the arithmetic, not the
read, is the limit (a GPU serving many users; a CPU whose bf16 products run near its compute
peak). benchmarks/speculative.py measures each of these costs; docs/speculative.md has numbers.
"""

from typing import Callable, Optional

import torch

from .generation import argmax, check_finite, hand_out

# Prompt lookup: try the last PROMPT_LOOKUP_MAX_NGRAM tokens first, then shorter tails down to
# PROMPT_LOOKUP_MIN_NGRAM. A longer match is more context agreeing, so likelier to continue alike.
# Not down to 1: a single token (" the", ",") has been seen before almost everywhere, and what
# followed it then is rarely what follows now; and a wrong guess is not free: it widens the pass
# (measured: docs/speculative.md, "Prompt lookup's n-grams").
PROMPT_LOOKUP_MAX_NGRAM = 3
PROMPT_LOOKUP_MIN_NGRAM = 2


# ---------------------------------------------------------------------------------------------
# The rule: which guesses to keep.
# ---------------------------------------------------------------------------------------------

def verify_greedy(logits: torch.Tensor, guesses: list[int]) -> list[int]:
    """The tokens a verification pass yields under greedy decoding.

    Args:
        logits: (k+1, V): row i is the model's prediction after the first i guesses.
        guesses: k proposed token ids.
    Returns:
        the model's argmax after each prefix, as long as the guesses match it, plus one more: the
        correction at the first mismatch, or the bonus token after k matches.
    """
    best = logits.argmax(dim=-1).tolist()  # (k+1,) what greedy would pick after each prefix
    n = 0
    while n < len(guesses) and guesses[n] == best[n]:
        n += 1
    # A kept guess *is* the model's argmax, so the first n + 1 argmaxes are the whole answer.
    return best[:n + 1]


class Draws:
    """The random choices of speculative sampling, from one private generator: a seed repeats the text."""

    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def accept(self, probability: float) -> bool:
        """True with the given probability."""
        return float(torch.rand((), generator=self.generator, device=self.generator.device)) < probability

    def draw(self, probs: torch.Tensor) -> int:
        """A token id drawn from (V,) probabilities."""
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, guess: int) -> float:
    """min(1, p(guess) / q(guess)): the chance of keeping a guess drawn from q when the model wants p.

    Where the draft gives a token less mass than the model (q < p), every such guess is kept.
    Where it gives more (q > p), only the fraction p / q is: the draft proposes that token too
    often, and the excess is thrown away. Kept guesses are therefore distributed as min(p, q).
    """
    return min(1.0, float(p[guess]) / float(q[guess]))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p - q), normalised: what to draw from when a guess is rejected.

    Keeping guesses gives each token min(p, q) of mass; the model wants p = min(p, q) + max(0, p - q).
    A rejection happens with probability sum(q - min(p, q)) = sum(max(0, p - q)) (both sides sum
    to 1), so drawing from max(0, p - q) after a rejection supplies exactly the missing mass:
    P(token x) = min(p, q)(x) + max(0, p - q)(x) = p(x). The text is the model's, whatever q is.
    """
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    if total <= 0:
        # p == q: the guess is always kept and no rejection can happen, but rounding can make
        # p/q a hair below 1. Any draw is then fine as far as the distribution goes: take p.
        return p
    return residual / total


def point_mass(token: int, like: torch.Tensor) -> torch.Tensor:
    """q for a proposer that does not sample (prompt lookup, a greedy draft): all mass on its guess."""
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q


def verify_sampled(logits: torch.Tensor, guesses: list[int], draft_probs: Optional[list[torch.Tensor]],
                   distribution: Callable[[torch.Tensor], torch.Tensor], draws) -> list[int]:
    """The tokens a verification pass yields under sampling (Leviathan et al. 2023, algorithm 1).

    Args:
        logits: (k+1, V) the model's logits; row i follows the first i guesses.
        guesses: k proposed token ids.
        draft_probs: the k (V,) distributions the guesses were drawn from, or None for a proposer
            that does not sample (each guess then had probability 1: point_mass).
        distribution: logits -> the model's probabilities (sampling_distribution with the user's
            temperature, top-k and top-p). The draft must have used the same function on its logits.
        draws: a Draws (accept(probability) -> bool, draw(probs) -> token id).
    Returns:
        the kept guesses, then one token of the model's: from the residual at the first
        rejection, or, after k kept guesses, the bonus token drawn from row k.
    """
    kept = []
    for i, guess in enumerate(guesses):
        p = distribution(logits[i])  # computed only up to the first rejection
        q = draft_probs[i] if draft_probs is not None else point_mass(guess, like=p)
        if draws.accept(acceptance_probability(p, q, guess)):
            kept.append(guess)
            continue
        # Rejected: the rest of the guesses followed a token that is not in the text; drop them.
        return kept + [draws.draw(residual_distribution(p, q))]
    # Every guess passed: row k is the model's distribution after all of them, already computed.
    return kept + [draws.draw(distribution(logits[len(guesses)]))]


# ---------------------------------------------------------------------------------------------
# The proposers.
# ---------------------------------------------------------------------------------------------

class DraftModel:
    """Guesses with a smaller model that has the same tokenizer, kept in memory with its own KV cache.

    The draft decodes k one-token steps per pass, greedy or sampling from the same distribution
    function as the model. Rolling its cache back past rejected guesses costs nothing: it keeps
    the tokens its cache holds and, next time, feeds from the first position where they differ
    from the text (see the note in speculative()).
    """

    def __init__(self, model):
        self.model = model
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds, at positions 0, 1, ..

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        """Bring the draft's cache up to `tokens`; return (V,) logits for the token after them."""
        # Keep the cache up to the first position where it disagrees with the text (a rejected
        # guess) and feed the rest: usually one or two tokens. Always feed at least the last
        # token: its logits are the first guess's.
        keep, limit = 0, min(len(self.cached), len(tokens) - 1)
        while keep < limit and self.cached[keep] == tokens[keep]:
            keep += 1
        logits = self.model(torch.tensor([tokens[keep:]], device=self.model.device), start_pos=keep)[0, -1]  # (V,)
        self.cached = list(tokens)
        return logits

    def propose(self, tokens: list[int], k: int, distribution=None, draws=None):
        """k guesses after `tokens`, and the k (V,) distributions they were drawn from (None: greedy)."""
        logits = self.prefill(tokens)
        guesses, probs = [], []
        for i in range(k):
            if distribution is None:
                guess = argmax(logits)
            else:
                probs.append(distribution(logits))
                guess = draws.draw(probs[-1])
            guesses.append(guess)
            if i + 1 < k:  # the last guess need not go in: its logits would be the (k+1)-th guess's
                logits = self.model.decode_step(torch.tensor([[guess]], device=self.model.device),
                                                start_pos=len(self.cached))[0, -1]
                self.cached.append(guess)
        return guesses, (probs if distribution is not None else None)


class PromptLookup:
    """Guesses with no model: what followed the latest earlier occurrence of the text's last n tokens.

    When the answer copies from the prompt (a summary quoting it, an edit of a given text, code
    that repeats names) the last few tokens have been seen before, and what came after them then
    is a good guess for what comes next now. Free to compute; deterministic (its q is a point mass).
    """

    def __init__(self, max_ngram: int = PROMPT_LOOKUP_MAX_NGRAM, min_ngram: int = PROMPT_LOOKUP_MIN_NGRAM):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def prefill(self, tokens: list[int]) -> None:
        """Nothing to prepare: the text is the whole state."""

    def propose(self, tokens: list[int], k: int, distribution=None, draws=None):
        """Up to k guesses after `tokens` (none when the tail was never seen), and None: no distribution."""
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(tokens) <= n:
                continue
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # the latest occurrence first
                if tokens[start:start + n] == tail:
                    # Copy what followed it. Reading from the text extended by the guesses made so
                    # far lets the copy run past the text's end: a loop "x y x y" continues "x y".
                    text = list(tokens)
                    for j in range(k):
                        text.append(text[start + n + j])
                    return text[len(tokens):], None
        return [], None


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def speculative(model, proposer, prompt_tokens: list[int], *, max_new_tokens: int, stop_tokens, draft_tokens: int,
                distribution: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, seed: int = 0,
                on_token=None, on_pass=None):
    """Yield the tokens of greedy decoding (distribution=None) or of sampling, k guesses checked per pass.

    Args:
        model: a llama_models.Transformer; its KV cache is overwritten.
        proposer: DraftModel or PromptLookup.
        prompt_tokens: token ids.
        max_new_tokens: the most tokens to yield.
        stop_tokens: ids that end the text; a stop token, if hit, comes last.
        draft_tokens: k, the most guesses per pass.
        distribution: None for greedy, else logits -> probabilities (generation.sampling_distribution
            with the user's settings): the text is then distributed as generation.sample()'s.
        seed: the draws' seed, sampling only.
        on_token: called as on_token(logits, token) for each token yielded, logits (V,) float32:
            the model's prediction the token was chosen from, as in generation.greedy().
        on_pass: called as on_pass(guesses, n_kept) after each verification pass.
    """
    draws = Draws(seed, model.device) if distribution is not None else None

    def choose(logits):
        return argmax(logits) if distribution is None else draws.draw(distribution(logits))

    # Prefill both: the model's first token comes from its prompt pass, as in plain decoding.
    logits = model(torch.tensor([prompt_tokens], device=model.device), start_pos=0)[0, -1]  # (V,)
    check_finite(logits, len(prompt_tokens), model.dtype)
    proposer.prefill(prompt_tokens)
    token = choose(logits)
    if (yield from hand_out(logits, token, stop_tokens, on_token)):
        return
    tokens = [*prompt_tokens, token]
    while len(tokens) - len(prompt_tokens) < max_new_tokens:
        # A pass yields at most k + 1 tokens: never guess past max_new_tokens (or the cache's end).
        k = min(draft_tokens, max_new_tokens - (len(tokens) - len(prompt_tokens)) - 1)
        guesses, draft_probs = proposer.propose(tokens, k, distribution, draws) if k else ([], None)

        # Verify. The model's cache holds positions < len(tokens) - 1: the last token has not
        # been through it yet. It goes in first, the guesses after it, all in one pass.
        #
        # Why no rollback code: the previous pass wrote keys and values for its rejected guesses
        # too, at positions from len(tokens) - 1 on. This pass starts at exactly that position
        # and writes its own tokens' keys and values there before attending (Attention.forward),
        # and attention reads only the positions < start_pos + its length (kv_len in
        # Transformer.forward). A stale entry beyond is never read before something overwrites
        # it: "rolling back" is just choosing start_pos. The draft's cache works the same way.
        start = len(tokens) - 1
        logits = model.decode_step(torch.tensor([[tokens[-1], *guesses]], device=model.device), start)[0]  # (k+1, V)
        check_finite(logits, start + 1, model.dtype)
        if distribution is None:
            new = verify_greedy(logits, guesses)
        else:
            new = verify_sampled(logits, guesses, draft_probs, distribution, draws)
        if on_pass:  # new = the kept guesses + one of the model's; guesses after a stop token are not used
            end = next((i + 1 for i, token in enumerate(new) if token in stop_tokens), len(new))
            on_pass(guesses, min(end, len(new) - 1))
        for i, token in enumerate(new):  # row i of the logits is the one token i was chosen from
            if (yield from hand_out(logits[i], token, stop_tokens, on_token)):
                return  # what follows a stop token is not part of the text
        tokens += new


def check_same_vocabulary(model_dir, draft_dir, model, draft) -> None:
    """Raise ValueError unless the draft reads and writes the same token ids as the model.

    The guesses are token ids, compared with the model's own and, for sampling, weighed by the
    two models' probabilities of the same id: the same tokenizer files and vocabulary size.
    """
    def files(folder):
        return [(folder / name).read_bytes() if (folder / name).exists() else None
                for name in ("tokenizer.model", "tokenizer_config.json")]

    if model.params.vocab_size != draft.params.vocab_size:
        raise ValueError(f"the draft model in {draft_dir} has a vocabulary of {draft.params.vocab_size} tokens, "
                         f"the model {model.params.vocab_size}: speculative decoding needs the same tokenizer")
    if files(model_dir) != files(draft_dir):
        raise ValueError(f"the draft model in {draft_dir} has a different tokenizer from the model in {model_dir}: "
                         f"speculative decoding needs the same one")
