"""Our Tokenizer and ChatFormat against Meta's, on the real Llama 3 tokenizer.model."""

import random
import time

import pytest

from llama_models import ChatFormat, Tokenizer

FRAGMENTS = [
    "Hello, world!", "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = 0; }",
    "1234567890", "3.14159", "-42", "1,000,000", "x=1e-9", "Ünïcödé façade naïve", "日本語のテキスト",
    "中文分词测试", "한국어", "Привет, мир", "مرحبا", "🙂🚀👩‍👩‍👧‍👦", "🇫🇷", "e\u0301", "\t\t", "   ", "\n\n\n",
    "\r\n", "  leading", "trailing  ", "I'm", "we'VE", "they'll", "<|begin_of_text|>", "<|eot_id|>",
    "<|start_header_id|>user<|end_header_id|>", "<|reserved_special_token_7|>", "<|not_special|>", "a" * 50,
    "https://example.com/a?b=c&d=e", "snake_case_name", "CamelCaseName", "😀" * 5, "\u00a0nbsp", "\u3000ideographic",
    "...", "!!!???", "$$$", "'quoted'", '"double"', "tab\tseparated\tvalues", "zero-width\u200bspace",
]


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    texts = list(FRAGMENTS)
    while len(texts) < n:
        texts.append(rng.choice(["", " ", "\n", "  "]).join(rng.choices(FRAGMENTS, k=rng.randint(2, 6))))
    return texts


@pytest.fixture(scope="module")
def ours(llama3_tokenizer_path):
    return Tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="module")
def meta(llama3_tokenizer_path):
    from models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(llama3_tokenizer_path)


def test_known_ids(ours):
    # The example in Meta's own tokenizer tests.
    assert ours.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13,
                                                                           128001]
    assert ours.special_tokens["<|begin_of_text|>"] == 128000 and ours.n_words == 128256
    assert ours.stop_tokens == [128001, 128008, 128009]  # end_of_text, eom_id, eot_id


def test_ids_equal_meta_and_round_trip(ours, meta):
    for text in corpus():
        for bos, eos in [(False, False), (True, True)]:
            ids = ours.encode(text, bos=bos, eos=eos)
            assert ids == meta.encode(text, bos=bos, eos=eos), text
        assert ours.decode(ours.encode(text, bos=False, eos=False)) == text


def test_special_token_text_is_plain_text_by_default(ours, meta):
    text = "<|eot_id|>"
    plain = ours.encode(text, bos=False, eos=False)
    assert len(plain) > 1 and 128009 not in plain
    assert ours.encode(text, bos=False, eos=False, allowed_special="all") == [128009]
    assert ours.encode(text, bos=False, eos=False, allowed_special="all") == meta.encode(
        text, bos=False, eos=False, allowed_special="all")
    with pytest.raises(ValueError):
        ours.encode(text, bos=False, eos=False, disallowed_special="all")


@pytest.mark.parametrize("length", [60_000, 450_000])
def test_long_inputs_equal_meta(ours, meta, length):
    # Runs longer than 25,000 characters without whitespace, and the 400,000-character cut.
    rng = random.Random(length)
    text = "".join(rng.choice(["x" * 30_000, "word ", "🙂", "   ", "12345", "\n"]) for _ in range(length // 2000))
    text = text[:length]
    assert ours.encode(text, bos=True, eos=False) == meta.encode(text, bos=True, eos=False)


def test_linear_time_on_long_runs_without_whitespace(ours):
    # A known slow path (tiktoken issue 195): BPE time quadratic in the length of one piece,
    # and a run without whitespace is one piece. Linear time means a 1 MB run takes seconds at
    # most (the pinned tiktoken plus our 25,000-character cuts: well under one second).
    start = time.perf_counter()
    ids = ours.encode("ab" * 500_000, bos=False, eos=False)
    assert time.perf_counter() - start < 20
    assert ours.decode(ids) == "ab" * 500_000


def test_dialog_equals_meta_chat_format(ours, meta):
    from models.datatypes import RawMessage
    from models.llama3.chat_format import ChatFormat as MetaChatFormat

    dialogs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi <|eot_id|> there"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "日本語で 🙂"}],
        [{"role": "user", "content": ""}],
    ]
    for dialog in dialogs:
        expected = MetaChatFormat(meta).encode_dialog_prompt([RawMessage(**m) for m in dialog]).tokens
        assert ChatFormat(ours).encode_dialog_prompt(dialog) == expected


def test_dialog_rejects_bad_messages(ours):
    with pytest.raises(ValueError, match="role"):
        ChatFormat(ours).encode_dialog_prompt([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="content"):
        ChatFormat(ours).encode_dialog_prompt([{"role": "user", "content": None}])
