"""The capability-id redaction rule every process shares.

Session ids (32 URL-safe characters) and audio ids (32 hex digits) are capabilities:
whoever holds one owns the conversation or the reply. Any run of 32 or more URL-safe
characters is taken for one and replaced; shorter runs are never ids, and the odd long
identifier that is not one is redacted along with them. The app's log lines and spans
(`app.observability`) and error reports (`common.error_tracking`) apply it.
"""

from __future__ import annotations

import re

# What a capability id can hide in: any long run of the URL-safe alphabet.
CAPABILITY_LIKE = re.compile(r"[A-Za-z0-9_-]{32,}")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    return CAPABILITY_LIKE.sub(REDACTED, text)
