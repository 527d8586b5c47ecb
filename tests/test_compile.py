"""The compiled decode step (llama_models.compiled: Inductor with freezing, max-autotune and its C++
wrapper) against the eager one: the same greedy tokens, logits within 1e-4 in float32."""

import pytest
import torch

import chat
import llama_models
import run_inference
from helpers import checkpoint, greedy_logits
from llama_models import compiled, speculative
from llama_models.report import Stats

PROMPT = [1, 50, 300, 7, 99, 12, 400, 3]


@pytest.fixture(autouse=True)
def fresh_compiler(tmp_path_factory, monkeypatch):
    """Each test compiles its own model from a clean slate, into this session's cache (never the
    user's); compiling again as the text grows raises: one graph serves every position."""
    monkeypatch.setattr(compiled, "CACHE_ROOT", tmp_path_factory.getbasetemp() / "compiled")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def tied(model_dir):
    """The checkpoint with its output head the embedding itself, as SmolLM2's."""
    path = model_dir / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    torch.save(state_dict, path)
    return model_dir


def load(model_dir, compile_it, **kwargs):
    model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=torch.float32,
                                         **{"max_seq_len": 128, **kwargs})
    if compile_it:
        compiled.compile_decode_step(model, model_dir)
    return model, tokenizer


@pytest.mark.parametrize("heads, tie, quantize", [
    ((4, 2), False, None),  # grouped-query attention, an output head of its own
    ((4, 4), True, None),  # multi-head attention, the head tied to the embedding (SmolLM2)
    ((4, 2), False, "int8"),
    ((4, 2), True, "int4"),
])
def test_compiled_steps_match_eager(tmp_path, heads, tie, quantize):
    model_dir = checkpoint(tmp_path, seed=4, n_heads=heads[0], n_kv_heads=heads[1])
    if tie:
        tied(model_dir)
    runs = {}
    for compile_it in (False, True):
        model, _ = load(model_dir, compile_it, quantize=quantize)
        with torch.inference_mode():
            # 100 steps: the attention span grows from 9 to 108 slots, through one graph.
            runs[compile_it] = torch.cat([logits[:, -1] for logits in greedy_logits(model, PROMPT, 100)])  # (101, V)
    eager, compiled_ = runs[False], runs[True]
    assert torch_dynamo_graphs() > 0
    assert torch.equal(eager.argmax(-1), compiled_.argmax(-1))  # the same greedy tokens
    assert (eager - compiled_).abs().max().item() <= 1e-4


def torch_dynamo_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_beam_search_matches_eager(tmp_path):
    model_dir = checkpoint(tmp_path, seed=5)
    results = []
    for compile_it in (False, True):
        model, _ = load(model_dir, compile_it, max_batch_size=3)
        hypotheses = run_inference.beam_search(model, PROMPT, beam_width=3, max_new_tokens=10, stop_tokens={7})
        results.append([(tokens, round(score, 4)) for tokens, score in hypotheses])
    assert results[0] == results[1]


def test_compiled_chat_turns_match_eager(tmp_path):
    """chat.py across turns: each turn's prefill is eager, its decode steps compiled, the cache shared."""
    model_dir = checkpoint(tmp_path, seed=6)
    conversations = []
    for compile_it in (False, True):
        model, tokenizer = load(model_dir, compile_it, max_seq_len=256)
        conversation = chat.Conversation(llama_models.ChatFormat(tokenizer), "Be brief.", 256, 12)
        for text in ("Hi!", "Name a colour.", "And a fruit?"):
            turn = conversation.next_turn(text)
            chat.respond(model, tokenizer, conversation, turn, {}, Stats(0.0, len(turn.tokens)))
        conversations.append(conversation.tokens)
    assert conversations[0] == conversations[1]


def test_compiled_speculative_matches_eager(tmp_path):
    """The verify pass of k + 1 tokens is a shape of its own: compiled once per width."""
    model_dir = checkpoint(tmp_path, seed=7)
    results = []
    for compile_it in (False, True):
        model, _ = load(model_dir, compile_it)
        with torch._dynamo.config.patch(error_on_recompile=False):  # one graph per pass width
            results.append(list(speculative.speculative(model, speculative.PromptLookup(), PROMPT * 3,
                                                        max_new_tokens=30, stop_tokens=[], draft_tokens=3)))
    assert results[0] == results[1]


def test_the_cache_is_keyed_by_what_the_compiled_code_depends_on(tmp_path, capsys):
    model_dir = checkpoint(tmp_path, seed=8)
    model, _ = load(model_dir, False)
    key = compiled.cache_key(model, model_dir)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert compiled.cache_key(model, model_dir) != key
    finally:
        torch.set_num_threads(threads)
    bf16, _ = llama_models.load(model_dir, device="cpu", dtype=torch.bfloat16, max_seq_len=128, pack=False)
    assert compiled.cache_key(bf16, model_dir) != key
    longer, _ = load(model_dir, False, max_seq_len=256)  # a KV cache of another size: another graph
    assert compiled.cache_key(longer, model_dir) != key
    assert compiled.cache_key(model, model_dir) == key
    # The first compile says so and fills its directory; the same key later loads from it.
    for expected in ("compiling the decode step", "loading the decode step compiled before"):
        torch._dynamo.reset()
        model, _ = load(model_dir, True)
        assert expected in capsys.readouterr().err
        with torch.inference_mode():
            greedy_logits(model, PROMPT, 2)
    assert any((compiled.CACHE_ROOT / key).iterdir())


def test_script_reports_compile_time_apart(tmp_path, capsys):
    model_dir = checkpoint(tmp_path, seed=6)
    run_inference.main(["--model-dir", str(model_dir), "--prompt", "hello", "--compile", "--max-new-tokens", "6",
                        "--max-seq-len", "64", "--no-chat"])
    report = capsys.readouterr().err
    assert "compile: " in report and "(the first decode step: compiling, or loading" in report
    assert "decode: " in report and "after the first two" in report
