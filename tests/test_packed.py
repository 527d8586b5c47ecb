"""CPU weight packing (llama_models.packed): the same numbers as plain linear layers."""

import pytest
import torch
import torch.nn.functional as F

import llama_models
from helpers import checkpoint, greedy_logits
from llama_models.model import project
from llama_models.packed import PackedLinear, can_pack

CPU = torch.device("cpu")
# oneDNN packs float32 on every x86 CPU, bfloat16 only with AVX512 and newer: elsewhere those cases skip.
DTYPES = [pytest.param(dtype, marks=pytest.mark.skipif(not can_pack(CPU, dtype), reason=f"no oneDNN {dtype} here"))
          for dtype in (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 7, 96)])  # a decode step, a batch of prefills
def test_packed_linear_is_f_linear(dtype, shape):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(200, 96, generator=generator).to(dtype)
    x = torch.randn(*shape, generator=generator).to(dtype)
    layer, = PackedLinear.stack([w], dtype)
    assert torch.equal(layer.weight.to_dense(), w)  # a reordering, nothing rounded
    expected = F.linear(x, w)
    if dtype == torch.bfloat16:
        assert torch.equal(layer(x), expected)  # the same oneDNN kernel family: bit for bit
    else:
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_model_equals_unpacked(tmp_path, dtype):
    model_dir = checkpoint(tmp_path, seed=3)
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = {}
    for pack in (False, True):
        model, _ = llama_models.load(model_dir, device="cpu", dtype=dtype, max_seq_len=32, pack=pack)
        with torch.inference_mode():
            logits[pack] = torch.cat(greedy_logits(model, prompt, 2), dim=1)  # prefill + 2 steps
        if pack:
            assert isinstance(model.layers[1].feed_forward.w3, PackedLinear) and isinstance(model.output, PackedLinear)
            # state_dict() gives back the checkpoint's tensors under their names, unpacked.
            saved = torch.load(model_dir / "consolidated.00.pth", weights_only=True)
            state = model.state_dict()
            assert state.keys() == saved.keys()
            # wq, wk and wv share one packed matrix, as w1 and w3 do: rows of it each.
            attention, feed_forward = model.layers[0].attention, model.layers[0].feed_forward
            assert attention.wq.weight is attention.wk.weight is attention.wv.weight
            assert feed_forward.w1.weight is feed_forward.w3.weight
            for name in ("layers.0.attention.wq.weight", "layers.0.attention.wk.weight", "layers.0.attention.wv.weight",
                         "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w3.weight",
                         "layers.1.feed_forward.w2.weight", "output.weight"):
                assert torch.equal(state[name], saved[name].to(dtype)), name
    if dtype == torch.bfloat16:
        assert torch.equal(logits[True], logits[False])
    else:
        torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stacked_layers_give_each_its_own_product(dtype):
    """Layers stacked in one packed matrix: project() computes it once and splits it; each layer
    called alone gives its own rows. Both are F.linear with the layer's own weight."""
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(rows, 64, generator=generator).to(dtype) for rows in (96, 32, 32)]
    x = torch.randn(2, 5, 64, generator=generator).to(dtype)
    layers = PackedLinear.stack(weights, dtype)
    assert [layer.out_features for layer in layers] == [96, 32, 32]
    for w, alone, together in zip(weights, [layer(x) for layer in layers], project(x, *layers)):
        torch.testing.assert_close(alone, F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert torch.equal(together, alone)


def test_not_packed_where_it_does_not_apply(tmp_path):
    model_dir = checkpoint(tmp_path)
    unpacked, _ = llama_models.load(model_dir, device="cpu", pack=False)
    int8, _ = llama_models.load(model_dir, device="cpu", quantize="int8")
    for model in (unpacked, int8):
        assert not any(isinstance(m, PackedLinear) for m in model.modules())
    default, _ = llama_models.load(model_dir, device="cpu")  # bf16: packed where oneDNN can
    assert isinstance(default.output, PackedLinear) == can_pack(CPU, torch.bfloat16)
    assert not can_pack(torch.device("meta"), torch.bfloat16)
    assert not can_pack(CPU, torch.float16)  # oneDNN packs bf16 and float32 only
