"""Find the GGUF file of a model in Ollama's local store, by the name `ollama run` takes.

    find_model("llama3.2:1b")  # -> ~/.ollama/models/blobs/sha256-74701a8c...

Ollama keeps what it pulls as in a container registry: a manifest per model and tag,
    $OLLAMA_MODELS/manifests/HOST/NAMESPACE/MODEL/TAG   (default ~/.ollama/models)
a JSON object whose "layers" list the model's parts by media type and digest, and each part in
    $OLLAMA_MODELS/blobs/sha256-<hex digest>
The weights are the layer of media type application/vnd.ollama.image.model: a plain GGUF file,
the one llama.cpp reads. "llama3.2:1b" is short for registry.ollama.ai/library/llama3.2:1b, and
a name without a tag means :latest.
"""

import hashlib
import json
import os
from pathlib import Path

PREFIX = "ollama:"  # how tools/convert_gguf.py tells a model name from a file name
DEFAULT_STORE = "~/.ollama/models"
DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
MODEL_LAYER = "application/vnd.ollama.image.model"


class OllamaError(Exception):
    """A model that is not in the store, or whose files are broken; the message says which."""


def store() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS", DEFAULT_STORE)).expanduser()


def manifest_path(name: str) -> Path:
    """The manifest of `name` ([HOST/][NAMESPACE/]MODEL[:TAG]), which may not exist."""
    path, _, tag = name.partition(":")
    parts, tag = path.split("/"), tag or DEFAULT_TAG
    if len(parts) > 3 or any(part in ("", ".", "..") for part in parts + [tag]):  # stay inside the store
        raise OllamaError(f"{name!r} is not an Ollama model name (like llama3.2:1b)")
    host, namespace, model = [DEFAULT_HOST, DEFAULT_NAMESPACE][:3 - len(parts)] + parts
    return store() / "manifests" / host / namespace / model / tag


def short_name(manifest: Path) -> str:
    """The name `ollama list` shows for a manifest: llama3.2:1b, or user/model:tag."""
    host, namespace, model, tag = manifest.relative_to(store() / "manifests").parts
    if host != DEFAULT_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    return f"{model}:{tag}" if namespace == DEFAULT_NAMESPACE else f"{namespace}/{model}:{tag}"


def list_models() -> list[str]:
    manifests = store() / "manifests"
    return sorted(short_name(p) for p in manifests.glob("*/*/*/*") if p.is_file())


def find_model(name: str) -> Path:
    """The GGUF blob of model `name`, checked against its manifest's size and sha256 digest.

    The digest is checked because a blob damaged on disk would otherwise convert silently into
    wrong weights; reading the file once more costs seconds next to minutes of conversion.
    """
    manifest = manifest_path(name)
    if not manifest.is_file():
        there = ", ".join(list_models()) or "none"
        raise OllamaError(f"no Ollama model {name!r} in {store()} (models there: {there})")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        layer = next(layer for layer in layers if layer["mediaType"] == MODEL_LAYER)
        algorithm, digest = layer["digest"].split(":")
        size = layer["size"]
    except (ValueError, KeyError, TypeError, StopIteration):
        raise OllamaError(f"{manifest} is not a manifest with a model layer ({MODEL_LAYER})") from None
    blob = store() / "blobs" / f"{algorithm}-{digest}"
    if not blob.is_file():
        raise OllamaError(f"{blob}, the weights of {name}, is missing (ollama pull {name} fetches it again)")
    if blob.stat().st_size != size or algorithm != "sha256" or _sha256(blob) != digest:
        raise OllamaError(f"{blob}, the weights of {name}, does not match its digest: corrupt or "
                          f"incomplete (ollama pull {name} fetches it again)")
    return blob


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
