"""Convert the GGUF file of a Llama-architecture model into a Meta-format checkpoint directory.

    python tools/convert_gguf.py MODEL.gguf OUT_DIR
    python tools/convert_gguf.py ollama:llama3.2:1b ~/.llama/checkpoints/Llama3.2-1B-Instruct
    python tools/convert_gguf.py .cache/SmolLM2-135M-Instruct.Q4_1.gguf \
        ~/.llama/checkpoints/SmolLM2-135M-Instruct

The source is a .gguf file, or `ollama:NAME[:TAG]`: a model Ollama has pulled, found through its
manifest (tools/ollama.py). Writes params.json, consolidated.00.pth (Meta's tensor names,
bfloat16) and tokenizer.model (Llama 3's format: `base64(token bytes) id` per line). A Llama 3
vocabulary gives Meta's tokenizer.model byte for byte and nothing else; any other vocabulary also
gets a tokenizer_config.json (what Llama 3's file does not say: the split pattern, the control
tokens, bos/eos/stop tokens and the chat format). The result loads with llama_models.load() like
any Meta checkpoint.

Llama 3.1/3.2 files carry their RoPE scaling as a tensor, rope_freqs.weight; we recover Meta's
use_scaled_rope and scale factor from it (read_rope). Quantized tensors (Q4_K, Q6_K, Q8_0, ...)
are dequantized with the `gguf` package, then stored in bfloat16: its rounding (8 bits of
mantissa) is far below the 4-bit quantization steps. The weights are converted a few rows at a
time straight into the mapped output file, so an 8B model (16 GB in bfloat16) converts in a
few hundred MB of RAM. All files are written into a temporary directory beside OUT_DIR, renamed
to OUT_DIR when complete: a failed or interrupted run leaves nothing behind, and an existing
OUT_DIR is never touched.
"""

import argparse
import base64
import dataclasses
import json
import mmap
import os
import re
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional, Union

import numpy
import torch

try:
    import gguf
    from gguf.quants import dequantize
except ImportError:
    sys.exit("error: converting GGUF files needs the gguf package: pip install -r requirements-convert.txt")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_models.args import ModelArgs  # noqa: E402
from llama_models.model import rope_frequencies  # noqa: E402
from llama_models.pages import release_pages  # noqa: E402
from llama_models.tokenizer import LLAMA3_PATTERN, _llama3_config  # noqa: E402
from tools import ollama  # noqa: E402

# GGUF tensor names -> Meta's. Unlike Hugging Face's files, GGUF keeps wq and wk in Meta's rotary
# layout (llama.cpp's converter undoes HF's permutation), so no tensor needs reordering; the
# tests check this against transformers' GGUF loader, which permutes them back to HF's layout.
GLOBAL_TENSORS = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "output.weight"}
LAYER_TENSORS = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                 "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
                 "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# Llama 3.1/3.2's RoPE scaling, as llama.cpp's converter stores it: per pair of head dimensions,
# the divisor of its base frequency. Read into params.json, not copied into the checkpoint.
ROPE_FREQS = "rope_freqs.weight"
# Meta's (multiple_of, ffn_dim_multiplier) for Llama 3.x: 3.2 1B, 3.2 3B, 70B, 8B, 405B. When one
# reproduces the file's feed-forward width, params.json gets Meta's own numbers. Several pairs can
# give one width (for 1B's, 4096 and 1.3 too); in this order, each model's own comes first.
META_FFN_PARAMS = [(256, 1.5), (256, 1.0), (4096, 1.3), (1024, 1.3), (4096, 1.2)]
# Rows dequantized at a time: float32 temporaries of about this many bytes, whatever the model.
CHUNK_BYTES = 32 << 20

# tokenizer.ggml.pre names the pre-tokenizer, i.e. how text is cut into pieces before BPE. We
# need it as one regex for tiktoken. SmolLM2 (like StarCoder) first isolates every digit, then
# applies GPT-2's regex to the rest (llama.cpp: the two regexes of LLAMA_VOCAB_PRE_TYPE_SMOLLM).
# As one regex, digits come first, and a whitespace run before a digit is matched whole (the
# lookahead treats a digit like the end of text), because the first split ended the piece there.
# llama-bpe is Llama 3's own regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3 spells it out with
# [sS] instead of (?i:), the same thing).
PRE_TOKENIZER_PATTERNS = {
    "smollm": r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+",
    "llama-bpe": LLAMA3_PATTERN,
}
NORMAL_TOKEN, CONTROL_TOKEN = 1, 3  # tokenizer.ggml.token_type values (llama.cpp's enum)
# The chat format a template is written in, told by the control token it starts each turn with.
CHAT_FORMATS = {"<|start_header_id|>": "llama3", "<|im_start|>": "chatml"}
# A ChatML template that inserts a default system prompt spells it out as a literal.
CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>")
# Control tokens after which generation stops, besides eos: an instruct model trained on ChatML
# ends its turn with <|im_end|> but may still end the whole document with <|endoftext|>; Llama 3's
# ends a turn with <|eot_id|>, a tool call with <|eom_id|>, a document with <|end_of_text|>.
END_OF_GENERATION = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


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
    ffn_dim_multiplier, truncated, then rounded *up* to a multiple of multiple_of. Meta's own
    pairs are tried first (Llama 3.1 8B: dim 4096, 1024 and 1.3 give 14336). Otherwise, with
    multiple_of = hidden and ffn_dim_multiplier = hidden / base, the truncated product is hidden,
    or hidden - 1 when float rounding lands just below; either rounds up to exactly hidden.
    (SmolLM2-135M: base = int(8 * 576 / 3) = 1536 = hidden, so the multiplier is 1.0.)
    """
    for multiple_of, multiplier in META_FFN_PARAMS:
        args = ModelArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1, multiple_of=multiple_of,
                         ffn_dim_multiplier=multiplier)
        if args.ffn_hidden_dim == hidden:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    return {"multiple_of": hidden, "ffn_dim_multiplier": hidden / int(2 * (4 * dim) / 3)}


def rope_freq_factors(args: ModelArgs) -> numpy.ndarray:
    """llama.cpp's rope_freqs tensor for `args`: how much slower each pair rotates than plain RoPE.

    llama.cpp divides each base frequency by this factor, which is how its converter expresses
    Llama 3.1/3.2 RoPE scaling (there is no metadata key for it). All ones without scaling.
    """
    plain = rope_frequencies(dataclasses.replace(args, use_scaled_rope=False))
    return (plain / rope_frequencies(args)).numpy()


def read_rope(reader: gguf.GGUFReader, params: dict) -> dict:
    """use_scaled_rope and rope_scaling_factor, recovered from rope_freqs.weight.

    The slowest pair is slowed by exactly the scale factor (its wavelength is far beyond Meta's
    8192-token threshold), so that value is the candidate; Meta's formula with it must then
    reproduce every stored value. It is evaluated in float32 in another order than llama.cpp's
    converter, so the two may differ in the last bit: agreement means to 1e-6, while factors 8
    and 32 (Llama 3.1, 3.2 1B/3B) differ in the first digit for every pair they scale.
    """
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        return {"use_scaled_rope": False}
    stored = dequantize(tensor.data, tensor.tensor_type).reshape(-1)
    factor = _float32_decimal(stored[-1])
    try:
        args = ModelArgs.from_params({**params, "use_scaled_rope": True, "rope_scaling_factor": factor})
    except ValueError as e:
        raise ConversionError(f"{ROPE_FREQS}: {e}") from None
    expected = rope_freq_factors(args)
    if stored.shape != expected.shape or not numpy.allclose(stored, expected, rtol=1e-6, atol=0):
        raise ConversionError(f"{ROPE_FREQS} matches none of Meta's RoPE scalings (Llama 3.1's formula "
                              f"with factor {factor}, read from its last value, gives other values)")
    rope = {"use_scaled_rope": True}
    # Meta's params.json never names the factor: ModelArgs derives 32 for the Llama 3.2 1B/3B
    # shapes and 8 for the others. Written only when that would be wrong.
    if ModelArgs.from_params({**params, "use_scaled_rope": True}).rope_scaling_factor != factor:
        rope["rope_scaling_factor"] = factor
    return rope


def read_params(reader: gguf.GGUFReader) -> dict:
    """params.json's keys from the GGUF metadata (and rope_freqs.weight)."""
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
    }
    try:
        args = ModelArgs.from_params(params, source="the GGUF metadata")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if args.ffn_hidden_dim != ffn:
        raise ConversionError(f"cannot express feed_forward_length={ffn} in params.json")
    return {**params, **read_rope(reader, params)}


def _can_dequantize(tensor: gguf.ReaderTensor) -> bool:
    try:  # on one block: the gguf package raises NotImplementedError for a type it cannot read
        _, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        dequantize(numpy.zeros((1, type_size), numpy.uint8), tensor.tensor_type)
    except (KeyError, NotImplementedError):
        return False
    return True


def read_tensor_names(reader: gguf.GGUFReader, n_layers: int) -> dict[str, gguf.ReaderTensor]:
    """Meta's tensor names -> the GGUF's tensors, each checked: a known name, a readable type."""
    tensors = {}
    for tensor in reader.tensors:
        layer = LAYER_TENSOR_NAME.fullmatch(tensor.name)
        if tensor.name == ROPE_FREQS:
            continue  # in params.json (read_rope)
        if tensor.name in GLOBAL_TENSORS:
            name = GLOBAL_TENSORS[tensor.name]
        elif layer and layer[2] in LAYER_TENSORS and int(layer[1]) < n_layers:
            name = f"layers.{layer[1]}.{LAYER_TENSORS[layer[2]]}.weight"
        else:
            raise ConversionError(f"unexpected tensor {tensor.name!r} (not part of a plain Llama model)")
        if not _can_dequantize(tensor):
            raise ConversionError(f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the "
                                  f"gguf package cannot dequantize")
        tensors[name] = tensor
    expected = set(GLOBAL_TENSORS.values()) | {f"layers.{i}.{name}.weight" for i in range(n_layers)
                                               for name in LAYER_TENSORS.values()}
    # Tied embeddings (Llama 3.2 1B/3B, SmolLM2): the output projection is the embedding matrix,
    # and the file stores it once.
    missing = sorted(expected - set(tensors) - {"output.weight"})
    if missing:
        raise ConversionError(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    return tensors


def write_state_dict(gguf_path: Path, tensors: dict[str, gguf.ReaderTensor], path: Path,
                     progress: Optional[Callable[[int, int, int], None]]) -> None:
    """Dequantize the GGUF's tensors into consolidated.00.pth (bfloat16), a few rows at a time.

    The whole model is never in memory. torch.save first lays out the file around empty tensors
    (skip_data: their bytes are reserved, not written, and torch.empty never touches its memory,
    so they cost none); the file is then mapped with writes going to it (MAP_SHARED), each chunk
    of rows dequantized from the GGUF into its place, and its pages handed back to the OS. Each
    zip entry's CRC-32 is computed chunk by chunk as it is filled, then written into the entry's
    headers, so that the file is a valid zip (`python -m zipfile -t`), not one whose checksums
    describe the reserved zeros.

    progress(tensors done, of how many, bytes written) is called after each tensor.
    """
    # torch's (rows, columns) order: GGUF lists shapes innermost first (token_embd: [4096, 128256]).
    empty = {name: torch.empty(tuple(reversed(t.shape.tolist())), dtype=torch.bfloat16)
             for name, t in tensors.items()}
    if "output.weight" not in empty:
        # Meta's format names both; one tensor under two names is saved once by torch.save and
        # loaded (mmapped) once, so a tied head costs neither disk nor memory.
        empty["output.weight"] = empty["tok_embeddings.weight"]
    with torch.serialization.skip_data():
        torch.save(empty, path)
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        mapped = torch.load(path, mmap=True, weights_only=True)
    written, crcs = 0, {}
    with open(gguf_path, "rb") as f:
        for done, (name, tensor) in enumerate(tensors.items(), 1):
            rows = mapped[name].view(-1, int(tensor.shape[0]))  # (rows, columns); norms: (1, dim)
            crc = 0
            row_bytes = tensor.n_bytes // rows.shape[0]
            step = max(1, CHUNK_BYTES // (4 * rows.shape[1]))
            for start in range(0, rows.shape[0], step):
                chunk = rows[start:start + step]
                # Read with a plain file read, not through GGUFReader's mapping, whose pages would
                # stay in this process's memory: a 5 GB file would cost 5 GB.
                f.seek(tensor.data_offset + start * row_bytes)
                raw = numpy.fromfile(f, numpy.uint8, chunk.shape[0] * row_bytes)
                if raw.size < chunk.shape[0] * row_bytes:
                    raise ConversionError(f"tensor {tensor.name!r} is cut short (truncated file?)")
                values = dequantize(raw.reshape(chunk.shape[0], row_bytes), tensor.tensor_type)
                chunk.copy_(torch.from_numpy(values.reshape(chunk.shape)))  # float32 -> bfloat16
                crc = zlib.crc32(chunk.view(torch.int16).numpy(), crc)  # its bytes, as written
                release_pages(chunk)  # now in the page cache, on its way to disk
            crcs[rows.data_ptr()] = crc
            written += rows.numel() * rows.element_size()
            if progress:
                progress(done, len(tensors), written)
    del mapped  # unmapped: the file is complete
    write_crcs(path, [crc for _, crc in sorted(crcs.items())])


def write_crcs(path: Path, data_crcs: list[int]) -> None:
    """Write the CRC-32 of each tensor's bytes into its zip entry's two headers (the local one
    before its data, and the central directory's). data_crcs: one per data entry, in file order."""
    with zipfile.ZipFile(path) as archive:
        entries = archive.infolist()  # in file order, as torch writes them
        central = archive.start_dir
    data = [e for e in entries if "/data/" in e.filename]  # archive/data/0, ...: the tensors' bytes
    if len(data) != len(data_crcs):
        raise ConversionError(f"{path}: {len(data)} tensor entries for {len(data_crcs)} tensors written")
    crcs = {id(entry): crc for entry, crc in zip(data, data_crcs)}
    with open(path, "r+b") as f:
        for entry in entries:
            # A central directory record: 46 bytes (the CRC at 16), then name, extra and comment.
            f.seek(central)
            header = f.read(46)
            name_len, extra_len, comment_len = struct.unpack("<HHH", header[28:34])
            if id(entry) in crcs:
                for at in (entry.header_offset + 14, central + 16):  # local header: the CRC at 14
                    f.seek(at)
                    f.write(struct.pack("<I", crcs[id(entry)]))
            central += 46 + name_len + extra_len + comment_len


def read_tokenizer(reader: gguf.GGUFReader) -> tuple[str, Optional[dict]]:
    """(tokenizer.model's text, tokenizer_config.json's dict) from the GGUF vocabulary.

    For Llama 3's vocabulary the dict is None: tokenizer.model alone says everything (its 256
    special tokens are implicit), and the text is then Meta's file byte for byte.
    """
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
            # vocabularies (Llama 3's too) number merged tokens in the order of their merges, so
            # ids are ranks and the file's merges list says nothing more.
            data = bytes(char_to_byte[char] for char in text)
            lines.append(f"{base64.b64encode(data).decode()} {token_id}\n")
        else:
            raise ConversionError(f"token {token_id} ({text!r}, type {kind}) is neither byte-level nor control")
    bos = tokens[_field(reader, "tokenizer.ggml.bos_token_id")]
    eos = tokens[_field(reader, "tokenizer.ggml.eos_token_id")]
    if bos not in special_tokens or eos not in special_tokens:
        raise ConversionError(f"bos {bos!r} and eos {eos!r} must be control tokens")
    llama3 = _llama3_config(len(lines))
    # An instruct model's file names <|eot_id|> as eos: one of Llama 3's stop tokens, so
    # generation stops there with Meta's tokenizer too.
    if (pre, special_tokens, bos) == ("llama-bpe", llama3["special_tokens"], llama3["bos_token"]) \
            and eos in llama3["stop_tokens"]:
        return "".join(lines), None
    template = _field(reader, "tokenizer.chat_template", "")
    default_system = CHATML_DEFAULT_SYSTEM.search(template)
    config = {
        "pattern": PRE_TOKENIZER_PATTERNS[pre],
        "special_tokens": special_tokens,
        "bos_token": bos,
        "eos_token": eos,
        "stop_tokens": [eos] + [t for t in END_OF_GENERATION if t in special_tokens and t != eos],
        "chat_format": next((fmt for token, fmt in CHAT_FORMATS.items() if token in template), None),
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


def convert(source: Union[str, Path], out_dir: Union[str, Path],
            progress: Optional[Callable[[int, int, int], None]] = None) -> Path:
    """Write the Meta-format checkpoint of a GGUF Llama model into out_dir (which must not exist).

    Args:
        source: the .gguf file, or "ollama:NAME[:TAG]" (e.g. "ollama:llama3.2:1b"), a model in
            Ollama's store (~/.ollama/models, or $OLLAMA_MODELS).
        out_dir: directory to create, e.g. ~/.llama/checkpoints/Llama3.2-1B-Instruct.
        progress: called with (tensors done, of how many, bytes written) after each tensor.
    Returns:
        out_dir, complete.
    Raises:
        ConversionError: out_dir exists; the file or the Ollama model is missing, unreadable,
            truncated or corrupt; or it is not a Llama model we can convert (the message says why).
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists():
        raise ConversionError(f"{out_dir} already exists; remove it to convert again")
    try:
        is_ollama = str(source).startswith(ollama.PREFIX)
        gguf_path = ollama.find_model(str(source)[len(ollama.PREFIX):]) if is_ollama else Path(source)
    except ollama.OllamaError as e:
        raise ConversionError(str(e)) from None
    if not gguf_path.is_file():
        raise ConversionError(f"{gguf_path} is a directory; give the .gguf file in it" if gguf_path.is_dir()
                              else f"{gguf_path} not found")
    try:
        reader = gguf.GGUFReader(gguf_path)
        params = read_params(reader)
        tensors = read_tensor_names(reader, params["n_layers"])
        vocabulary, tokenizer_config = read_tokenizer(reader)
        # The parsed metadata (Llama 3's 128256 tokens and 280147 merges, as numpy objects) takes
        # hundreds of MB (measured: docs/benchmarks.md#gguf-metadata): let it go before the
        # minutes of writing.
        del reader
    except ConversionError as e:
        raise ConversionError(f"{source}: {e}") from None
    # What GGUFReader raises on a file that is not GGUF ("GGUF magic invalid") or is cut short
    # (numpy cannot reshape or index the missing bytes).
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise ConversionError(f"{source} is not a readable GGUF file (truncated or corrupt?): {e}") from None

    # Beside out_dir, so that the final rename stays within one file system.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        (tmp / "tokenizer.model").write_text(vocabulary)
        if tokenizer_config is not None:
            config_text = json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n"
            (tmp / "tokenizer_config.json").write_text(config_text)
        try:
            write_state_dict(gguf_path, tensors, tmp / "consolidated.00.pth", progress)
        except ConversionError as e:
            raise ConversionError(f"{source}: {e}") from None
        os.rename(tmp, out_dir)  # atomic: out_dir appears complete or not at all
    except BaseException:  # including KeyboardInterrupt: never leave a half-written directory
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def print_progress(done: int, total: int, written: int) -> None:
    """A one-line progress bar on stderr, redrawn in place: `[#####-----] 146/291 tensors, 8.1 GB`."""
    bar = "#" * (20 * done // total)
    end = "\n" if done == total else ""
    print(f"\r[{bar:<20}] {done}/{total} tensors, {written / 1e9:.1f} GB written", end=end,
          file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the .gguf file of a Llama-architecture model, or ollama:NAME[:TAG]")
    parser.add_argument("out_dir", help="checkpoint directory to create (must not exist)")
    opts = parser.parse_args()
    try:
        # The bar only on a terminal: in a log, the redrawn line would be a wall of text.
        out = convert(opts.source, opts.out_dir, print_progress if sys.stderr.isatty() else None)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # convert() has removed what it had written
        print("\n[interrupted: nothing was written]", file=sys.stderr)
        sys.exit(130)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
