"""SmolLM2-135M-Instruct, converted from its GGUF by tools/convert_gguf.py, against transformers'
own loading of the same GGUF: logits, greedy decoding, token ids and the chat template."""

import random
import subprocess
import sys

import pytest
import torch

import llama_models
from conftest import REPO, SMOLLM2_GGUF
from llama_models.packed import can_pack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hf_model():
    """transformers' SmolLM2 from the GGUF, float32, its weights rounded to bfloat16 like ours.

    The converter stores bfloat16 (see tools/convert_gguf.py); with transformers' float32 weights
    the logits differ by up to ~0.3 from that rounding alone, which would hide a real error.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return llama_models.load(smollm2_dir, device="cpu", dtype=torch.float32, max_seq_len=256)


def test_params_json_gives_the_gguf_shapes(smollm2):
    args = smollm2[0].params
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (576, 30, 9, 3, 49152)
    assert (args.ffn_hidden_dim, args.rope_theta, args.norm_eps) == (1536, 100000.0, 1e-5)


def test_logits_and_greedy_decoding_match_transformers(smollm2, hf_model):
    model, tokenizer = smollm2
    prompt = llama_models.ChatFormat(tokenizer).encode_dialog_prompt(
        [{"role": "user", "content": "Write a short story about a robot who learns to paint."}])
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), start_pos=0)  # (1, S, V)
        expected = hf_model(torch.tensor([prompt])).logits
        assert (logits - expected).abs().max() < 1e-3

        tokens = list(prompt)
        for _ in range(40):  # our KV-cache decode: one token per step, never stopping early
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([tokens[-1:]]), start_pos=len(tokens) - 1)
        hf_tokens = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40,
                                      min_new_tokens=40)[0].tolist()
    assert tokens == hf_tokens


def tokenizer_texts() -> list[str]:
    """Over 300 texts: handwritten edge cases, then random mixes of many kinds of characters."""
    texts = [
        "", " ", "  ", "\n", "\n\n", " \n ", "\t\tx", "a\r\nb", "end  ", "x  42", "   123456", "1 2  3   4",
        "The capital of France is Paris.", "What's the time? It's 3:45pm, isn't it? I'd've gone.",
        "HELLO WORLD", "don'T", "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) {}",
        '{"key": [1, 2.5e-3, null]}', "<div class='a'>x</div>", "SELECT * FROM t WHERE id=42;",
        "naïve café résumé", "Straße", "Привет, мир!", "日本語のテキスト", "中文，标点。", "한국어 텍스트",
        "مرحبا بالعالم", "שלום", "हिन्दी", "emoji 🎉🚀 and flags 🇫🇷 and family 👨‍👩‍👧", "١٢٣ ٤٥٦", "½ ² Ⅻ",
        "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<|im_end", "<repo_name>x<file_sep>", "<s></s>",
        "control \x04 character", "tabs\tand\u00a0nbsp\u2009thin", "zero\u200bwidth", "e\u0301 combining",
        "x" * 300, "9" * 50, " " * 40 + "y", "\n" * 7 + "z", "a.b,c;d:e!f?g", "...!!!???", "--==**",
        "https://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Users\\name", "$100.00 and €5",
    ]
    pieces = ["the", " cat", "Hello", " World", "'s", "'ll", "123", "4", " 56", "3.14", "  ", "   ", "\n",
              "\n\n", "\t", " ", ".", ",", "!", "?", "(", ")", "{", "}", "=>", "->", "==", "#", "_", "é",
              "ü", "中", "文", "ж", "🎉", "👍🏽", "\u200d", "<|im_end|>", "<|", "|>", "def", "return", "\r\n"]
    rng = random.Random(0)
    while len(texts) < 320:
        texts.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))))
    return texts


def smollm2_pre_tokenizer(hf_tokenizer):
    """transformers' tokenizer for the GGUF, with SmolLM2's real pre-tokenizer.

    transformers builds a plain GPT-2 ByteLevel split for every byte-level GGUF, ignoring its
    tokenizer.ggml.pre ("smollm"). SmolLM2's own tokenizer.json, and llama.cpp for "smollm",
    first isolate each digit, then apply GPT-2's regex. The two differ only on whitespace before
    a digit: "x  42" is x, "  ", 4, 2 for SmolLM2, but x, " ", " ", 4, 2 for transformers.
    """
    from tokenizers import Tokenizer, pre_tokenizers

    oracle = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    oracle.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return oracle


def test_token_ids_match_huggingface(smollm2_dir, hf_tokenizer):
    ours = llama_models.Tokenizer(smollm2_dir / "tokenizer.model")
    oracle = smollm2_pre_tokenizer(hf_tokenizer)
    texts = tokenizer_texts()
    for text in texts:
        # Special tokens: as control tokens when allowed, else as plain text.
        assert ours.encode(text, bos=False, eos=False, allowed_special="all") == \
            oracle.encode(text, add_special_tokens=False).ids, text
    oracle.encode_special_tokens = True
    for text in texts:
        ids = ours.encode(text, bos=False, eos=False)
        assert ids == oracle.encode(text, add_special_tokens=False).ids, text
        # Round trip, except for the characters SmolLM2 has no bytes for (dropped, as by HF).
        assert ours.decode(ids) == text.replace("\x04", ""), text

    # And transformers' tokenizer unchanged agrees wherever no whitespace precedes a digit.
    plain = [t for t in texts if not any(a.isspace() and b.isnumeric() for a, b in zip(t, t[1:]))]
    assert len(plain) > 150
    for text in plain:
        assert ours.encode(text, bos=False, eos=False) == \
            hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True), text


@pytest.mark.parametrize("messages", [
    QUESTION,
    [{"role": "system", "content": "Answer in one word."}, *QUESTION],
    [*QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "  And of Peru?\n"}],
])
def test_chatml_matches_the_models_template(smollm2_dir, hf_tokenizer, messages):
    tokenizer = llama_models.Tokenizer(smollm2_dir / "tokenizer.model")
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert expected.startswith("<|im_start|>system\n")  # the default system prompt, if none given
    assert llama_models.ChatFormat(tokenizer).encode_dialog_prompt(messages) == \
        hf_tokenizer.encode(expected, add_special_tokens=False)
    assert tokenizer.stop_tokens[0] == tokenizer.special_tokens["<|im_end|>"]


def test_run_inference_answers_in_chat_mode(smollm2_dir):
    result = subprocess.run(
        [sys.executable, "run_inference.py", "--model-dir", str(smollm2_dir), "--chat",
         "--prompt", "What is the capital of France?"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_every_dtype_and_quantization_gives_finite_logits(smollm2_dir, smollm2):
    """Every --dtype x --quantize the CPU allows, on the chat prompt of the README (37 tokens: past
    the 16 rows from which int8 prompts take the float path, where float16 once overflowed)."""
    prompt = llama_models.ChatFormat(smollm2[1]).encode_dialog_prompt(QUESTION)
    with torch.inference_mode():
        reference = smollm2[0](torch.tensor([prompt]), 0)[0].argmax(-1)  # float32, unquantized
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for quantize in (None, "int8", "int4"):
            model, _ = llama_models.load(smollm2_dir, device="cpu", dtype=dtype, quantize=quantize, max_seq_len=64)
            with torch.inference_mode():
                logits = model(torch.tensor([prompt]), 0)[0]
            assert torch.isfinite(logits).all(), (dtype, quantize)
            agreement = (logits.argmax(-1) == reference).float().mean()
            assert agreement >= 0.75, (dtype, quantize, agreement)


def test_summary_counts_parameters_as_the_checkpoint_defines_them(smollm2_dir, hf_model):
    from llama_models.report import model_summary

    for pack in (True, False):
        # float32: packed on every x86 CPU with oneDNN (bf16 packs only with AVX512)
        model, _ = llama_models.load(smollm2_dir, device="cpu", dtype=torch.float32, pack=pack, max_seq_len=64)
        summary = model_summary(model)
        # transformers counts the tied embedding and output head once: 134.5M.
        assert f"model: {hf_model.num_parameters() / 1e6:.1f}M parameters" in summary
        # A packed output head is a copy of the 49152 x 576 embedding: shown as memory.
        copy_note = f"of which {49152 * 576 * 4 / 2**20:.1f} MiB the output head's copy of the tied embedding"
        assert (copy_note in summary) == (pack and can_pack(torch.device("cpu"), torch.float32)), summary
