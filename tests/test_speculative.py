"""speculative.py: greedy text equal to plain greedy, the sampling rule's exact output distribution,
cache rollback against a fresh prefill, and the command line."""

import gc
import itertools
import random
import re
import signal

import pytest
import torch

import llama_models
import helpers
from helpers import checkpoint, cycle_checkpoint, finish, sharpened, tiny_params
from llama_models import generation, speculative
from tools.make_checkpoint import make_checkpoint

def load32(model_dir, **kwargs):
    model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=128, **kwargs)
    return model, tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The model; drafts that disagree with it often (a different random model), sometimes (the
    model with noise on its output layer) and never (the model itself), each with a KV cache of
    its own; and a prompt."""
    target_dir = sharpened(checkpoint(tmp_path_factory.mktemp("target"), seed=1))
    other_dir = sharpened(checkpoint(tmp_path_factory.mktemp("other"), seed=2))
    noisy_dir = sharpened(checkpoint(tmp_path_factory.mktemp("noisy"), seed=1))
    path = noisy_dir / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    noise = torch.randn(state_dict["output.weight"].shape, generator=torch.Generator().manual_seed(9))
    state_dict["output.weight"] = (state_dict["output.weight"].float() + 0.15 * noise).to(torch.bfloat16)
    torch.save(state_dict, path)
    target, tokenizer = load32(target_dir)
    prompt = tokenizer.encode("Seed 1: once upon a time", bos=True, eos=False)
    return dict(target=target, other=load32(other_dir)[0], noisy=load32(noisy_dir)[0], itself=load32(target_dir)[0],
                prompt=prompt, target_dir=target_dir, noisy_dir=noisy_dir)


def plain_greedy(model, prompt, max_new_tokens, stop_tokens=()):
    """Plain greedy's tokens, and the smallest gap between the best and second-best logit it saw."""
    gaps = []

    def on_token(logits, token):
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))

    tokens = list(generation.greedy(model, prompt, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                                    on_token=on_token))
    return tokens, min(gaps)


def run_speculative(model, proposer, prompt, k, max_new_tokens, stop_tokens=(), **kwargs):
    """speculative()'s tokens and [(guesses, kept)] for each pass."""
    passes = []
    tokens = list(speculative.speculative(model, proposer, prompt, max_new_tokens=max_new_tokens,
                                          stop_tokens=stop_tokens, draft_tokens=k,
                                          on_pass=lambda guesses, kept: passes.append((guesses, kept)), **kwargs))
    return tokens, passes


def proposers(models):
    return {name: speculative.DraftModel(models[name]) for name in ("other", "noisy", "itself")} | {
        "prompt lookup": speculative.PromptLookup()}


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculative_equals_plain_greedy(models, k):
    target, prompt = models["target"], models["prompt"]
    for max_new_tokens in (40, 17):  # 17 = 1 + 16: with k = 3 or 6 the last pass guesses fewer than k
        plain, gap = plain_greedy(target, prompt, max_new_tokens)
        assert gap > 1e-3  # no near-tie: one right answer at every step
        for name, proposer in proposers(models).items():
            tokens, passes = run_speculative(target, proposer, prompt, k, max_new_tokens)
            assert tokens == plain, (name, k, max_new_tokens)
            kept, proposed = sum(n for _, n in passes), sum(len(g) for g, _ in passes)
            if name == "itself":
                assert kept == proposed  # everything accepted: k + 1 tokens per pass
                assert len(passes) == -(-(max_new_tokens - 1) // (k + 1))
            else:
                assert kept < proposed, name  # rejections happen
            if name == "noisy":
                assert kept > 0  # and acceptances: runs cut short in the middle
    _, passes = run_speculative(target, speculative.PromptLookup(), prompt, k, 40)
    assert sum(n for _, n in passes) > 0  # the random model repeats itself, which prompt lookup exploits


@pytest.mark.parametrize("k", [1, 3, 6])
def test_stop_token_inside_an_accepted_run(models, k):
    target, prompt = models["target"], models["prompt"]
    free, _ = plain_greedy(target, prompt, 30)
    at = next(i for i in range(2, 7) if free[i] not in free[:i])  # a token seen first at index 2..6
    plain, _ = plain_greedy(target, prompt, 30, stop_tokens=[free[at]])
    assert plain == free[:at + 1]
    for name, proposer in proposers(models).items():
        tokens, passes = run_speculative(target, proposer, prompt, k, 30, stop_tokens=[free[at]])
        assert tokens == plain, (name, k)
        if name == "itself" and k == 6:
            # One pass kept all 6 guesses, and the text ended inside its run of 7, at the guess
            # that is the stop token: the guesses after it are not counted as accepted.
            assert [kept for _, kept in passes] == [at] and len(tokens) == 1 + at


def test_greedy_speculative_equals_plain_greedy_with_the_model_streamed(tmp_path):
    """--max-memory: the model's blocks read from disk in each pass, the draft in memory."""
    from test_offload import load_streamed  # a budget that streams: the too-small error's figure + ~1.5 blocks

    # Blocks of ~12 MB: the budget (what two blocks need + 10 MB) then stays far below the whole
    # model (8 blocks) however the process's own memory moved since earlier tests.
    params = tiny_params(dim=512, n_layers=8, n_heads=4, n_kv_heads=2, multiple_of=256)
    # float32 in the file (streaming reads the file's dtype), so rounding cannot break a tie.
    model_dir = sharpened(make_checkpoint(tmp_path / "model", params, seed=4), dtype=torch.float32)
    draft_dir = sharpened(make_checkpoint(tmp_path / "draft", dict(params, n_layers=1), seed=4))
    in_memory, tokenizer = load32(model_dir)
    streamed, _ = load_streamed(model_dir, dtype=torch.float32)
    draft, _ = load32(draft_dir)
    # Count the model's forward passes where the streamed blocks are: each one reads them all.
    reads = []
    streamed.layers[0].register_forward_pre_hook(lambda *_: reads.append(1))
    prompt = tokenizer.encode("Streamed: once upon a time", bos=True, eos=False)
    plain, gap = plain_greedy(in_memory, prompt, 24)
    assert gap > 1e-3
    for k in (1, 3, 6):
        for proposer in (speculative.DraftModel(draft), speculative.PromptLookup()):
            reads.clear()
            tokens, passes = run_speculative(streamed, proposer, prompt, k, 24)
            assert tokens == plain
            assert len(reads) == 1 + len(passes)  # the prefill, then one read of the blocks per pass
    del streamed
    gc.collect()


# --- the cache after rejections ------------------------------------------------------------------

def test_after_rejections_the_logits_equal_a_fresh_prefill(models):
    target, prompt = models["target"], models["prompt"]
    seen = []  # (logits, token) as speculative() chose each token
    calls = []  # (text, guesses) of every draft proposal

    class Recorded(speculative.DraftModel):
        def propose(self, tokens, k, distribution=None, draws=None):
            guesses, probs = super().propose(tokens, k, distribution, draws)
            calls.append((list(tokens), guesses))
            return guesses, probs

    tokens, passes = run_speculative(target, Recorded(models["noisy"]), prompt, 3, 30,
                                     on_token=lambda logits, token: seen.append((logits.clone(), token)))
    assert sum(kept < len(guesses) for guesses, kept in passes[:-1]) >= 2  # rejections, then more passes
    fresh, _ = load32(models["target_dir"])  # the same weights, a cache used for nothing else
    with torch.inference_mode():
        for i, (logits, token) in enumerate(seen):
            expected = fresh(torch.tensor([prompt + tokens[:i]]), start_pos=0)[0, -1]  # (V,)
            assert (logits - expected).abs().max() <= 1e-5, i
    # The draft's cache too: after its rejected guesses, it guesses what a fresh copy of it would.
    fresh_draft, _ = load32(models["noisy_dir"])
    for text, guesses in calls:
        assert guesses == list(generation.greedy(fresh_draft, text, max_new_tokens=len(guesses), stop_tokens=[]))


# --- sampling: the rule's output distribution, exactly -------------------------------------------

class EveryPath:
    """Stands in for speculative.Draws and walks through every outcome of the random choices.

    Each run of the code under test follows one path: a list of which option each choice took.
    accept(probability) has two options (True with weight probability, False with 1 - it),
    draw(probs) one per token of nonzero probability. paths() replays the code until every path
    has been taken once; a path's probability is the product of its options' weights. So the
    probabilities are summed over the code's own branches, in closed form, with no sampling.
    """

    def __init__(self):
        self.path, self.widths, self.at, self.probability = [], [], 0, 1.0

    def accept(self, probability):
        return self._choose([(True, probability), (False, 1.0 - probability)])

    def draw(self, probs):
        return self._choose([(x, float(probs[x])) for x in range(len(probs)) if probs[x] > 0])

    def _choose(self, options):
        if self.at == len(self.path):
            self.path.append(0)
            self.widths.append(len(options))
        value, weight = options[self.path[self.at]]
        self.at += 1
        self.probability *= weight
        return value

    def paths(self, run):
        """Yield (run(self)'s result, the probability of its path) for every path."""
        while True:
            self.at, self.probability = 0, 1.0
            yield run(self), self.probability
            del self.path[self.at:], self.widths[self.at:]  # a path that ended earlier than the last
            while self.path and self.path[-1] + 1 == self.widths[-1]:  # next path, odometer order
                self.path.pop()
                self.widths.pop()
            if not self.path:
                return
            self.path[-1] += 1


def random_distribution(rng, vocab, kind):
    """A distribution over `vocab` tokens: dense, with zeros (a top-k cut), or one-hot (greedy)."""
    weights = [rng.random() ** 3 for _ in range(vocab)]
    if kind == "zeros":
        for x in rng.sample(range(vocab), vocab // 2):
            weights[x] = 0.0
        weights[rng.randrange(vocab)] += 0.1  # never all zero
    if kind == "one-hot":
        weights = [0.0] * vocab
        weights[rng.randrange(vocab)] = 1.0
    p = torch.tensor(weights, dtype=torch.float64)
    return p / p.sum()


def conditional_table(seed, vocab, kinds):
    """p(next | prefix) for every prefix, made up at random as it is asked for."""
    rng, table = random.Random(seed), {}

    def p(prefix):
        if tuple(prefix) not in table:
            table[tuple(prefix)] = random_distribution(rng, vocab, rng.choice(kinds))
        return table[tuple(prefix)]
    return p


CASES = {  # (the model's kinds of distribution, the draft's)
    "dense": (["dense"], ["dense"]),
    "zeros on either side": (["dense", "zeros"], ["dense", "zeros"]),
    "a greedy model": (["one-hot"], ["dense", "zeros"]),
    "a greedy draft": (["dense", "zeros"], ["one-hot"]),
    "the draft is the model": (None, None),
}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("case", CASES)
def test_speculative_sampling_keeps_the_model_distribution_exactly(case, k):
    """One pass of draft guesses + verify_sampled(), continued by the model alone to k + 1 tokens,
    gives every (k+1)-token text exactly the model's probability p(x1) p(x2 | x1) ..: whatever
    the draft's q, accepted, rejected or all through to the bonus token. Vocabulary of 4."""
    vocab, context = 4, (7,)
    model_kinds, draft_kinds = CASES[case]
    for seed in range(3):
        p = conditional_table(seed, vocab, model_kinds or ["dense", "zeros"])
        q = p if case == "the draft is the model" else conditional_table(100 + seed, vocab, draft_kinds)

        def one_pass(draws):
            # What DraftModel.propose does, with q for the draft: each guess drawn after the last.
            guesses, draft_probs = [], []
            for _ in range(k):
                draft_probs.append(q(context + tuple(guesses)))
                guesses.append(draws.draw(draft_probs[-1]))
            logits = torch.stack([p(context + tuple(guesses[:i])) for i in range(k + 1)])  # (k+1, V)
            # distribution = identity: the "logits" rows are the model's probabilities already.
            return tuple(speculative.verify_sampled(logits, guesses, draft_probs, lambda row: row, draws))

        produced = {}
        for tokens, probability in EveryPath().paths(one_pass):
            produced[tokens] = produced.get(tokens, 0.0) + probability
        assert abs(sum(produced.values()) - 1) < 1e-12
        for text in itertools.product(range(vocab), repeat=k + 1):
            model_probability = 1.0
            for i, x in enumerate(text):
                model_probability *= float(p(context + text[:i])[x])
            # The pass produced some prefix of the text; the model alone wrote the rest.
            ours = 0.0
            for n in range(1, k + 2):
                rest = 1.0
                for i in range(n, k + 1):
                    rest *= float(p(context + text[:i])[text[i]])
                ours += produced.get(text[:n], 0.0) * rest
            assert abs(ours - model_probability) < 1e-12, (case, seed, text)


@pytest.mark.parametrize("k", [1, 3])
def test_prompt_lookup_guesses_keep_the_model_distribution_exactly(k):
    """A proposer that does not sample (q: all mass on its guess): any guesses, the model's distribution."""
    vocab, context = 4, (7,)
    for seed in range(3):
        p = conditional_table(seed, vocab, ["dense", "zeros"])
        guesses = [random.Random(seed).randrange(vocab) for _ in range(k)]

        def one_pass(draws):
            logits = torch.stack([p(context + tuple(guesses[:i])) for i in range(k + 1)])
            return tuple(speculative.verify_sampled(logits, guesses, None, lambda row: row, draws))

        produced = {}
        for tokens, probability in EveryPath().paths(one_pass):
            produced[tokens] = produced.get(tokens, 0.0) + probability
        # Each full text, the pass continued by the model, as above.
        for text in itertools.product(range(vocab), repeat=k + 1):
            model_probability, ours = 1.0, 0.0
            for i, x in enumerate(text):
                model_probability *= float(p(context + text[:i])[x])
            for n in range(1, k + 2):
                rest = 1.0
                for i in range(n, k + 1):
                    rest *= float(p(context + text[:i])[text[i]])
                ours += produced.get(text[:n], 0.0) * rest
            assert abs(ours - model_probability) < 1e-12


def test_the_residual_is_what_rejection_leaves_out():
    """The textbook identity behind the rule, on one position: q(x) min(1, p/q) + P(reject) r(x) = p(x)."""
    rng = random.Random(0)
    for _ in range(20):
        p, q = random_distribution(rng, 6, "zeros"), random_distribution(rng, 6, rng.choice(["dense", "zeros"]))
        keep = [float(q[x]) * speculative.acceptance_probability(p, q, x) if q[x] > 0 else 0.0 for x in range(6)]
        reject = 1 - sum(keep)
        r = speculative.residual_distribution(p, q)
        assert torch.allclose(torch.tensor(keep, dtype=torch.float64) + reject * r, p, atol=1e-12)
        assert abs(reject - float((p - q).clamp(min=0).sum())) < 1e-12  # = total variation distance


def test_seed_makes_speculative_sampling_reproducible(models):
    target, prompt = models["target"], models["prompt"]
    distribution = lambda logits: generation.sampling_distribution(logits, 1.0, 0, 0.95)  # noqa: E731
    for make in (lambda: speculative.DraftModel(models["noisy"]), speculative.PromptLookup):
        def draw(seed):
            return run_speculative(target, make(), prompt, 3, 24, distribution=distribution, seed=seed)[0]
        assert draw(1) == draw(1)
        assert draw(1) != draw(2)


# --- the command line ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cycle_dir(tmp_path_factory):
    return cycle_checkpoint(tmp_path_factory.mktemp("cycle"))


def start_script(*args):
    return helpers.start_script("run_inference.py", *args)


def test_speculative_end_to_end_prints_greedy_text_and_its_stats(cycle_dir):
    plain = ["--model-dir", str(cycle_dir), "--prompt", "🦙", "--max-new-tokens", "16", "--no-chat", "--threads", "1"]
    spec = [*plain, "--decoding", "speculative"]
    runs = {  # all at once: each run is mostly Python and torch starting up
        "greedy": start_script(*plain),
        "prompt lookup": start_script(*spec, "--draft", "prompt-lookup", "--draft-tokens", "3"),
        "draft int8": start_script(*spec, "--draft", str(cycle_dir), "--draft-quantize", "int8"),
        "show-top": start_script(*spec, "--draft", str(cycle_dir), "--draft-tokens", "5", "--show-top", "2"),
        "sample": start_script(*spec[:-1], "speculative-sample", "--draft", "prompt-lookup", "--temperature", "1.0",
                               "--top-p", "0.5", "--seed", "3"),
    }
    results = {name: finish(process) for name, process in runs.items()}
    for name, (code, stdout, stderr) in results.items():
        assert code == 0 and "Traceback" not in stderr, (name, stderr)
    expected = results["greedy"][1]
    assert len(expected) > len("🦙\n")
    for name in ("prompt lookup", "draft int8", "sample"):  # top-p 0.5 keeps only the cycle's next byte
        assert results[name][1] == expected, name
        stats = re.search(r"speculative: (\d+) of (\d+) proposed tokens accepted .*, ([0-9.]+) tokens per model pass",
                          results[name][2])
        assert stats, (name, results[name][2])
        assert "decode:" in results[name][2]
    # The draft is the model itself (int8): every guess passes, k + 1 = 5 tokens per pass.
    assert re.search(r"speculative: 12 of 12 proposed tokens accepted \(100%\), 5.00 tokens per model pass",
                     results["draft int8"][2])
    assert "draft " in results["draft int8"][2] and "int8 linear weights" in results["draft int8"][2]
    shown = results["show-top"][1]
    assert shown.endswith(expected) and shown.count("-> ") == 16
    # 16 tokens = the prefill's 1 + 6 + 6 + 3: the last pass guesses only 2, to stop at 16.
    assert shown.count("pass: 5/5 guesses accepted") == 2 and shown.count("pass: 2/2 guesses accepted") == 1


def test_ctrl_c_keeps_the_text_and_exits_130(cycle_dir):
    process = start_script("--model-dir", str(cycle_dir), "--prompt", "🦙", "--max-new-tokens", "100000",
                           "--max-seq-len", "100010", "--no-chat", "--show-top", "1", "--decoding", "speculative",
                           "--draft", "prompt-lookup")
    first_lines = [process.stdout.readline() for _ in range(5)]
    process.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(process)
    assert code == 130 and "Traceback" not in stderr, stderr
    assert "[interrupted]" in stderr and "speculative:" in stderr
    assert any(line.startswith("pass: ") for line in first_lines)
    last = stdout.splitlines()[-1]  # the text so far, printed on the way out
    assert last.startswith("🦙 ") and len(last) > len("🦙 ")


def test_a_draft_with_another_vocabulary_is_one_line(cycle_dir, tmp_path):
    other_vocab = checkpoint(tmp_path / "vocab", vocab_size=600)
    other_tokenizer = checkpoint(tmp_path / "tokenizer")
    lines = (other_tokenizer / "tokenizer.model").read_text().splitlines()
    lines[65], lines[66] = lines[66].split()[0] + " 65", lines[65].split()[0] + " 66"  # swap two tokens' ids
    (other_tokenizer / "tokenizer.model").write_text("\n".join(lines) + "\n")
    common = ["--model-dir", str(cycle_dir), "--no-chat", "--decoding", "speculative"]
    expected = {
        f"error: the draft model in {other_vocab} has a vocabulary of 600 tokens, the model 512: speculative "
        f"decoding needs the same tokenizer": ["--draft", str(other_vocab)],
        f"error: the draft model in {other_tokenizer} has a different tokenizer from the model in {cycle_dir}: "
        f"speculative decoding needs the same one": ["--draft", str(other_tokenizer)],
        "error: --decoding speculative needs a proposer: --draft DIR or --draft prompt-lookup": [],
        "error: --draft-tokens must be at least 1, got 0": ["--draft", "prompt-lookup", "--draft-tokens", "0"],
        "error: --draft prompt-lookup uses no draft model: drop --draft-quantize":
            ["--draft", "prompt-lookup", "--draft-quantize", "int4"],
    }
    runs = {message: start_script(*common, *extra) for message, extra in expected.items()}
    missing = start_script(*common, "--draft", str(tmp_path / "nowhere"))
    for message, process in runs.items():
        code, stdout, stderr = finish(process)
        assert code == 1 and stderr == message + "\n" and stdout == "", (message, stderr)
    code, _, stderr = finish(missing)
    assert code == 1 and "Traceback" not in stderr and str(tmp_path / "nowhere") in stderr
