"""Write a Meta-format checkpoint as a GGUF file for llama.cpp: F32, F16, BF16, Q8_0, Q4_0, Q4_1, ...

    python tools/write_gguf.py META_DIR OUT.gguf --type Q8_0
    python tools/write_gguf.py SmolLM2-dir smollm2-f32.gguf --type F32 --vocab-from SmolLM2.Q4_1.gguf

The benchmarks compare our model with llama.cpp on the *same weights*, so the GGUF is made from
our checkpoint rather than downloaded. The tokenizer metadata is copied from another GGUF file
(--vocab-from; e.g. SmolLM2's own), or else built from a Llama 3 tokenizer.model, laid out as
llama.cpp's converter does for Llama 3 (llama-bpe, GPT-2-style token strings and merges).

q and k stay in Meta's rotary layout, which is llama.cpp's too (its converter undoes Hugging
Face's permutation). Norms are always F32, as in llama.cpp's own files; Llama 3.1+ RoPE scaling
goes into rope_freqs.weight, and a tied output head (Llama 3.2 1B/3B) is not written, as there.
The K-quants (Q4_K, Q6_K, ...) are llama.cpp's own (llama-quantize); the gguf package cannot
make them.
"""

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy
import torch
from gguf.quants import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_models.args import ModelArgs  # noqa: E402
from llama_models.tokenizer import Tokenizer, read_vocabulary  # noqa: E402
from tools.convert_gguf import (CONTROL_TOKEN, GLOBAL_TENSORS, LAYER_TENSORS, NORMAL_TOKEN, ROPE_FREQS,  # noqa: E402
                                _gpt2_bytes_to_unicode, rope_freq_factors)

# The types the gguf package can quantize to, with the file type llama.cpp records for each.
TYPES = {name: (gguf.GGMLQuantizationType[name], gguf.LlamaFileType[file_type]) for name, file_type in [
    ("F32", "ALL_F32"), ("F16", "MOSTLY_F16"), ("BF16", "MOSTLY_BF16"), ("Q8_0", "MOSTLY_Q8_0"),
    ("Q4_0", "MOSTLY_Q4_0"), ("Q4_1", "MOSTLY_Q4_1"), ("Q5_0", "MOSTLY_Q5_0"), ("Q5_1", "MOSTLY_Q5_1")]}
# Meta's tensor names -> llama.cpp's: the inverse of the converter's tables.
META_TO_GGUF = {meta: name for name, meta in GLOBAL_TENSORS.items()}
META_LAYER_TO_GGUF = {meta: name for name, meta in LAYER_TENSORS.items()}


def gguf_name(meta_name: str) -> str:
    if meta_name in META_TO_GGUF:
        return META_TO_GGUF[meta_name]
    _, layer, *module, _ = meta_name.split(".")  # layers.3.attention.wq.weight
    return f"blk.{layer}.{META_LAYER_TO_GGUF['.'.join(module)]}.weight"


def add_params(writer: gguf.GGUFWriter, args: ModelArgs) -> None:
    # The training context only makes llama.cpp warn beyond it: Llama 3.1+ (scaled RoPE) has
    # 128K, Llama 3 8K.
    writer.add_context_length(131072 if args.use_scaled_rope else 8192)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_vocab_size(args.vocab_size)


def copy_vocab(writer: gguf.GGUFWriter, path: Path) -> None:
    """Every tokenizer.* key of another GGUF file, unchanged."""
    for key, field in gguf.GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type)


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges list of a tiktoken vocabulary, as Hugging Face's converter derives it for Llama 3.

    tiktoken needs only ranks (merge the adjacent pair whose result ranks lowest); GGUF readers
    (llama.cpp, transformers) want the pairs. Every split of a token into two tokens is a merge,
    ordered by the merged token's rank, then by the parts' ranks.
    """
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[left], ranks[right], left, right) for left, right in splits]
    return [(left, right) for *_, left, right in sorted(merges)]


def llama3_vocab(writer: gguf.GGUFWriter, path: Path) -> None:
    """A GPT-2-style vocabulary built from a Llama 3 tokenizer.model, as in llama.cpp's files.

    GGUF spells each token's bytes with GPT-2's printable stand-ins (b" " as "Ġ"), merges as
    "left right" in those characters; the 256 special tokens are control tokens.
    """
    tokenizer, ranks = Tokenizer(path), read_vocabulary(path)
    byte_to_char = _gpt2_bytes_to_unicode()

    def spell(data: bytes) -> str:
        return "".join(byte_to_char[b] for b in data)

    by_id = {rank: spell(data) for data, rank in ranks.items()}
    by_id.update({token_id: text for text, token_id in tokenizer.special_tokens.items()})
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list([by_id[i] for i in range(tokenizer.n_words)])
    writer.add_token_types([NORMAL_TOKEN if i < len(ranks) else CONTROL_TOKEN for i in range(tokenizer.n_words)])
    writer.add_token_merges([f"{spell(left)} {spell(right)}" for left, right in bpe_merges(ranks)])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)


def write_gguf(model_dir: Path, out: Path, type_name: str, vocab_from: Path = None) -> None:
    qtype, file_type = TYPES[type_name]
    args = ModelArgs.from_params(json.loads((model_dir / "params.json").read_text()))
    state_dict = torch.load(model_dir / "consolidated.00.pth", mmap=True, weights_only=True)
    tmp = out.with_name(out.name + ".tmp")
    # use_temp_file: tensors are spooled to disk as they are added, not held in memory (the F32
    # file of a 1B model is 6 GB).
    writer = gguf.GGUFWriter(tmp, "llama", use_temp_file=True)
    writer.add_name(model_dir.name)
    writer.add_file_type(file_type)
    add_params(writer, args)
    if vocab_from is not None:
        copy_vocab(writer, vocab_from)
    else:
        llama3_vocab(writer, model_dir / "tokenizer.model")
    if args.use_scaled_rope:
        writer.add_tensor(ROPE_FREQS, rope_freq_factors(args))
    # A tied head (Llama 3.2 1B/3B: the output matrix is the embedding matrix) is stored once.
    # Meta's file may hold it as one tensor under two names or as two equal copies.
    if torch.equal(state_dict["output.weight"], state_dict["tok_embeddings.weight"]):
        del state_dict["output.weight"]
    for name, tensor in state_dict.items():
        data = tensor.float().numpy()
        tensor_type = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(gguf_name(name), quantize(data, tensor_type), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)  # out exists only once complete


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="Meta-format checkpoint directory (one shard)")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--type", choices=sorted(TYPES), required=True, help="type of the 2-D weights")
    parser.add_argument("--vocab-from", type=Path, help="GGUF file to copy the tokenizer metadata from "
                        "(default: build it from the checkpoint's Llama 3 tokenizer.model)")
    opts = parser.parse_args()
    write_gguf(opts.model_dir, opts.out, opts.type, opts.vocab_from)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
