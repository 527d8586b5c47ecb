"""tools/convert_gguf.py on small GGUF files written here, and on broken ones."""

import random
import signal
import subprocess
import sys
import time
import zipfile

import gguf
import numpy as np
import pytest
import torch

import llama_models
from conftest import REPO, SMOLLM2_GGUF
from helpers import finish, start_script
from llama_models import ModelArgs
from tools.convert_gguf import ConversionError, _gpt2_bytes_to_unicode, convert, swiglu_params

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=160)
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Where the float16 scales sit in each quantized block (ggml-common.h's block_* structs); the
# other bytes of a block may hold anything.
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
                 "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
                 "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ2_XXS": (0,), "IQ3_S": (0,)}


def random_blocks(rng, rows: int, columns: int, type_name: str) -> np.ndarray:
    """Valid blocks of a quantized type, (rows, bytes per row): random bytes, and small positive
    float16 scales (random ones could be inf or NaN), so that weights stay near +-0.1."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * columns // block_size, type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS.get(type_name, ()):  # a type not listed is never dequantized here
        scales = rng.uniform(1e-4, 5e-4, len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path, arch="llama", skip=(), shape=TINY, types=None, extra=None, theta=10000.0):
    """A random Llama model as llama.cpp would write it: a separate output matrix, a byte-level
    vocabulary (3 control tokens, then the 256 bytes) and a ChatML template.

    skip: GGUF tensor names left out. types: GGUF tensor name -> type name ("Q4_K"): random
    valid blocks of that type instead of float32 values. extra: more tensors, name -> array.
    Returns the float32 tensors written, by GGUF name (the quantized ones are not included).
    """
    rng = np.random.default_rng(0)
    dim, hidden = shape["dim"], shape["ffn"]
    kv_dim, vocab = shape["n_kv_heads"] * dim // shape["n_heads"], len(CONTROL) + 256
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(shape["n_layers"])
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(shape["n_heads"])
    writer.add_head_count_kv(shape["n_kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(theta)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(CONTROL + list(_gpt2_bytes_to_unicode().values()))
    writer.add_token_types([3] * len(CONTROL) + [1] * 256)
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    # numpy shapes are (rows, columns): the PyTorch order; GGUF lists them reversed.
    shapes = {"token_embd.weight": (vocab, dim), "output.weight": (vocab, dim), "output_norm.weight": (dim,)}
    for i in range(shape["n_layers"]):
        shapes.update({f"blk.{i}.attn_q.weight": (dim, dim), f"blk.{i}.attn_k.weight": (kv_dim, dim),
                       f"blk.{i}.attn_v.weight": (kv_dim, dim), f"blk.{i}.attn_output.weight": (dim, dim),
                       f"blk.{i}.ffn_gate.weight": (hidden, dim), f"blk.{i}.ffn_up.weight": (hidden, dim),
                       f"blk.{i}.ffn_down.weight": (dim, hidden), f"blk.{i}.attn_norm.weight": (dim,),
                       f"blk.{i}.ffn_norm.weight": (dim,)})
    tensors = {}
    for name, tensor_shape in shapes.items():
        if name in skip:
            continue
        if types and name in types:
            qtype = gguf.GGMLQuantizationType[types[name]]
            writer.add_tensor(name, random_blocks(rng, *tensor_shape, types[name]), raw_dtype=qtype)
        else:
            tensors[name] = rng.standard_normal(tensor_shape, dtype=np.float32)
            writer.add_tensor(name, tensors[name])
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_tiny_model_converts_and_loads(tmp_path):
    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == [
        "consolidated.00.pth", "params.json", "tokenizer.model", "tokenizer_config.json"]
    model, tokenizer = llama_models.load(out, device="cpu", dtype=torch.float32)
    assert model.params.ffn_hidden_dim == TINY["ffn"]
    state = model.state_dict()
    # No tensor is reordered: GGUF's wq and wk are already in Meta's rotary layout.
    for gguf_name, meta_name in [("blk.1.attn_q.weight", "layers.1.attention.wq.weight"),
                                 ("blk.0.attn_k.weight", "layers.0.attention.wk.weight"),
                                 ("blk.1.ffn_down.weight", "layers.1.feed_forward.w2.weight"),
                                 ("output.weight", "output.weight")]:
        expected = torch.from_numpy(tensors[gguf_name]).bfloat16().float()
        assert torch.equal(state[meta_name], expected), meta_name
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.n_words) == (1, 2, 259)
    # Filled in place after torch.save laid it out, yet a valid zip: each entry's CRC-32 is its bytes'.
    assert zipfile.ZipFile(out / "consolidated.00.pth").testzip() is None
    assert tokenizer.decode(tokenizer.encode("héllo 123", bos=False, eos=False)) == "héllo 123"
    chat = llama_models.ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": "hi"}])
    assert tokenizer.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("dim, hidden", [(576, 1536), (2048, 8192), (4096, 14336), (2048, 5632), (4096, 11008),
                                         (960, 2560), (64, 160), (3072, 8192)])
def test_swiglu_params_reproduce_the_hidden_size(dim, hidden):
    args = ModelArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1, **swiglu_params(dim, hidden))
    assert args.ffn_hidden_dim == hidden


def test_swiglu_params_random_shapes():
    rng = random.Random(0)
    for _ in range(2000):
        dim, hidden = 2 * rng.randint(4, 8192), rng.randint(2, 65536)  # head_dim = dim must be even
        args = ModelArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1, **swiglu_params(dim, hidden))
        assert args.ffn_hidden_dim == hidden, (dim, hidden)


def broken_files(tmp_path):
    """name -> (path of a file the converter must refuse, what its error says)."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    files = {"metadata cut": (data[:2000], "not a readable GGUF"),
             "tensor data cut": (data[:len(data) * 2 // 3], "not a readable GGUF"),
             "garbage": (bytes(random.Random(0).randbytes(5000)), "not a readable GGUF")}
    paths = {}
    for name, (content, message) in files.items():
        path = tmp_path / (name.replace(" ", "_") + ".gguf")
        path.write_bytes(content)
        paths[name] = (path, message)
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    paths["not llama"] = (tmp_path / "gpt2.gguf", "architecture is 'gpt2'")
    write_tiny_gguf(tmp_path / "incomplete.gguf", skip={"blk.1.ffn_up.weight"})
    paths["tensor missing"] = (tmp_path / "incomplete.gguf", "layers.1.feed_forward.w3.weight")
    paths["a directory"] = (tmp_path, f"{tmp_path} is a directory; give the .gguf file in it")
    return paths


def test_broken_files_give_a_clear_error_and_leave_nothing(tmp_path):
    for name, (path, message) in broken_files(tmp_path).items():
        out = tmp_path / "out" / "model"
        with pytest.raises(ConversionError, match=message):
            convert(path, out)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), name


def test_cli_error_is_one_line(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(100))
    result = subprocess.run([sys.executable, "tools/convert_gguf.py", str(tmp_path / "bad.gguf"), str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_converting_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "SmolLM2"
    process = start_script("tools/convert_gguf.py", SMOLLM2_GGUF, out)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".SmolLM2.tmp-*/consolidated.00.pth")):  # the weights are being written
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(process)
    assert code == 130 and stderr.strip() == "[interrupted: nothing was written]", stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_never_rebuilt(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConversionError, match="already exists"):
        convert(tmp_path / "tiny.gguf", out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before



def test_broken_tokenizer_config_is_reported(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    config = out / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"eos_token"', '"eos"'))
    with pytest.raises(llama_models.CheckpointError, match="tokenizer_config.json lacks eos_token"):
        llama_models.load(out, device="cpu")


MEASURE_CONVERT = """
import sys
from tools import convert_gguf
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
convert_gguf.CHUNK_BYTES = 256 << 10  # small chunks, so that a small model shows the streaming
convert_gguf.convert(sys.argv[1], sys.argv[2] + "-warm")  # imports and first calls out of the way
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
convert_gguf.convert(sys.argv[1], sys.argv[2])
print(status("VmHWM:") - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_conversion_streams_the_weights(tmp_path):
    """Peak memory grows by a few chunks, not by the model: 50 MB of bfloat16 weights cost < 10 MB."""
    shape = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn=1536)
    write_tiny_gguf(tmp_path / "m.gguf", shape=shape)
    growth = int(subprocess.run([sys.executable, "-c", MEASURE_CONVERT, str(tmp_path / "m.gguf"), str(tmp_path / "ckpt")],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout)
    weights = (tmp_path / "ckpt" / "consolidated.00.pth").stat().st_size
    assert weights > 45e6 and growth < 10e6, (weights, growth)


@pytest.mark.parametrize("dim, hidden, multiple_of, multiplier", [
    (2048, 8192, 256, 1.5), (3072, 8192, 256, 1.0), (4096, 14336, 1024, 1.3), (8192, 28672, 4096, 1.3),
    (16384, 53248, 4096, 1.2)])
def test_llama3_shapes_get_metas_own_ffn_params(dim, hidden, multiple_of, multiplier):
    """Llama 3.2 1B, 3B, 3.1 8B, 70B, 405B: the values in Meta's params.json files."""
    assert swiglu_params(dim, hidden) == {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
