"""explore.py: hidden states and attention against transformers' eager attention, the recording
switch off (SDPA, the same logits), the tokens table against independent tokenizers, the figures,
and the command line's errors."""

import base64
import re
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import explore
import llama_models
from conftest import LLAMA3_TOKENIZER, SMOLLM2_GGUF
from helpers import (REPO, checkpoint, fp32_state_dict, hf_llama, interrupt_while_loading, memory_test_checkpoint,
                     run_script, sharpened, start_script)
from llama_models.model import ScaledDotProductAttention
from test_run_inference import nan_checkpoint

PROMPT = "The capital of France is"


def sharp_checkpoint(tmp_path, **overrides):
    """A random tiny checkpoint whose queries and keys are 8x the usual scale: at the usual init
    every attention row is nearly uniform, which any implementation would match."""
    return sharpened(checkpoint(tmp_path, seed=5, **overrides), 8, names=("attention.wq.weight", "attention.wk.weight"))


def hf_eager(model_dir, args):
    """transformers' LlamaForCausalLM on the same weights, with its explicit (eager) attention."""
    hf = hf_llama(args, fp32_state_dict(model_dir))
    hf.set_attn_implementation("eager")  # sdpa and flash attention return no attention probabilities
    return hf


def hf_inside(hf, tokens):
    """transformers' (hidden states (n_layers + 1, S, D), attentions (n_layers, H, S, S), logits (S, V))."""
    with torch.no_grad():
        out = hf(torch.tensor([tokens]), output_hidden_states=True, output_attentions=True)
    return torch.stack(out.hidden_states)[:, 0], torch.stack(out.attentions)[:, 0], out.logits[0]


def assert_same_inside(model, rec, hf_hidden, hf_attention, tolerance, relative=False):
    """Max abs difference <= tolerance; relative: for hidden states, times each state's largest entry."""
    assert rec.hidden.shape == hf_hidden.shape and rec.attention.shape == hf_attention.shape
    with torch.no_grad():
        # transformers' last hidden state is after the final norm; ours is the last block's output.
        ours = torch.cat([rec.hidden[:-1], model.norm(rec.hidden[-1])[None]])  # (n_layers + 1, S, D)
    scale = hf_hidden.abs().amax(dim=-1, keepdim=True) if relative else 1.0
    assert ((ours - hf_hidden).abs() / scale).max() <= tolerance
    assert (rec.attention - hf_attention).abs().max() <= tolerance


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_hidden_states_and_attention_equal_transformers_eager(tmp_path, n_kv_heads):
    model_dir = sharp_checkpoint(tmp_path, n_layers=3, n_kv_heads=n_kv_heads)
    model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=64)
    tokens = tokenizer.encode("Once upon a time, in a land far away", bos=True, eos=False)
    hf_hidden, hf_attention, hf_logits = hf_inside(hf_eager(model_dir, model.params), tokens)
    # Not uniform: some query puts most of its weight on one key that is not the first one.
    assert hf_attention[..., 1:].max() > 0.5

    rec = explore.record(model, tokens)
    assert rec.attention.shape == (3, 4, len(tokens), len(tokens)) and rec.layers == [0, 1, 2]
    assert_same_inside(model, rec, hf_hidden, hf_attention, 1e-5)
    # The public one-purpose functions: hidden states with attention on its fused kernel.
    assert (explore.hidden_states(model, tokens) - rec.hidden).abs().max() <= 1e-5
    assert torch.equal(explore.attention_weights(model, tokens), rec.attention)
    # The logit lens of the last block is the model's output distribution.
    lens = explore.logit_lens(model, rec.hidden[-1])  # (S, V)
    assert (lens - rec.logits.softmax(-1)).abs().max() <= 1e-6
    assert (lens - hf_logits.softmax(-1)).abs().max() <= 1e-5
    # Only the blocks asked for are recorded, in the order asked (block 1 on the fused kernel then,
    # whose output differs from the explicit one in the last bits: not bit-equal downstream).
    assert (explore.record(model, tokens, layers=[2, 0]).attention - rec.attention[[2, 0]]).abs().max() <= 1e-6


def op_names(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recording_off_is_the_fused_kernel_and_the_same_logits(tmp_path, dtype):
    model, tokenizer = llama_models.load(sharp_checkpoint(tmp_path), device="cpu", dtype=dtype, max_seq_len=64)
    tokens = torch.tensor([tokenizer.encode(PROMPT, bos=True, eos=False)])
    n = tokens.shape[1]

    def run():  # a prefill (masked) and a decode step (unmasked)
        with torch.inference_mode():
            return model(tokens, 0), model.decode_step(tokens[:, :1], n)

    before = run()
    off = op_names(run)
    assert "aten::scaled_dot_product_attention" in off
    assert not {"aten::softmax", "aten::_softmax"} & off  # no probabilities are materialised

    on = op_names(lambda: explore.record(model, tokens[0].tolist()))
    assert "aten::scaled_dot_product_attention" not in on and "aten::_softmax" in on
    # Switched off again, nothing is kept and the logits are bit for bit those of before.
    assert all(type(layer.attention.attend) is ScaledDotProductAttention for layer in model.layers)
    after = run()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    if dtype == torch.bfloat16:  # recorded bf16: finite, rows of probabilities
        rec = explore.record(model, tokens[0].tolist())
        assert torch.isfinite(rec.logits).all() and rec.hidden.dtype == torch.bfloat16
        assert torch.allclose(rec.attention.sum(-1), torch.ones(()), atol=1e-5)
        assert (rec.attention.triu(diagonal=1) == 0).all()  # causal: nothing from later positions


# --- tokens and tokenizer.model ---------------------------------------------------------------

TOKEN_TEXT = "The capital of France is 🦙 Paris, 東京!\n\t 12345 naïve"


def check_token_rows(rows, tokens, token_bytes, special_ids, vocabulary_path):
    """Each row's base64, decoded, is the token's bytes (from an independent tokenizer), and is the
    first field of the line it names in the file."""
    lines = vocabulary_path.read_bytes().splitlines()
    assert [r.id for r in rows] == tokens
    for r in rows:
        if r.id in special_ids:
            assert r.special and r.base64 is None
            continue
        assert base64.b64decode(r.base64) == token_bytes(r.id), r
        assert lines[r.line - 1].split()[0].decode() == r.base64
    assert any(r.text.startswith("b'") for r in rows)  # a piece of a character, shown as bytes


def test_tokens_of_the_llama3_tokenizer_against_metas(capsys):
    from models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(LLAMA3_TOKENIZER)
    tokenizer = llama_models.Tokenizer(LLAMA3_TOKENIZER)
    tokens = tokenizer.encode(TOKEN_TEXT, bos=True, eos=False)
    assert tokens == meta.encode(TOKEN_TEXT, bos=True, eos=False)
    rows = explore.token_rows(tokenizer, LLAMA3_TOKENIZER, tokens)
    check_token_rows(rows, tokens, meta.model.decode_single_token_bytes, set(meta.special_tokens.values()),
                     LLAMA3_TOKENIZER)
    explore.print_tokens(rows, LLAMA3_TOKENIZER)
    printed = capsys.readouterr().out
    assert "<|begin_of_text|>  special token" in printed
    assert f"{base64.b64encode(b' Paris').decode()} -> b' Paris'" in printed


@pytest.fixture(scope="module")
def hf_smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)


def test_tokens_of_smollm2_against_transformers(smollm2_dir, hf_smollm2_tokenizer, capsys):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hf = hf_smollm2_tokenizer
    tokenizer = llama_models.Tokenizer(smollm2_dir / "tokenizer.model")
    tokens = tokenizer.encode(TOKEN_TEXT, bos=False, eos=False)
    assert tokens == hf.encode(TOKEN_TEXT, add_special_tokens=False)
    # Hugging Face's byte-level BPE spells each byte as a printable character ("Ġ" is a space).
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    rows = explore.token_rows(tokenizer, smollm2_dir / "tokenizer.model", [tokenizer.bos_id] + tokens)
    check_token_rows(rows, [tokenizer.bos_id] + tokens,
                     lambda i: bytes(byte_of[c] for c in hf.convert_ids_to_tokens(i)),
                     {tokenizer.bos_id}, smollm2_dir / "tokenizer.model")


# --- a real model: SmolLM2 --------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_dir):
    return llama_models.load(smollm2_dir, device="cpu", dtype=torch.float32, max_seq_len=64)


def test_smollm2_inside_equals_transformers_eager(smollm2_dir, smollm2_fp32):
    model, tokenizer = smollm2_fp32
    tokens = tokenizer.encode(PROMPT, bos=True, eos=False)
    hf_hidden, hf_attention, hf_logits = hf_inside(hf_eager(smollm2_dir, model.params), tokens)
    rec = explore.record(model, tokens)
    assert rec.attention.shape == (30, 9, len(tokens), len(tokens))
    # 30 blocks in float32, summed in different orders. Entries reach 500, and at the first
    # position 25,000 (SmolLM2's "massive activation"), so hidden states are compared relative to
    # each state's largest entry; 2e-5 of it is ~2**8 float32 roundings of it. (Measured: 1.2e-5
    # where the weights are packed for oneDNN, AVX512, which sums in its own order; less unpacked.)
    assert_same_inside(model, rec, hf_hidden, hf_attention, 2e-5, relative=True)
    lens = explore.logit_lens(model, rec.hidden[:, -1])  # (31, V)
    assert (lens[-1] - hf_logits[-1].softmax(-1)).abs().max() <= 1e-5
    # The attention sink: in most blocks, averaged over heads, the last position reads the first
    # token more than any other.
    sink_blocks = (rec.attention[:, :, -1].mean(dim=1).argmax(dim=-1) == 0).sum()
    assert sink_blocks > 15, sink_blocks


def run_explore(*args, **kwargs):
    return run_script("explore.py", *args, **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_end_to_end(smollm2_dir, smollm2_fp32, tmp_path, dtype):
    args = ["--model-dir", str(smollm2_dir), "--prompt", PROMPT, "--threads", "1", "--dtype", dtype]
    if dtype == "float32":
        args += ["--plot", str(tmp_path / "figures"), "--plot-layers", "0,-1", "--heads", "0,4"]
    result = run_explore(*args)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    out = result.stdout
    model, tokenizer = smollm2_fp32
    tokens = tokenizer.encode(PROMPT, bos=True, eos=False)

    # Tokens: one row per token; each row's base64, decoded, is the token's bytes.
    rows = re.findall(r"^ +(\d+) +(\d+) +(.+?) +(?:(\d+)  (\S+) -> (.*)|special token.*)$", out, re.M)
    assert [int(r[1]) for r in rows] == tokens
    for _, token, _, _, b64, _ in rows[1:]:
        assert base64.b64decode(b64) == tokenizer.decode_bytes([int(token)])
    # The logit lens: 31 rows, embedding then block 0..29; the last row's top token is the model's
    # prediction (greedy: ' Paris'), at rank 1.
    lens = re.findall(r"^(embedding|block \d+) +(.+?) +(\d+)  (\d\.\d{4})$", out, re.M)  # name, top, rank, p
    assert [r[0] for r in lens] == ["embedding"] + [f"block {i}" for i in range(30)]
    assert lens[-1][1].startswith("' Paris' ") and lens[-1][2] == "1"
    first = next(i for i, r in enumerate(lens) if all(s[2] == "1" for s in lens[i:]))
    assert f"' Paris' is the top token from {lens[first][0]} on" in out
    # Attention: every block's mean line, and the heads asked for.
    assert len(re.findall(r"^block \d+ +mean ", out, re.M)) == 30 and len(re.findall(r"^ +head 4 ", out, re.M)) == 30
    assert "(the attention sink)" in out
    if dtype == "bfloat16":
        assert out.count("head ") == 30 * 9
        return

    # Pictures: PNGs that a PNG reader opens, of the size the script states.
    from PIL import Image

    written = dict(re.findall(r"^wrote (\S+) \((\d+ x \d+) pixels\): .*all 6 positions$", out, re.M))
    names = {p.rsplit("/", 1)[-1] for p in written}
    assert names == {"logit-lens.png", "attention-block-00.png", "attention-block-29.png"}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(names)
    for path, size in written.items():
        with Image.open(path) as image:
            assert image.format == "PNG" and f"{image.width} x {image.height}" == size
            image.verify()
        with Image.open(path) as image:
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50  # not a blank page
    dpi = explore.PLOT_DPI
    width, height = explore.lens_figure_size(len(tokens), 31)
    assert written[str(tmp_path / "figures" / "logit-lens.png")] == f"{round(width * dpi)} x {round(height * dpi)}"
    width, height = explore.attention_figure_size(len(tokens), 3)  # heads 0 and 4, and their mean
    assert written[str(tmp_path / "figures" / "attention-block-00.png")] == \
        f"{round(width * dpi)} x {round(height * dpi)}"


# --- the command line's errors ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("tiny"))  # 2 blocks, 4 heads


BAD_INPUT = {
    "--position 25 is out of range: the prompt has 25 tokens (0 to 24, or -25 to -1)": ["--position", "25"],
    "--position -26 is out of range: the prompt has 25 tokens (0 to 24, or -25 to -1)": ["--position", "-26"],
    "--layers: 2 is out of range: the model has 2 blocks (0 to 1, or -2 to -1)": ["--layers", "0,2"],
    "--plot-layers: -3 is out of range: the model has 2 blocks (0 to 1, or -2 to -1)":
        ["--plot", "{tmp}/figures", "--plot-layers", "-3"],
    "--heads: 4 is out of range: the model has 4 heads (0 to 3, or -4 to -1)": ["--heads", "4"],
    "--heads: 'x' is not an index; give all, none or e.g. 0,3,-1": ["--heads", "x"],
    "--sections: logits; choose from tokens, lens, attention": ["--sections", "tokens,logits"],
    "--top must be at least 1, got 0": ["--top", "0"],
    "the prompt is 25 tokens, more than --max-seq-len 8": ["--max-seq-len", "8"],
    "the prompt is empty": ["--prompt", " "],
    "--plot {tmp}/file: cannot write figures there (File exists)": ["--plot", "{tmp}/file"],
    "--plot {tmp}/file/figures: cannot write figures there ({tmp}/file is not a directory)":
        ["--plot", "{tmp}/file/figures"],
}


@pytest.mark.parametrize("message", BAD_INPUT)
def test_bad_input_names_the_problem(tiny_dir, tmp_path, message):
    (tmp_path / "file").write_text("not a folder")
    argv = [a.format(tmp=tmp_path) for a in BAD_INPUT[message]]
    with pytest.raises(SystemExit) as exit_info:
        explore.main(["--model-dir", str(tiny_dir), "--prompt", "The capital of France is", *argv])
    assert exit_info.value.code == f"error: {message.format(tmp=tmp_path)}"
    assert not (tmp_path / "figures").exists()  # a refused command leaves no --plot folder behind


def test_a_refused_plot_makes_no_folder(tiny_dir, tmp_path):
    # --plot-layers can be checked only once the model has loaded (it says how many blocks there
    # are), long after --plot's folder was checked: the folder waits for that too.
    result = run_explore("--model-dir", tiny_dir, "--threads", "1", "--plot", tmp_path / "figures",
                         "--plot-layers", "77")
    assert result.returncode == 1 and result.stderr.splitlines()[-1].startswith("error: --plot-layers: 77 ")
    assert not (tmp_path / "figures").exists()


@pytest.mark.parametrize("n_rows, n_positions, n_panels", [(31, 16, 10), (81, 16, 12), (2, 1, 1)])
def test_every_figure_fits_a_screen(n_rows, n_positions, n_panels):
    # At the default --plot-dpi, at most 2000 pixels on either side, however long the prompt
    # (cut to PLOT_POSITIONS), however deep the model, however many heads (PANELS_PER_FIGURE
    # to a figure); and never narrower than the titles (4.5 inches).
    assert n_positions <= explore.PLOT_POSITIONS and n_panels <= explore.PANELS_PER_FIGURE
    for width, height in (explore.lens_figure_size(n_positions, n_rows),
                          explore.attention_figure_size(n_positions + 1, n_panels)):  # + 1: the "others" column
        assert 4.5 <= width and max(width, height) * explore.PLOT_DPI <= 2000


def test_long_prompt_many_heads_figures_fit_and_say_what_they_show(tmp_path):
    from PIL import Image

    model_dir = checkpoint(tmp_path / "model", n_heads=16, n_kv_heads=4)  # 16 heads + the mean: 2 figures
    result = run_explore("--model-dir", model_dir, "--threads", "1", "--sections", "tokens", "--prompt", "x" * 60,
                         "--plot", tmp_path / "figures", "--plot-layers", "-1")
    assert result.returncode == 0, result.stderr
    written = re.findall(r"^wrote (\S+) \((\d+) x (\d+) pixels\): (.*)$", result.stdout, re.M)
    assert [w[0].rsplit("/", 1)[-1] for w in written] == \
        ["logit-lens.png", "attention-block-01-1.png", "attention-block-01-2.png"]
    # 61 tokens (bos and 60 bytes): the last 16 positions, and which they are.
    assert all("positions 45-60 of 61 (the last 16)" in w[3] for w in written)
    assert written[1][3].startswith("head 0 to head 11;") and written[2][3].startswith("head 12 to mean over heads;")
    for path, width, height, _ in written:
        with Image.open(path) as image:
            assert image.size == (int(width), int(height)) and max(image.size) <= 2000


def test_without_matplotlib_plot_says_what_to_install(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure -> ImportError
    with pytest.raises(SystemExit) as exit_info:
        explore.main(["--model-dir", str(tiny_dir), "--plot", str(tmp_path / "figures")])
    assert exit_info.value.code == "error: --plot needs matplotlib: pip install -r requirements-explore.txt"
    assert not (tmp_path / "figures").exists()  # it stopped before making anything


def test_command_line_errors_are_one_line(tiny_dir, tmp_path):
    common = ["--model-dir", str(tiny_dir), "--threads", "1"]
    runs = [run_explore(*common, "--position", "99"), run_explore(*common, "--layers", "7"),
            run_explore("--model-dir", str(nan_checkpoint(tmp_path)), "--prompt", "Once upon a time")]
    for result in runs:
        assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
        assert result.stderr.splitlines()[-1].startswith("error: ")
    assert "are not finite (NaN or inf)" in runs[-1].stderr
    missing = run_explore("--model-dir", str(tmp_path / "empty" / "nowhere"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "llama model download" in missing.stderr


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    model_dir = memory_test_checkpoint(tmp_path)
    result = interrupt_while_loading([sys.executable, "explore.py", "--model-dir", str(model_dir)],
                                     model_dir / "consolidated.00.pth", cwd=REPO)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().endswith("[interrupted]")


def test_output_into_a_closed_pipe_is_no_traceback(tiny_dir):
    # `python explore.py | head -3`: the reader stops reading long before the end.
    # 2,000 token rows: more than a pipe's buffer holds.
    process = start_script("explore.py", "--model-dir", tiny_dir, "--threads", "1", "--sections", "tokens",
                           "--prompt", "x" * 2000)
    process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 141 and "Traceback" not in stderr, stderr  # 128 + SIGPIPE, as `yes | head`


def test_help_shows_every_default():
    result = run_explore("--help")
    assert result.returncode == 0
    assert "(default: tokens,lens,attention)" in result.stdout and "(default: -1)" in result.stdout
