"""A voice turn's recording stays in memory while its form is parsed (docs/data.md#files).

Starlette's multipart parser keeps each file part in a `SpooledTemporaryFile` that moves to
a temporary file on disk past `MultiPartParser.spool_max_size` (1 MiB): most recordings
would reach the disk. `Request.form()` takes no spool size, so this raises the class
attribute - documented in Starlette 1.10.0's source ("The maximum size of the spooled
temporary file"), not in its guide - to the largest recording the app accepts.
tests/test_uploads.py fails if an upgrade stops honouring it. A part larger than that
(a chunked body without a length, refused once read) may still spool: to a file 0600,
unlinked from the start, closed with the request.
"""

from __future__ import annotations

from starlette.formparsers import MultiPartParser


def keep_uploads_in_memory(max_bytes: int) -> None:
    """Parts up to `max_bytes` stay in memory; never lowered (another app in the process
    may accept more)."""
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_bytes)
