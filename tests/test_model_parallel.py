"""Sharded checkpoints and model parallelism over gloo (CPU, loopback), through torchrun: the same
logits, greedy, sampled and beam-search tokens whatever the layout."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, checkpoint
from tools.reshard_checkpoint import reshard_checkpoint

WORKER = REPO / "tests" / "dist_worker.py"


def run_worker(model_dir, out, nproc):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run((launcher if nproc > 1 else [sys.executable]) + [str(WORKER), str(model_dir), str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))  # the worker imports llama_models
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    assert saved["world_size"] == nproc
    return saved


def assert_same(a, b):
    assert (a["logits"] - b["logits"]).abs().max().item() <= 1e-4
    assert a["greedy"] == b["greedy"] and a["sample"] == b["sample"]
    assert [tokens for tokens, _ in a["beam"]] == [tokens for tokens, _ in b["beam"]]
    assert all(abs(x - y) <= 1e-4 for (_, x), (_, y) in zip(a["beam"], b["beam"]))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One random checkpoint (4 heads, 2 kv heads) as 1 shard, and split into 2."""
    root = tmp_path_factory.mktemp("layouts")
    one = checkpoint(root / "one", seed=7)
    reshard_checkpoint(one, root / "two", 2)
    return one, root / "two"


def test_split_and_merge_round_trip_bit_for_bit(tmp_path):
    original = checkpoint(tmp_path / "orig", seed=3, n_kv_heads=4)
    reshard_checkpoint(original, tmp_path / "four", 4)
    reshard_checkpoint(tmp_path / "four", tmp_path / "merged", 1)
    a = torch.load(original / "consolidated.00.pth", weights_only=True)
    four = [torch.load(tmp_path / "four" / f"consolidated.0{i}.pth", weights_only=True) for i in range(4)]
    b = torch.load(tmp_path / "merged" / "consolidated.00.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # Meta's layout: column-parallel weights cut along dim 0, row-parallel along dim 1, norms whole.
    assert four[1]["layers.0.attention.wq.weight"].shape == (16, 64)
    assert four[1]["layers.0.attention.wo.weight"].shape == (64, 16)
    assert four[1]["tok_embeddings.weight"].shape == (128, 64)
    assert torch.equal(four[3]["layers.1.feed_forward.w2.weight"], a["layers.1.feed_forward.w2.weight"][:, -48:])
    assert torch.equal(four[2]["norm.weight"], a["norm.weight"])
    assert (tmp_path / "merged" / "params.json").read_text() == (original / "params.json").read_text()


def test_two_shards_load_on_one_process(layouts, tmp_path):
    one, two = layouts
    assert_same(run_worker(one, tmp_path / "a.pt", 1), run_worker(two, tmp_path / "b.pt", 1))


def test_two_processes_on_two_shards_equal_one_process(layouts, tmp_path):
    one, two = layouts
    assert_same(run_worker(one, tmp_path / "a.pt", 1), run_worker(two, tmp_path / "b.pt", 2))


def test_two_processes_on_one_shard_equal_one_process(layouts, tmp_path):
    one, _ = layouts
    assert_same(run_worker(one, tmp_path / "a.pt", 1), run_worker(one, tmp_path / "b.pt", 2))


def test_more_processes_than_kv_heads_replicate_them(tmp_path):
    mqa = checkpoint(tmp_path / "mqa", seed=9, n_kv_heads=1)  # one kv head, two processes
    assert_same(run_worker(mqa, tmp_path / "a.pt", 1), run_worker(mqa, tmp_path / "b.pt", 2))


def test_heads_not_divisible_is_a_clear_error(tmp_path):
    model_dir = checkpoint(tmp_path / "odd", dim=48, n_heads=3, n_kv_heads=3)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "minimal_run_inference.py", "--model-dir", str(model_dir), "--device", "cpu"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0
    assert "error: cannot split 3 heads and 3 kv heads over 2 processes" in result.stderr
    assert "this model runs on 1, 3 processes" in result.stderr
    assert "llama_models/" not in result.stderr  # no traceback through our code (torchrun adds its own)


def test_reshard_tool_refuses_to_split_kv_heads(tmp_path):
    with pytest.raises(ValueError, match="split 2 kv heads unevenly"):
        reshard_checkpoint(checkpoint(tmp_path / "a"), tmp_path / "b", 4)


def test_readme_torchrun_example_on_the_embedded_model(smollm2_dir):
    # SmolLM2-135M has 9 heads and 3 kv heads: it splits over 3 processes, not 2.
    args = ["minimal_run_inference.py", "--model-dir", str(smollm2_dir), "--max-new-tokens", "12"]
    three = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                            *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert three.returncode == 0, three.stderr[-3000:]
    assert three.stdout == one.stdout and len(one.stdout) > len("The capital of France is ")


def test_reshard_tool_says_what_it_wrote(tmp_path):
    original = checkpoint(tmp_path / "orig")
    result = subprocess.run([sys.executable, "tools/reshard_checkpoint.py", str(original), str(tmp_path / "two"),
                             "--shards", "2"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"wrote 2 shard(s) to {tmp_path / 'two'}:"
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert [line.split()[0] for line in lines[1:]] == names == ["consolidated.00.pth", "consolidated.01.pth",
                                                                "params.json", "tokenizer.model"]
    size = (tmp_path / "two" / "consolidated.00.pth").stat().st_size
    assert lines[1] == f"  consolidated.00.pth  {size / 1e6:.1f} MB"
