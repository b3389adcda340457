"""ID3v2 tags, which MP3 files and some FLAC files carry before their audio: only skipped."""

from __future__ import annotations

from common.audio.binary import Malformed

_MAX_TAGS = 4  # some taggers prepend a second tag instead of rewriting the first


def skip_id3v2(data: bytes) -> int:
    """Where the data after the leading ID3v2 tags (if any) begins; may be past the end."""
    position = 0
    for _ in range(_MAX_TAGS):
        if data[position : position + 3] != b"ID3":
            break
        header = data[position : position + 10]
        if len(header) < 10:
            raise Malformed
        major, minor, flags, size = header[3], header[4], header[5], header[6:10]
        if major not in (2, 3, 4) or minor == 0xFF or any(byte & 0x80 for byte in size):
            raise Malformed
        # A synchsafe integer: 7 bits a byte, so that no 0xFF 0xEx can mimic a frame sync.
        length = (size[0] << 21) | (size[1] << 14) | (size[2] << 7) | size[3]
        footer = 10 if major == 4 and flags & 0x10 else 0
        position += 10 + length + footer
    return position
