"""Text to vectors for memory search.

The default embedder needs no model and no download: feature hashing of words and word
pairs into 384 dimensions, L2-normalised, so cosine similarity measures shared wording.
It finds near-duplicate facts (the store skips those) and memories that share words with
the conversation; it does not understand synonyms. For production, all-MiniLM-L6-v2
(384 dimensions too, cosine) is the documented choice (docs/app.md#state-and-storage): it slots in
behind the same interface, and its vectors live in a collection of the same shape.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from typing import Protocol

DIMENSIONS = 384
WORD = re.compile(r"[a-z0-9']+")


class Embedder(Protocol):
    dimensions: int

    def embed(self, text: str) -> list[float]: ...


class HashingEmbedder:
    dimensions = DIMENSIONS

    def embed(self, text: str) -> list[float]:
        words = WORD.findall(text.lower())
        features = words + [f"{first} {second}" for first, second in itertools.pairwise(words)]
        vector = [0.0] * self.dimensions
        for feature in features:
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            index = int.from_bytes(digest[:4], "little") % self.dimensions
            vector[index] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(value * value for value in vector))
        return [value / norm for value in vector] if norm else vector
