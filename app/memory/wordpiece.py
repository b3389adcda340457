"""BERT's uncased WordPiece tokenizer, as all-MiniLM-L6-v2 was trained with it: text to
token ids, `[CLS] ... [SEP]`, at most `max_length` ids.

The steps are BERT's own (Devlin et al., `tokenization.py`; Hugging Face's
`BertTokenizer` with `do_lower_case`): drop control characters, space out CJK
ideographs, split on whitespace, lower-case and strip accents, split off punctuation,
then greedy longest-match-first word pieces (`##` marks a continuation), `[UNK]` for a
word that cannot be spelled from the vocabulary. As in Hugging Face's, a special token
written in the text (`[SEP]`, exactly) is that token. It is ours rather than the `tokenizers`
package because that one now brings the Hugging Face Hub client (and its downloader) into
a process that must never download; tests/test_embedding.py holds it to `tokenizers` on
the evaluation set and on hostile text (docs/app.md#the-embedder).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

MAX_WORD_CHARACTERS = 100  # longer words are `[UNK]` (BERT's rule)
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_IN_TEXT = re.compile("(" + "|".join(re.escape(token) for token in SPECIAL) + ")")


class WordPiece:
    def __init__(self, vocabulary: Path, max_length: int) -> None:
        words = vocabulary.read_text(encoding="utf-8").splitlines()
        self.ids = {word: index for index, word in enumerate(words)}
        self.max_length = max_length
        self.cls = self.ids["[CLS]"]
        self.sep = self.ids["[SEP]"]
        self.unknown = self.ids["[UNK]"]
        self.padding = self.ids["[PAD]"]

    def encode(self, text: str) -> list[int]:
        pieces: list[int] = []
        for index, part in enumerate(SPECIAL_IN_TEXT.split(text)):
            if index % 2:  # a special token (the pattern's group)
                pieces.append(self.ids[part])
                continue
            for word in _basic_tokens(part):
                pieces.extend(self._word_pieces(word))
        return [self.cls, *pieces[: self.max_length - 2], self.sep]

    def batch(self, texts: Sequence[str]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """The texts' ids padded to the longest, and the mask of the real ones (1.0)."""
        ids = [self.encode(text) for text in texts]
        length = max(len(row) for row in ids)
        tokens = np.full((len(ids), length), self.padding, dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=np.float32)
        for row, row_ids in enumerate(ids):
            tokens[row, : len(row_ids)] = row_ids
            mask[row, : len(row_ids)] = 1.0
        return tokens, mask

    def _word_pieces(self, word: str) -> list[int]:
        if len(word) > MAX_WORD_CHARACTERS:
            return [self.unknown]
        found: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                index = self.ids.get(piece)
                if index is not None:
                    found.append(index)
                    break
                end -= 1
            else:
                return [self.unknown]
            start = end
        return found


def _basic_tokens(text: str) -> list[str]:
    cleaned: list[str] = []
    for character in text:
        code = ord(character)
        if code == 0 or code == 0xFFFD or _is_control(character):
            continue
        if _is_whitespace(character):
            cleaned.append(" ")
        elif _is_cjk(code):
            cleaned.append(f" {character} ")
        else:
            cleaned.append(character)
    tokens: list[str] = []
    for word in "".join(cleaned).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        tokens.extend(_split_punctuation(word))
    return tokens


def _split_punctuation(word: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    for character in word:
        if _is_punctuation(character):
            if current:
                parts.append("".join(current))
                current = []
            parts.append(character)
        else:
            current.append(character)
    if current:
        parts.append("".join(current))
    return parts


def _is_whitespace(character: str) -> bool:
    return character in " \t\n\r" or unicodedata.category(character) == "Zs"


def _is_control(character: str) -> bool:
    if character in "\t\n\r":
        return False
    # Hugging Face's rule: an unassigned code point (Cn) is kept, and its word is `[UNK]`.
    return unicodedata.category(character) in ("Cc", "Cf", "Co")


def _is_punctuation(character: str) -> bool:
    code = ord(character)
    # ASCII symbols such as `$` and `^` are not Unicode punctuation; BERT splits them too.
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(character).startswith("P")


def _is_cjk(code: int) -> bool:
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x2A6DF
        or 0x2A700 <= code <= 0x2B73F
        or 0x2B740 <= code <= 0x2B81F
        or 0x2B820 <= code <= 0x2CEAF
        or 0xF900 <= code <= 0xFAFF
        or 0x2F800 <= code <= 0x2FA1F
    )
