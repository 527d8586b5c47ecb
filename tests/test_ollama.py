"""Converting a model from Ollama's store by name, in a fake store laid out as Ollama's
(manifests/registry.ollama.ai/library/NAME/TAG -> blobs/sha256-<hex>) in $OLLAMA_MODELS."""

import hashlib
import json
import subprocess
import sys

import pytest

import llama_models
from conftest import REPO
from test_convert_gguf import write_tiny_gguf
from tools.convert_gguf import ConversionError, convert


def add_model(store, name, tag, gguf_path, namespace="library"):
    """Put gguf_path into the store as Ollama's pull does: the blob under its digest, a manifest
    listing it as the model layer (with a template layer, as Ollama's have)."""
    data = gguf_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": "sha256:" + "0" * 64, "size": 485},
                "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                            "size": len(data)},
                           {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64,
                            "size": 1429}]}
    path = store / "manifests" / "registry.ollama.ai" / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return store / "blobs" / f"sha256-{digest}"


@pytest.fixture
def store(tmp_path, monkeypatch):
    store = tmp_path / "models"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    write_tiny_gguf(tmp_path / "tiny.gguf")
    add_model(store, "tiny", "latest", tmp_path / "tiny.gguf")
    add_model(store, "tiny", "1b", tmp_path / "tiny.gguf")
    add_model(store, "tiny", "q4", tmp_path / "tiny.gguf", namespace="someone")
    write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    add_model(store, "qwen2", "0.5b", tmp_path / "qwen.gguf")
    return store


@pytest.mark.parametrize("name", ["tiny", "tiny:latest", "tiny:1b", "someone/tiny:q4",
                                  "registry.ollama.ai/library/tiny:1b"])
def test_model_converts_by_name(store, tmp_path, name):
    out = convert(f"ollama:{name}", tmp_path / "out")
    model, tokenizer = llama_models.load(out, device="cpu")
    assert model.params.dim == 64 and tokenizer.n_words == 259


def test_missing_model_lists_those_there(store, tmp_path):
    result = subprocess.run([sys.executable, "tools/convert_gguf.py", "ollama:llama3.2:1b", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "no Ollama model 'llama3.2:1b'" in result.stderr
    assert "(models there: qwen2:0.5b, someone/tiny:q4, tiny:1b, tiny:latest)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_broken_blobs_and_other_architectures_are_refused(store, tmp_path):
    blob = next((store / "blobs").glob("sha256-*"))
    data = blob.read_bytes()
    cases = {"qwen2:0.5b": "architecture is 'qwen2'", "tiny": "does not match its digest"}
    for name, message in cases.items():
        if name == "tiny":
            blob.write_bytes(data[:-100] + bytes(100))  # same size, damaged weights
        with pytest.raises(ConversionError, match=message):
            convert(f"ollama:{name}", tmp_path / "out")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "qwen.gguf", "tiny.gguf"], name
    blob.write_bytes(data[:-100])  # cut short
    with pytest.raises(ConversionError, match="does not match its digest"):
        convert("ollama:tiny:1b", tmp_path / "out")
    blob.unlink()
    with pytest.raises(ConversionError, match="is missing"):
        convert("ollama:tiny:1b", tmp_path / "out")


def test_names_outside_the_store_are_refused(store, tmp_path):
    for name in ["../../x", "a/b/c/d", "tiny:..", ""]:
        with pytest.raises(ConversionError, match="is not an Ollama model name"):
            convert(f"ollama:{name}", tmp_path / "out")
