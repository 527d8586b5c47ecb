"""Generation: how a model's scores become text, one token at a time.

For the next position a language model gives one score (logit) per vocabulary entry; decoding is
the rule that turns those scores into a token. Every rule here uses the same two model calls:

    prefill      model(prompt, start_pos)           the whole prompt in one pass: it writes every
                                                     prompt position's keys and values into the KV
                                                     cache; the last position's logits choose token 1
    decode step  model.decode_step([[token]], pos)   one token in, at its position; the cache holds
                                                     everything before it; its logits choose the next

greedy() takes the most likely token each step, sample() draws one from sampling_distribution().
Both are generators: they yield each token as it is chosen, so the caller can print it at once,
and stop at a stop token (yielded last, never fed back) or after max_new_tokens. TextStream turns
the yielded ids into text as soon as each character is complete. run_inference.py adds beam
search; llama_models.speculative checks several proposed tokens per pass; llama_models.batching
decodes several texts together, one step for all (serve.py).
"""

import codecs
from typing import Callable, Iterator

import torch

from .chat_format import ChatFormat


def encode_prompt(tokenizer, prompt: str, chat: bool, system_prompt: str = "") -> list[int]:
    """The token ids to prefill: the chat template around the prompt, or bos + the plain text."""
    if chat:
        # The chat template wraps each message in header tokens and ends with the assistant's
        # header: the model's reply is the continuation.
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return ChatFormat(tokenizer).encode_dialog_prompt(messages)
    return tokenizer.encode(prompt, bos=True, eos=False)  # plain completion: bos + the text


def sampling_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The probabilities to draw the next token from.

    Args:
        logits: (V,) float32 scores of the last position.
        temperature: > 0; logits are divided by it before the softmax. Below 1 sharpens the
            distribution, above 1 flattens it (Meta's default for Llama 3 chat: 0.6).
        top_k: keep only the top_k highest logits (and any tied with the k-th); 0 keeps all.
        top_p: then keep the smallest set of most likely tokens whose probability reaches top_p
            (nucleus sampling, Holtzman et al. 2019); 1.0 keeps all (Meta's default: 0.9).
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


def greedy(model, prompt_tokens: list[int], *, max_new_tokens: int, stop_tokens, start_pos: int = 0,
           on_token=None) -> Iterator[int]:
    """Yield the most likely next token, step after step; a stop token, if hit, comes last.

    Args:
        model: a llama_models.Transformer; its KV cache from start_pos on is overwritten.
        prompt_tokens: token ids, e.g. encode_prompt(...).
        max_new_tokens: the most tokens to yield.
        stop_tokens: ids that end the text (tokenizer.stop_tokens).
        start_pos: the position of prompt_tokens[0]; the cache must hold the tokens before it
            (chat.py's earlier turns).
        on_token: called as on_token(logits, token) before each token is yielded: logits (V,)
            float32, the scores it was chosen from.
    Every token yielded is fed back to the model, except a stop token.
    """
    return generate(model, prompt_tokens, argmax, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                    start_pos=start_pos, on_token=on_token)


def sample(model, prompt_tokens: list[int], *, max_new_tokens: int, stop_tokens, temperature: float,
           top_k: int, top_p: float, seed: int, start_pos: int = 0, on_token=None) -> Iterator[int]:
    """Yield tokens drawn from sampling_distribution(); temperature 0 is greedy().

    Same arguments as greedy(), plus those of sampling_distribution() and the seed of the draws:
    the same seed on the same device gives the same text.
    """
    if temperature == 0:
        # The limit T -> 0 puts all the mass on the argmax; dividing by 0 would give NaNs.
        return greedy(model, prompt_tokens, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                      start_pos=start_pos, on_token=on_token)
    return generate(model, prompt_tokens, sampler(temperature, top_k, top_p, seed, model.device),
                    max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, start_pos=start_pos, on_token=on_token)


def argmax(logits: torch.Tensor) -> int:
    """Greedy's choice: the id of the highest of the (V,) logits."""
    return int(logits.argmax())


def sampler(temperature: float, top_k: int, top_p: float, seed: int, device) -> Callable[[torch.Tensor], int]:
    """sample()'s choice: a function that draws a token id from sampling_distribution() of (V,)
    logits, with draws of its own (temperature > 0).

    A private generator per text: reproducible whatever else in the process draws random numbers,
    and, in a server that decodes several texts together (serve.py), each text's draws are the
    ones it would get alone.
    """
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(logits):
        probs = sampling_distribution(logits, temperature, top_k, top_p)
        return int(torch.multinomial(probs, num_samples=1, generator=generator))

    return draw


@torch.inference_mode()  # no autograd graph: it would chain every step through the cache
def generate(model, prompt_tokens: list[int], choose: Callable[[torch.Tensor], int], *, max_new_tokens: int,
             stop_tokens, start_pos: int = 0, on_token=None) -> Iterator[int]:
    """The loop greedy() and sample() share: `choose` picks a token id from (V,) logits."""
    # Prefill: the whole prompt in one forward pass writes the keys and values of positions
    # start_pos .. start_pos + len(prompt) - 1 into the cache; only the last position's logits
    # are needed. (start_pos > 0: the cache already holds what came before, chat.py's earlier turns.)
    logits = model(torch.tensor([prompt_tokens], device=model.device), start_pos=start_pos)[0, -1]  # (V,)
    end = start_pos + len(prompt_tokens)
    for pos in range(end, end + max_new_tokens):
        check_finite(logits, pos, model.dtype)  # NaN logits have no sensible next token: stop, say why
        token = choose(logits)
        if (yield from hand_out(logits, token, stop_tokens, on_token)):
            return
        # Decode step: only the new token goes in, at its position; the cache holds the rest.
        logits = model.decode_step(torch.tensor([[token]], device=model.device), start_pos=pos)[0, -1]  # (V,)


def hand_out(logits: torch.Tensor, token: int, stop_tokens, on_token) -> Iterator[int]:
    """The end of every step, plain or speculative: show on_token the token and the logits it
    was chosen from, yield it, and return whether it ends the text: `if (yield from hand_out(..)): return`."""
    if on_token:
        on_token(logits, token)
    yield token
    return token in stop_tokens


class NonFiniteLogits(ValueError):
    """The model's output holds NaN or infinity: there is no sensible next token."""


def check_finite(logits: torch.Tensor, position: int, dtype: torch.dtype) -> None:
    """Raise NonFiniteLogits, naming the likely cause, unless every logit is finite.

    NaN logits make argmax pick an arbitrary token (often the end of text) and sampling fail: the
    run would end silently with an empty or garbled answer. `dtype` is the model's: in float16 the
    usual cause is an activation beyond 65504, its largest value.
    """
    if not torch.isfinite(logits).all():
        cause = ("float16 cannot hold this model's activations (its largest value is 65504): "
                 "use bfloat16 or float32" if dtype == torch.float16 else
                 "the checkpoint's weights may hold NaN or infinity")
        raise NonFiniteLogits(f"the model's logits at position {position} are not finite (NaN or inf); {cause}")


class TextStream:
    """Token ids in, text out as soon as each character is complete.

    One character (an emoji, a CJK ideograph) can span several byte-level tokens: an incremental
    UTF-8 decoder holds the bytes of an unfinished character until the rest arrives. Stop tokens
    are not text. Invalid bytes become U+FFFD, as in tokenizer.decode().
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """The text `token` completes ("" while a character is unfinished, or for a stop token)."""
        if token in self.tokenizer.stop_tokens:
            return ""
        return self.utf8.decode(self.tokenizer.decode_bytes([token]))

    def end(self) -> str:
        """What is left at the end of the text: U+FFFD for an unfinished character, else ""."""
        return self.utf8.decode(b"", final=True)


def token_text(tokenizer, token: int) -> str:
    """One token as a reader should see it: repr of its text, or of its bytes (b'\\xf0') when they
    are a piece of a multi-byte character."""
    raw = tokenizer.decode_bytes([token])
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)
