"""The torch.compile'd decode step (Transformer.compile_decode_step) against the eager one."""

import pytest
import torch

import llama_models
import run_inference
from helpers import checkpoint, greedy_logits

PROMPT = [1, 50, 300, 7, 99, 12, 400, 3]


@pytest.fixture(autouse=True)
def no_recompiles():
    """Each test compiles its own model from a clean slate; compiling again for a later position
    (the static shapes failing) raises. Also proves that compiling happened: a graph was made."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


@pytest.mark.parametrize("dtype, quantize, pack, tolerance", [
    (torch.float32, None, True, 1e-5),  # fused kernels reorder float sums: float32 rounding only
    (torch.bfloat16, None, True, 0.01),  # a fused RMSNorm skips bf16 roundings eager makes: ~1 bf16 ulp
    (torch.bfloat16, "int8", True, 0.01),
    # fairscale's own linear layers, as on CPUs without oneDNN packing (Apple, ARM, bf16 without AVX512)
    (torch.float32, None, False, 1e-5),
    (torch.bfloat16, None, False, 0.01),
])
def test_compiled_steps_match_eager(tmp_path, dtype, quantize, pack, tolerance):
    model_dir = checkpoint(tmp_path, seed=4)
    runs = {}
    for compiled in (False, True):
        model, _ = llama_models.load(model_dir, device="cpu", dtype=dtype, quantize=quantize, pack=pack,
                                     max_seq_len=64)
        if compiled:
            model.compile_decode_step()
        with torch.inference_mode():
            runs[compiled] = torch.cat([logits[:, -1] for logits in greedy_logits(model, PROMPT, 12)])  # (13, V)
    eager, compiled = runs[False], runs[True]
    diff = (eager - compiled).abs().max().item()
    span = (eager.max() - eager.min()).item()
    print(f"compiled vs eager, {dtype} {quantize or ''}: max logit diff {diff:.2e} (logits span {span:.2f})")
    assert diff <= tolerance * span
    assert torch.equal(eager.argmax(-1), compiled.argmax(-1))  # the same greedy tokens


def test_compiled_beam_search_matches_eager(tmp_path):
    model_dir = checkpoint(tmp_path, seed=5)
    results = []
    for compiled in (False, True):
        model, _ = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=64, max_batch_size=3)
        if compiled:
            model.compile_decode_step()
        hypotheses = run_inference.beam_search(model, PROMPT, beam_width=3, max_new_tokens=10, stop_tokens={7})
        results.append([(tokens, round(score, 4)) for tokens, score in hypotheses])
    assert results[0] == results[1]


def test_script_reports_compile_time_apart(tmp_path, capsys):
    model_dir = checkpoint(tmp_path, seed=6)
    run_inference.main(["--model-dir", str(model_dir), "--prompt", "hello", "--compile", "--max-new-tokens", "6",
                        "--max-seq-len", "64", "--no-chat"])
    report = capsys.readouterr().err
    assert "compile: " in report and "(the first decode step)" in report
    assert "decode: " in report and "after the first two" in report
