"""Convert the GGUF file of a Llama-architecture model into a Meta-format checkpoint directory.

    python tools/convert_gguf.py MODEL.gguf OUT_DIR
    python tools/convert_gguf.py .cache/SmolLM2-135M-Instruct.Q4_1.gguf \
        ~/.llama/checkpoints/SmolLM2-135M-Instruct

Writes params.json, consolidated.00.pth (Meta's tensor names, bfloat16), tokenizer.model (Llama 3's
format: `base64(token bytes) id` per line) and tokenizer_config.json (what Llama 3's file does not
say: the split pattern, the control tokens, bos/eos/stop tokens and the chat format). The result
loads with llama_models.load() like any Meta checkpoint.

Quantized tensors (e.g. Q4_1) are dequantized with the `gguf` package, then stored in bfloat16:
its rounding (8 bits of mantissa) is far below the 4-bit quantization steps. All files are written
into a temporary directory beside OUT_DIR, renamed to OUT_DIR when complete: a failed or
interrupted run leaves nothing behind, and an existing OUT_DIR is never touched.
"""

import argparse
import base64
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Union

import gguf
import numpy
import torch
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_models.args import ModelArgs  # noqa: E402

# GGUF tensor names -> Meta's. Unlike Hugging Face's files, GGUF keeps wq and wk in Meta's rotary
# layout (llama.cpp's converter undoes HF's permutation), so no tensor needs reordering; the
# tests check this against transformers' GGUF loader, which permutes them back to HF's layout.
GLOBAL_TENSORS = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "output.weight"}
LAYER_TENSORS = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                 "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
                 "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# tokenizer.ggml.pre names the pre-tokenizer, i.e. how text is cut into pieces before BPE. We
# need it as one regex for tiktoken. SmolLM2 (like StarCoder) first isolates every digit, then
# applies GPT-2's regex to the rest (llama.cpp: the two regexes of LLAMA_VOCAB_PRE_TYPE_SMOLLM).
# As one regex, digits come first, and a whitespace run before a digit is matched whole (the
# lookahead treats a digit like the end of text), because the first split ended the piece there.
PRE_TOKENIZER_PATTERNS = {
    "smollm": r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+",
}
NORMAL_TOKEN, CONTROL_TOKEN = 1, 3  # tokenizer.ggml.token_type values (llama.cpp's enum)
# A ChatML template that inserts a default system prompt spells it out as a literal.
CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>")
# Control tokens after which generation stops, besides eos: an instruct model trained on ChatML
# ends its turn with <|im_end|> but may still end the whole document with <|endoftext|>.
END_OF_GENERATION = ("<|im_end|>", "<|endoftext|>")


class ConversionError(Exception):
    """A GGUF file we cannot convert; the message says why."""


_REQUIRED = object()


def _field(reader: gguf.GGUFReader, key: str, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ConversionError(f"metadata key {key!r} missing")
        return default
    return field.contents()


def _float32_decimal(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.999999747378752e-06. The shortest
    # decimal that rounds to the same float32 is what the model's authors wrote.
    return float(str(numpy.float32(value)))  # numpy prints a float32's shortest decimal


def swiglu_params(dim: int, hidden: int) -> dict:
    """multiple_of and ffn_dim_multiplier for which ModelArgs.ffn_hidden_dim is `hidden`.

    ModelArgs derives the SwiGLU width Meta's way: base = int(8 * dim / 3), times
    ffn_dim_multiplier, truncated, then rounded *up* to a multiple of multiple_of. With
    multiple_of = hidden and ffn_dim_multiplier = hidden / base, the truncated product is hidden,
    or hidden - 1 when float rounding lands just below; either rounds up to exactly hidden.
    (SmolLM2-135M: base = int(8 * 576 / 3) = 1536 = hidden, so the multiplier is 1.0.)
    """
    return {"multiple_of": hidden, "ffn_dim_multiplier": hidden / int(2 * (4 * dim) / 3)}


def read_params(reader: gguf.GGUFReader) -> dict:
    """params.json's keys from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"architecture is {arch!r}; only 'llama' models can be converted")
    dim, n_heads = _field(reader, "llama.embedding_length"), _field(reader, "llama.attention.head_count")
    if _field(reader, "llama.rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise ConversionError("rotary embeddings on part of each head (rope.dimension_count) are not supported")
    if "llama.rope.scaling.type" in reader.fields:
        raise ConversionError("RoPE scaling (llama.rope.scaling.type) is not supported")
    ffn = _field(reader, "llama.feed_forward_length")
    params = {
        "dim": dim,
        "n_layers": _field(reader, "llama.block_count"),
        "n_heads": n_heads,
        "n_kv_heads": _field(reader, "llama.attention.head_count_kv", n_heads),
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        **swiglu_params(dim, ffn),
        "norm_eps": _float32_decimal(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_decimal(_field(reader, "llama.rope.freq_base", 10000.0)),
        "use_scaled_rope": False,
    }
    try:
        args = ModelArgs.from_params(params, source="the GGUF metadata")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if args.ffn_hidden_dim != ffn:
        raise ConversionError(f"cannot express feed_forward_length={ffn} in params.json")
    return params


def read_state_dict(reader: gguf.GGUFReader, n_layers: int) -> dict[str, torch.Tensor]:
    """Meta's tensor names -> bfloat16 tensors, dequantized."""
    state_dict = {}
    for tensor in reader.tensors:
        layer = LAYER_TENSOR_NAME.fullmatch(tensor.name)
        if tensor.name in GLOBAL_TENSORS:
            name = GLOBAL_TENSORS[tensor.name]
        elif layer and layer[2] in LAYER_TENSORS and int(layer[1]) < n_layers:
            name = f"layers.{layer[1]}.{LAYER_TENSORS[layer[2]]}.weight"
        else:
            raise ConversionError(f"unexpected tensor {tensor.name!r} (not part of a plain Llama model)")
        # dequantize returns float32 in PyTorch's (rows, columns) order: GGUF lists shapes
        # innermost first, so token_embd's [576, 49152] comes back as (49152, 576).
        state_dict[name] = torch.tensor(dequantize(tensor.data, tensor.tensor_type), dtype=torch.bfloat16)
    # Tied embeddings (SmolLM2): the output projection is the embedding matrix, and the file
    # stores it once. Meta's format names both; one tensor under two names is saved once by
    # torch.save and loaded (mmapped) once, so this costs neither disk nor memory.
    if "output.weight" not in state_dict and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    expected = set(GLOBAL_TENSORS.values()) | {f"layers.{i}.{name}.weight" for i in range(n_layers)
                                               for name in LAYER_TENSORS.values()}
    missing = sorted(expected - set(state_dict))
    if missing:
        raise ConversionError(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    return state_dict


def read_tokenizer(reader: gguf.GGUFReader) -> tuple[str, dict]:
    """(tokenizer.model's text, tokenizer_config.json's dict) from the GGUF vocabulary."""
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ConversionError("only byte-level BPE vocabularies (tokenizer.ggml.model 'gpt2') are supported")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZER_PATTERNS:
        known = ", ".join(PRE_TOKENIZER_PATTERNS)
        raise ConversionError(f"pre-tokenizer {pre!r} is not supported (known: {known})")
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    # GPT-2's vocabulary spells each byte as a printable character (b" " as "Ġ", b"\n" as "Ċ");
    # Llama 3's file holds the bytes themselves.
    char_to_byte = {char: byte for byte, char in _gpt2_bytes_to_unicode().items()}
    lines, special_tokens = [], {}
    for token_id, (text, kind) in enumerate(zip(tokens, types)):
        if kind == CONTROL_TOKEN:
            special_tokens[text] = token_id
        elif kind == NORMAL_TOKEN and all(char in char_to_byte for char in text):
            # rank = id: tiktoken merges the pair whose result has the lowest rank; GPT-2-style
            # vocabularies number merged tokens in the order of their merges, so ids are ranks.
            data = bytes(char_to_byte[char] for char in text)
            lines.append(f"{base64.b64encode(data).decode()} {token_id}\n")
        else:
            raise ConversionError(f"token {token_id} ({text!r}, type {kind}) is neither byte-level nor control")
    template = _field(reader, "tokenizer.chat_template", "")
    default_system = CHATML_DEFAULT_SYSTEM.search(template)
    bos = tokens[_field(reader, "tokenizer.ggml.bos_token_id")]
    eos = tokens[_field(reader, "tokenizer.ggml.eos_token_id")]
    if bos not in special_tokens or eos not in special_tokens:
        raise ConversionError(f"bos {bos!r} and eos {eos!r} must be control tokens")
    config = {
        "pattern": PRE_TOKENIZER_PATTERNS[pre],
        "special_tokens": special_tokens,
        "bos_token": bos,
        "eos_token": eos,
        "stop_tokens": [eos] + [t for t in END_OF_GENERATION if t in special_tokens and t != eos],
        "chat_format": "chatml" if "<|im_start|>" in template else None,
        "default_system_prompt": default_system[1] if default_system else None,
    }
    return "".join(lines), config


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    # GPT-2's table: printable bytes stand for themselves; the other 68 (control characters,
    # space, and a few in 127-255) are shifted to code points 256 and up, in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def convert(gguf_path: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Write the Meta-format checkpoint of a GGUF Llama model into out_dir (which must not exist).

    Args:
        gguf_path: the .gguf file.
        out_dir: directory to create, e.g. ~/.llama/checkpoints/SmolLM2-135M-Instruct.
    Returns:
        out_dir, complete.
    Raises:
        ConversionError: out_dir exists, or the file is unreadable, truncated, or not a Llama model.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir).expanduser()
    if out_dir.exists():
        raise ConversionError(f"{out_dir} already exists; remove it to convert again")
    if not gguf_path.is_file():
        raise ConversionError(f"{gguf_path} not found")
    try:
        reader = gguf.GGUFReader(gguf_path)
        params = read_params(reader)
        state_dict = read_state_dict(reader, params["n_layers"])
        vocabulary, tokenizer_config = read_tokenizer(reader)
    except ConversionError as e:
        raise ConversionError(f"{gguf_path}: {e}") from None
    # What GGUFReader raises on a file that is not GGUF ("GGUF magic invalid") or is cut short
    # (numpy cannot reshape or index the missing bytes).
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise ConversionError(f"{gguf_path} is not a readable GGUF file (truncated or corrupt?): {e}") from None

    # Beside out_dir, so that the final rename stays within one file system.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        torch.save(state_dict, tmp / "consolidated.00.pth")
        (tmp / "tokenizer.model").write_text(vocabulary)
        config_text = json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n"
        (tmp / "tokenizer_config.json").write_text(config_text)
        os.rename(tmp, out_dir)  # atomic: out_dir appears complete or not at all
    except BaseException:  # including KeyboardInterrupt: never leave a half-written directory
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf_file", help="the .gguf file of a Llama-architecture model")
    parser.add_argument("out_dir", help="checkpoint directory to create (must not exist)")
    opts = parser.parse_args()
    try:
        out = convert(opts.gguf_file, opts.out_dir)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
