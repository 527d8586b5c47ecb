"""run_inference.py: beam search and greedy against transformers' generate(), sampling against its
logits warpers, streaming, the command line end to end."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import llama_models
import run_inference
import helpers
from helpers import (CYCLE_TEXT, REPO, checkpoint, cycle_checkpoint, finish, fp32_state_dict, hf_llama,
                     interrupt_while_loading, memory_test_checkpoint, run_script, sharpened)
from llama_models import ModelArgs, generation

MAX_BEAMS = 5


def ours_and_hf(model_dir, max_batch_size=MAX_BEAMS, max_seq_len=64):
    """Our model (float32, so that both sides compute in the same precision) and transformers'."""
    model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=max_seq_len,
                                         max_batch_size=max_batch_size)
    args = ModelArgs.from_params(json.loads((model_dir / "params.json").read_text()), max_seq_len=max_seq_len)
    return model, tokenizer, hf_llama(args, fp32_state_dict(model_dir))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two sharpened tiny models, ours and transformers', with a prompt each."""
    models = []
    for seed in (1, 2):
        model, tokenizer, hf = ours_and_hf(sharpened(checkpoint(tmp_path_factory.mktemp(f"seed{seed}"), seed=seed)))
        models.append((model, hf, tokenizer.encode(f"Seed {seed}: once upon", bos=True, eos=False)))
    return models


def hf_beam_search(hf, prompt, *, beam_width, max_new_tokens, stop_tokens, length_penalty, early_stopping):
    """transformers' n-best list: [(generated tokens, score)], best first."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          num_beams=beam_width, num_return_sequences=beam_width, do_sample=False,
                          length_penalty=length_penalty, early_stopping=early_stopping,
                          max_new_tokens=max_new_tokens, eos_token_id=stop_tokens or None,
                          pad_token_id=stop_tokens[0] if stop_tokens else 0,
                          return_dict_in_generate=True, output_scores=True)
    # beam_indices holds -1 past a hypothesis' end: its length, independent of the padding.
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
    return [(out.sequences[i, len(prompt):len(prompt) + n].tolist(), float(out.sequences_scores[i]))
            for i, n in enumerate(lengths)]


def assert_same_hypotheses(ours, theirs):
    assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (a, b)


@pytest.mark.parametrize("beam_width", [2, 4, 5])
def test_beam_search_equals_transformers(tiny, beam_width):
    max_new_tokens, kinds = 8, set()
    for model, hf, prompt in tiny:
        def compare(stop_tokens, length_penalty, early_stopping):
            kwargs = dict(beam_width=beam_width, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                          length_penalty=length_penalty, early_stopping=early_stopping)
            theirs = hf_beam_search(hf, prompt, **kwargs)
            assert_same_hypotheses(run_inference.beam_search(model, prompt, **kwargs), theirs)
            if any(tokens[-1] in stop_tokens and len(tokens) < max_new_tokens for tokens, _ in theirs):
                kinds.add("stop token")
            if any(len(tokens) == max_new_tokens for tokens, _ in theirs):
                kinds.add("limit")
            if all(len(tokens) < max_new_tokens for tokens, _ in theirs):
                kinds.add("ended early")
            return theirs

        # No stop token: every beam runs to the limit; early_stopping cannot matter.
        free = [compare([], length_penalty, False) for length_penalty in (0.5, 1.0, 2.0)][1]
        # Stop ids the beams are likely to hit: the tokens that the hypotheses of the run without
        # stop ids have at step 3 (their step-3 beams then finish at once); and those at step 5
        # plus two more ids, as Llama 3 has three, so that (1 + n) * K candidates are kept.
        for stop_tokens in (sorted({tokens[2] for tokens, _ in free}),
                            sorted({tokens[4] for tokens, _ in free}) + [300, 301]):
            for length_penalty in (0.5, 1.0, 2.0):
                for early_stopping in (True, False, "never"):
                    compare(stop_tokens, length_penalty, early_stopping)
    # With 5 beams on the seed-2 model, the pool fills at step 6 and the search ends before the
    # limit: the stopping rules are exercised, not only the length limit.
    assert kinds == {"stop token", "limit"} | ({"ended early"} if beam_width == 5 else set())


def test_greedy_equals_transformers(tiny):
    for model, hf, prompt in tiny:
        for stop_tokens in ([], [300]):
            with torch.no_grad():
                theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     do_sample=False, max_new_tokens=20, eos_token_id=stop_tokens or None,
                                     pad_token_id=0)[0, len(prompt):].tolist()
            ours = list(generation.greedy(model, prompt, max_new_tokens=20, stop_tokens=stop_tokens))
            assert ours == theirs


def test_sampling_with_temperature_zero_is_greedy(tiny):
    model, _, prompt = tiny[0]
    greedy = list(generation.greedy(model, prompt, max_new_tokens=10, stop_tokens=[]))
    sampled = generation.sample(model, prompt, max_new_tokens=10, stop_tokens=[], temperature=0, top_k=0,
                                   top_p=1.0, seed=0)
    assert list(sampled) == greedy


def test_seed_makes_sampling_reproducible(tiny):
    model, _, prompt = tiny[0]

    def draw(seed):
        return list(generation.sample(model, prompt, max_new_tokens=20, stop_tokens=[], temperature=1.0,
                                         top_k=0, top_p=0.95, seed=seed))
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def hf_sampling_distribution(logits, temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    # The order generate() applies them in; top_k=0 would be rejected by TopKLogitsWarper, and
    # generate() skips it then, as we do.
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits[None])[0].softmax(dim=-1)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 40, 1.0), (0.5, 20, 0.8), (1.0, 5, 0.99), (2.0, 0, 0.3), (0.9, 100, 0.6),
])
def test_sampling_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    # A tie at the k-th value: both tokens must be kept, as transformers does.
    kth = logits.topk(max(top_k, 1)).indices[-1]
    logits[0] = logits[kth]
    # The top-p cut (on the distribution after temperature and top-k) must not sit within float32
    # noise of a boundary between two tokens, or either answer would be right.
    mass = hf_sampling_distribution(logits, temperature, top_k, 1.0).sort(descending=True).values.cumsum(dim=0)
    assert (mass - top_p).abs().min() > 1e-4 or top_p == 1.0
    ours = generation.sampling_distribution(logits, temperature, top_k, top_p)
    theirs = hf_sampling_distribution(logits, temperature, top_k, top_p)
    assert (ours - theirs).abs().max() < 1e-6
    assert 0 < (ours > 0).sum() < 1000 or (top_k == 0 and top_p == 1.0)


# --- a model that writes a known text, for streaming and the command line ---------------------

def cycle_continuation(last_byte: int, n: int) -> bytes:
    """The n bytes the cycle model writes after `last_byte`: the oracle, by construction."""
    text = CYCLE_TEXT.encode()
    start = text.index(last_byte) + 1
    return (text * (n // len(text) + 2))[start:start + n]


@pytest.fixture(scope="module")
def cycle_dir(tmp_path_factory):
    return cycle_checkpoint(tmp_path_factory.mktemp("cycle"))


@pytest.mark.parametrize("n", [24, 26])  # 26 ends inside a character: U+FFFD on both sides
def test_streamed_text_equals_decoded_text(cycle_dir, n):
    model, tokenizer = llama_models.load(cycle_dir, device="cpu", max_seq_len=64)
    prompt = tokenizer.encode("🦙", bos=True, eos=False)
    text = generation.TextStream(tokenizer)
    tokens = list(generation.greedy(model, prompt, max_new_tokens=n, stop_tokens=tokenizer.stop_tokens))
    pieces = [text.add(token) for token in tokens] + [text.end()]
    assert bytes(tokens) == cycle_continuation(prompt[-1], n)
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert "".join(pieces) == cycle_continuation(prompt[-1], n).decode(errors="replace")
    assert "世界" in "".join(pieces) and "🦙" in "".join(pieces)


# --- the command line, in subprocesses ----------------------------------------------------------

def start_script(*args):
    return helpers.start_script("run_inference.py", *args)


def test_each_decoding_mode_end_to_end(cycle_dir, tmp_path):
    plain = ["--model-dir", str(cycle_dir), "--prompt", "🦙", "--max-new-tokens", "16", "--no-chat"]
    instruct_dir = tmp_path / "Tiny-Instruct"  # chat mode by default, from the folder name
    instruct_dir.symlink_to(cycle_dir)
    runs = {  # all at once: each run is mostly Python and torch starting up
        "greedy": start_script(*plain),
        "greedy --show-top": start_script(*plain, "--show-top", "3"),
        "sample": start_script(*plain, "--decoding", "sample", "--temperature", "1.0", "--top-k", "0",
                               "--top-p", "0.5", "--seed", "7"),
        "beam": start_script(*plain, "--decoding", "beam", "--beam-width", "3"),
        "beam --show-top": start_script(*plain, "--decoding", "beam", "--beam-width", "2", "--show-top", "2"),
        "chat": start_script("--model-dir", str(instruct_dir), "--prompt", "hi", "--system", "be brief",
                             "--max-new-tokens", "4"),
    }
    results = {name: finish(process) for name, process in runs.items()}
    for name, (code, stdout, stderr) in results.items():
        assert code == 0 and "Traceback" not in stderr, (name, stderr)
        for stat in ("load:", "prompt:", "prefill:", "decode:", "peak memory:", "parameters", "KV cache"):
            assert stat in stderr, (name, stat, stderr)
    expected = "🦙" + cycle_continuation(CYCLE_TEXT.encode()[3], 16).decode(errors="replace")
    assert results["greedy"][1] == expected + "\n"
    assert results["greedy --show-top"][1].endswith(expected + "\n")
    assert results["greedy --show-top"][1].count("-> ") == 16
    # top-p 0.5 keeps only the successor byte, whose probability is near 1: sampling is greedy here.
    assert results["sample"][1] == expected + "\n"
    # The best hypothesis follows the cycle, and its score is its average log-probability, near 0.
    best = results["beam"][1].split("\n")
    assert best[0].startswith("#1  score ") and -1e-3 < float(best[0].split()[2]) <= 0
    assert best[1] == expected.removeprefix("🦙")
    assert "step 16: 2/2 finished" in results["beam --show-top"][1]
    assert "\r" not in results["beam"][2]  # the redrawn progress line is for terminals, not logs
    assert "chat, greedy decoding" in results["chat"][2]


@pytest.mark.parametrize("model_args", [["--decoding", "greedy"], ["--decoding", "beam", "--beam-width", "2"]])
def test_ctrl_c_prints_what_was_generated_and_exits_cleanly(cycle_dir, model_args):
    process = start_script("--model-dir", str(cycle_dir), "--prompt", "🦙", "--max-new-tokens", "100000",
                           "--max-seq-len", "100010", "--no-chat", "--show-top", "1", *model_args)
    # Wait for a few steps' lines, then interrupt mid-generation.
    first_lines = [process.stdout.readline() for _ in range(5)]
    process.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(process)
    assert code == 130 and "Traceback" not in stderr, stderr
    assert "[interrupted]" in stderr and "decode:" in stderr
    assert first_lines[0].startswith(("->", "step 1"))
    if "beam" in model_args:
        assert "best running beam so far" in stdout


BAD_INPUT = {
    "--beam-width must be at least 1, got 0": ["--decoding", "beam", "--beam-width", "0"],
    "--top-p must be in (0, 1], got 1.5": ["--top-p", "1.5"],
    "--top-p must be in (0, 1], got 0.0": ["--top-p", "0"],
    "--temperature must be 0 or more, got -1.0": ["--temperature", "-1"],
    "--top-k must be 0 (off) or more, got -2": ["--top-k", "-2"],
    "--max-new-tokens must be at least 1, got 0": ["--max-new-tokens", "0"],
    "--show-top must be 0 (off) or more, got -1": ["--show-top", "-1"],
    "--threads must be at least 1, got 0": ["--threads", "0"],
    "the prompt is empty": ["--prompt", " "],
    "the prompt is 21 tokens, which leaves no room for new ones in --max-seq-len 16":
        ["--prompt", "x" * 20, "--no-chat", "--max-seq-len", "16"],
    "device 'cuda:3' is not available on this machine": ["--device", "cuda:3"],
}


@pytest.mark.parametrize("message", BAD_INPUT)
def test_bad_input_names_the_problem(cycle_dir, message):
    with pytest.raises(SystemExit) as exit_info:  # sys.exit(text): Python prints text, exits with 1
        run_inference.main(["--model-dir", str(cycle_dir), *BAD_INPUT[message]])
    assert exit_info.value.code == f"error: {message}"


def test_bad_input_is_one_line_on_stderr(cycle_dir, tmp_path):
    runs = [start_script("--model-dir", str(cycle_dir), *BAD_INPUT[message])
            for message in ("--beam-width must be at least 1, got 0", "the prompt is empty",
                            "device 'cuda:3' is not available on this machine")]
    missing = start_script("--model-dir", str(tmp_path / "nowhere"))
    for process in runs:
        code, stdout, stderr = finish(process)
        assert code == 1 and stderr.startswith("error: ") and stderr.count("\n") == 1 and stdout == ""
    code, _, stderr = finish(missing)
    assert code == 1 and "Traceback" not in stderr
    assert str(tmp_path / "nowhere") in stderr and "llama model download" in stderr and "make demo" in stderr


def nan_checkpoint(tmp_path):
    model_dir = checkpoint(tmp_path / "nan")
    path = model_dir / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    state_dict["layers.1.ffn_norm.weight"][3] = float("nan")
    torch.save(state_dict, path)
    return model_dir


@pytest.mark.parametrize("script, extra", [("run_inference.py", []), ("run_inference.py", ["--decoding", "beam"]),
                                           ("minimal_run_inference.py", [])])
def test_non_finite_logits_stop_with_one_line(tmp_path, script, extra):
    result = run_script(script, "--model-dir", nan_checkpoint(tmp_path), "--prompt", "Once upon a time", *extra)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"error: the model's logits at position {len('Once upon a time') + 1} "
                                              f"are not finite (NaN or inf); the checkpoint's weights may hold "
                                              f"NaN or infinity")


@pytest.mark.parametrize("script", ["run_inference.py", "minimal_run_inference.py", "chat.py"])
def test_ctrl_c_while_loading_is_one_line_and_exit_130(tmp_path, script):
    model_dir = memory_test_checkpoint(tmp_path)  # 120 MB, quantized at load: long enough to interrupt
    extra = ["--max-memory", "64GB"] if script == "minimal_run_inference.py" else ["--quantize", "int8"]
    result = interrupt_while_loading([sys.executable, script, "--model-dir", str(model_dir), *extra],
                                     model_dir / "consolidated.00.pth", cwd=REPO)
    assert result.returncode == 130 and result.stdout == "", result.stderr
    assert result.stderr.strip() == "[interrupted]"


@pytest.mark.parametrize("script", ["run_inference.py", "minimal_run_inference.py"])
def test_prompt_from_a_file_or_standard_input(cycle_dir, tmp_path, script):
    common = [script, "--model-dir", cycle_dir, "--max-new-tokens", "5", "--threads", "1"]
    if script == "run_inference.py":
        common.append("--no-chat")
    expected = "🦙" + cycle_continuation(CYCLE_TEXT.encode()[3], 5).decode(errors="replace") + "\n"
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("🦙\n")  # the newline that ends a file is not part of the prompt
    from_file = run_script(*common, "--prompt-file", prompt_file)
    from_stdin = run_script(*common, "--prompt-file", "-", input="🦙\n")
    ignored = run_script(*common, "--prompt", "🦙", input="something else")
    for result in (from_file, from_stdin, ignored):
        assert result.returncode == 0 and result.stdout == expected, result.stderr
    assert "note: standard input is not read; pass --prompt-file - to use it as the prompt" in ignored.stderr
    empty = run_script(*common, "--prompt-file", "-", input="\n")
    missing = run_script(*common, "--prompt-file", tmp_path / "nope.txt")
    assert empty.returncode == 1 and empty.stderr == "error: the prompt in - is empty\n"
    assert missing.returncode == 1 and missing.stderr.startswith(f"error: cannot read the prompt from {tmp_path}")
    if script == "run_inference.py":
        assert "threads: 1" in from_file.stderr


@pytest.mark.parametrize("script, max_new_tokens", [("run_inference.py", 32), ("minimal_run_inference.py", 32),
                                                    ("chat.py", 512)])
def test_help_shows_every_default(script, max_new_tokens):
    result = run_script(script, "--help")
    assert result.returncode == 0 and "(default: None)" not in result.stdout  # None: said in words
    assert f"(default: {max_new_tokens})" in result.stdout and "(default: 2048)" in result.stdout
    # threads: one per core but one, so that a busy machine does not stall every matrix product
    assert f"(default: {max(1, torch.get_num_threads() - 1)})" in result.stdout


# --- a real model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_pair(smollm2_dir):
    return ours_and_hf(smollm2_dir, max_batch_size=4, max_seq_len=128)


@pytest.mark.parametrize("beam_width, length_penalty, early_stopping", [(4, 1.0, False), (2, 2.0, "never"),
                                                                         (3, 0.5, True)])
def test_beam_search_on_smollm2_equals_transformers(smollm2_pair, beam_width, length_penalty, early_stopping):
    model, tokenizer, hf = smollm2_pair
    prompt = llama_models.ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": "Name a colour."}])
    kwargs = dict(beam_width=beam_width, max_new_tokens=6, stop_tokens=tokenizer.stop_tokens,
                  length_penalty=length_penalty, early_stopping=early_stopping)
    theirs = hf_beam_search(hf, prompt, **kwargs)
    assert_same_hypotheses(run_inference.beam_search(model, prompt, **kwargs), theirs)


@pytest.mark.parametrize("script, extra", [
    ("run_inference.py", ["--no-chat"]), ("run_inference.py", ["--no-chat", "--decoding", "beam", "--beam-width", "2"]),
    ("minimal_run_inference.py", []), ("chat.py", [])])
def test_a_reader_that_leaves_early_ends_the_script_quietly(cycle_dir, script, extra):
    """`... | head -c 10`: the script's next write finds the pipe closed. Exit 141, as a shell
    reports a program that a closed pipe ended (128 + SIGPIPE), and no traceback."""
    args = ["--model-dir", cycle_dir, "--max-new-tokens", "50", "--threads", "1", *extra]
    if script == "chat.py":
        process = helpers.start_script(script, *args, stdin=subprocess.PIPE)
        process.stdin.write("Hi!\n")
        process.stdin.close()
    else:
        process = helpers.start_script(script, *args, "--prompt", "🦙")
    process.stdout.close()  # the reader has left before the first word
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 141, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_scripts_start_with_ctrl_c_on_even_when_the_tests_run_without_it():
    """A suite started as `cmd &` in a non-interactive shell runs with SIGINT ignored; the scripts
    the tests start must get Ctrl-C back, or every Ctrl-C test fails."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = run_script("-c", "import signal; print(signal.getsignal(signal.SIGINT))")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.stdout.strip() == "<built-in function default_int_handler>", result.stdout


def test_a_vocabulary_padded_beyond_the_tokenizer_never_yields_its_padding(tmp_path):
    """Real checkpoints pad their vocabulary; ids the tokenizer lacks are masked, never chosen."""
    model_dir = checkpoint(tmp_path, vocab_size=4096)  # the tokenizer has 512 ids: 3584 padded ones
    result = run_script("run_inference.py", "--model-dir", model_dir, "--no-chat", "--max-new-tokens", "30",
                        "--decoding", "sample", "--temperature", "5", "--top-p", "1.0")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "vocab 4096 (3584 ids beyond the tokenizer's 512: never chosen)" in result.stderr
    model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=256)
    prompt = tokenizer.encode("hello", bos=True, eos=False)
    # A temperature this high makes the distribution nearly flat: 7/8 of it would be padding.
    tokens = list(generation.sample(model, prompt, max_new_tokens=200, stop_tokens=[], temperature=50.0, top_k=0,
                                    top_p=1.0, seed=0))
    assert len(tokens) == 200 and max(tokens) < 512
    beams = run_inference.beam_search(model, prompt, beam_width=1, max_new_tokens=5, stop_tokens=[])
    assert max(beams[0][0]) < 512


def test_a_kv_cache_bigger_than_memory_is_refused_before_it_is_allocated(cycle_dir):
    result = run_script("run_inference.py", "--model-dir", cycle_dir, "--max-seq-len", "100000000000")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert re.fullmatch(r"error: a KV cache of 100000000000 positions \(max_seq_len\) would take [\d.]+ GiB, more "
                        r"than the [\d.]+ GiB of memory free on cpu; at most \d+ positions fit there, fewer beside "
                        r"the weights: lower --max-seq-len\n", result.stderr), result.stderr


def test_the_model_you_have_is_the_default(tmp_path):
    """After `make demo` ~/.llama/checkpoints holds one model: the scripts run with no flags."""
    home = tmp_path / "home"
    checkpoint(home / ".llama" / "checkpoints" / "Tiny-Instruct", seed=21)
    env = dict(os.environ, HOME=str(home))
    note = (f"note: no Llama3.2-1B-Instruct in {home}/.llama/checkpoints; using Tiny-Instruct, the one "
            f"checkpoint there (--model-dir chooses)\n")
    runs = {script: run_script(script, "--max-new-tokens", "4", env=env)
            for script in ("run_inference.py", "minimal_run_inference.py")}
    runs["chat.py"] = run_script("chat.py", "--max-new-tokens", "4", env=env, input="Hi!\n")
    runs["explore.py"] = run_script("explore.py", env=env)
    for script, result in runs.items():
        assert result.returncode == 0 and result.stderr.startswith(note), (script, result.stderr)
    assert "chat, greedy decoding" in runs["run_inference.py"].stderr  # an Instruct model: chat mode
    # Two checkpoints: no guessing, the names to choose from.
    checkpoint(home / ".llama" / "checkpoints" / "Other", seed=22)
    two = run_script("run_inference.py", env=env)
    assert two.returncode == 1 and two.stderr == (
        f"error: checkpoint directory {home}/.llama/checkpoints/Llama3.2-1B-Instruct not found; "
        f"checkpoints in {home}/.llama/checkpoints: Other, Tiny-Instruct\n")
