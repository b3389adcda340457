"""Ids the project makes."""

from __future__ import annotations

import random
import re
import time

# What an incoming request id may be: anything else could inject into log lines.
ACCEPTABLE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")


def uuid7() -> str:
    """RFC 9562 UUID version 7: 48 bits of Unix milliseconds, then 74 random bits."""
    # Ids need to be unique, not secret: the random module (reseeded after fork) spares
    # a getrandom() system call per request.
    value = (time.time_ns() // 1_000_000) << 80 | random.getrandbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
