"""Integers read from bytes that may be cut short or hostile, and the exception that says
the bytes end early or contradict their format. Every format reader in `common.audio`
reads through these, so a read past the end is always `Malformed`, never an IndexError."""

from __future__ import annotations

from typing import Literal


class Malformed(Exception):
    """The bytes end early or contradict their format."""


def uint(data: bytes, offset: int, size: int, order: Literal["big", "little"]) -> int:
    if offset < 0 or offset + size > len(data):
        raise Malformed
    return int.from_bytes(data[offset : offset + size], order)


def be(data: bytes, offset: int, size: int) -> int:
    return uint(data, offset, size, "big")


def le(data: bytes, offset: int, size: int) -> int:
    return uint(data, offset, size, "little")


def u8(data: bytes, offset: int) -> int:
    return uint(data, offset, 1, "big")
