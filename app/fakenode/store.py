"""What a node has on disk: model manifests, their layers, blobs, and the registry it pulls from.

A model is a manifest: a config blob plus layers (the weights, a template, a license, the
parameters, a system prompt), each named by its sha256 digest, as Ollama stores them. A
library model's manifest is a pure function of its name, so every node that pulls
``llama3.2`` holds the same layers and lists the same digest in /api/tags, and a node that
already has a layer (another model built on it) skips downloading it. Layer sizes are
llama3.2's; only the weights are not real bytes (their digest is derived from the name).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from app.fakenode import names

MODEL = "application/vnd.ollama.image.model"
TEMPLATE = "application/vnd.ollama.image.template"
LICENSE = "application/vnd.ollama.image.license"
PARAMS = "application/vnd.ollama.image.params"
SYSTEM = "application/vnd.ollama.image.system"
CONFIG = "application/vnd.docker.container.image.v1+json"
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# llama3.2:latest as the registry serves it: weights, template, two licenses, params, config
_LIBRARY_LAYERS = ((MODEL, 2019377376), (TEMPLATE, 1429), (LICENSE, 7711), (LICENSE, 6016),
                   (PARAMS, 96))
_LIBRARY_CONFIG = 561


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str  # "sha256:<64 hex>"
    size: int

    @property
    def short(self) -> str:
        """The 12 hex digits progress lines name a layer by ("pulling 74701a8c35f6")."""
        return self.digest[7:19]

    def as_json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def text_layer(media_type: str, text: str) -> Layer:
    """A layer whose content is known (a system prompt, a template): its real digest."""
    data = text.encode()
    return Layer(media_type, sha256(data), len(data))


@dataclass(frozen=True)
class Manifest:
    config: Layer
    layers: tuple[Layer, ...]

    @property
    def blobs(self) -> tuple[Layer, ...]:
        """Every blob, in the order a pull fetches them: the layers, then the config."""
        return (*self.layers, self.config)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.blobs)

    @property
    def digest(self) -> str:
        """What /api/tags lists: the sha256 of the manifest document, bare hex."""
        doc = {"schemaVersion": 2, "mediaType": MANIFEST, "config": self.config.as_json(),
               "layers": [layer.as_json() for layer in self.layers]}
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()

    def with_layer(self, layer: Layer) -> Manifest:
        """A derived model: ``layer`` replaces the layer of its kind, and a new config is
        written over the new layer list (what ``ollama create`` does for SYSTEM etc.)."""
        layers = (*(x for x in self.layers if x.media_type != layer.media_type), layer)
        return Manifest(config_for(layers), layers)


def config_for(layers: Iterable[Layer]) -> Layer:
    doc = {"model_format": "gguf", "rootfs": {"type": "layers", "diff_ids": [
        layer.digest for layer in layers]}}
    return text_layer(CONFIG, json.dumps(doc, separators=(",", ":")))


def library_manifest(name: str) -> Manifest:
    """The manifest the registry serves for a model: the same for every node."""
    key = names.key(name)
    layers = tuple(Layer(media, sha256(f"{key}|{i}|{media}".encode()), size)
                   for i, (media, size) in enumerate(_LIBRARY_LAYERS))
    return Manifest(Layer(CONFIG, sha256(f"{key}|config".encode()), _LIBRARY_CONFIG), layers)


def gguf_manifest(weights: Layer) -> Manifest:
    """A model created from an uploaded GGUF file: the weights as given, a fresh config."""
    layers = (Layer(MODEL, weights.digest, weights.size),)
    return Manifest(config_for(layers), layers)


def is_embedding_name(name: str) -> bool:
    key = names.key(name)
    return "embed" in key or "minilm" in key


@dataclass
class Model:
    """An installed model: its listed name, manifest, and what create gave it."""

    name: str  # the short name /api/tags lists, e.g. llama3.2:latest
    manifest: Manifest
    modified: float  # wall clock
    embedding: bool = False
    system: str = ""
    parent: str = ""  # the model it was created from, if any


@dataclass
class Blob:
    size: int
    magic: bytes = b""  # the first bytes: create from files checks for "GGUF"


@dataclass
class Library:
    """The registry a node pulls from. ``None`` holds every validly named model; a list
    holds only those (a pull of anything else fails as a pull of an unknown model does)."""

    models: Iterable[str] | None = None
    _keys: frozenset[str] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.models is not None:
            self._keys = frozenset(names.key(m) for m in self.models)

    def manifest(self, name: str) -> Manifest | None:
        if self._keys is not None and names.key(name) not in self._keys:
            return None
        return library_manifest(name)
