"""The page's files under content-hashed names, built once at start-up from `static/`.

- Every file but `index.html` is an asset, served at `/assets/<stem>.<hash><suffix>`; the
  hash is of the served bytes, so a changed file gets a new name and browsers (told by the
  edge that such names are immutable: edge/concerns/cache_policy.py) never keep a stale one.
- In JavaScript modules and in `index.html`, every reference `/assets/<name>` is rewritten
  to the hashed name. A module's hash covers the hashed names it imports, so a change deep
  in the import graph renames every module above it.
- `index.html`'s `{{name}}` placeholders are filled with the app's settings the page needs
  (maximum recording length, turn timeout, text length): no extra request before the page
  can work.
- Each file is kept gzip-compressed too: assets that never change are compressed once, not
  on every request.
"""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

STATIC = Path(__file__).parent / "static"
INDEX = "index.html"

# `/assets/<name>` in HTML attributes and JavaScript import specifiers.
_REFERENCE = re.compile(r"/assets/([A-Za-z0-9_-]+\.[a-z0-9]+)")
_HASHED_REFERENCE = re.compile(r"/assets/([A-Za-z0-9_.-]+)")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_HASH_LENGTH = 12
_CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_TEXT_SUFFIXES = frozenset({".js", ".css", ".svg", ".html"})


@dataclass(frozen=True)
class File:
    content: bytes
    gzipped: bytes | None  # None when compression would not pay
    content_type: str
    etag: str


@dataclass(frozen=True)
class Page:
    index: File
    assets: Mapping[str, File]  # by hashed name

    @property
    def first_load(self) -> list[File]:
        """The HTML and every asset it names, and those name, and so on: what a first
        visit downloads."""
        found: list[File] = [self.index]
        seen: set[str] = set()
        for file in found:
            for name in _HASHED_REFERENCE.findall(file.content.decode("utf-8", "replace")):
                if name not in seen and name in self.assets:
                    seen.add(name)
                    found.append(self.assets[name])
        return found


def fingerprint(content: bytes) -> str:
    """The first run of hex digits of the content's SHA-256 that holds a letter and a
    digit: the edge recognises hashed names by that (a name like `app-20241231.js` must
    not be taken for one), and a run of digits alone would not be."""
    digest = hashlib.sha256(content).hexdigest()
    for start in range(len(digest) - _HASH_LENGTH + 1):
        window = digest[start : start + _HASH_LENGTH]
        if not window.isdigit() and not window.isalpha():
            return window
    raise AssertionError("a SHA-256 in hex always has such a run")  # pragma: no cover


def files_in(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def build_page(values: Mapping[str, str], sources: Mapping[str, bytes] | None = None) -> Page:
    """The page of `sources` (file name -> content, `index.html` among them; the voice page's
    `static/` by default), its `{{name}}` placeholders filled from `values`."""
    if sources is None:
        sources = files_in(STATIC)
    hashed: dict[str, str] = {}  # source name -> hashed name
    assets: dict[str, File] = {}

    def hashed_name(name: str, chain: tuple[str, ...] = ()) -> str:
        if name in hashed:
            return hashed[name]
        if name not in sources or name == INDEX:
            raise ValueError(f"{chain[-1] if chain else INDEX} refers to /assets/{name}, which is not among its files")
        if name in chain:
            raise ValueError(f"an import cycle: {' -> '.join((*chain, name))}")
        content = _rewrite(sources[name], lambda ref: hashed_name(ref, (*chain, name)), name)
        path = Path(name)
        hashed[name] = f"{path.stem}.{fingerprint(content)}{path.suffix}"
        assets[hashed[name]] = _file(content, path.suffix)
        return hashed[name]

    for name in sources:
        if name != INDEX:
            hashed_name(name)
    html = _rewrite(sources[INDEX], hashed_name, INDEX)
    return Page(index=_file(_fill(html, values), ".html"), assets=assets)


def _rewrite(content: bytes, rename: Callable[[str], str], name: str) -> bytes:
    if Path(name).suffix not in (".js", ".html", ".css"):
        return content
    text = content.decode("utf-8")
    return _REFERENCE.sub(lambda match: f"/assets/{rename(match.group(1))}", text).encode("utf-8")


def _fill(html: bytes, values: Mapping[str, str]) -> bytes:
    def value(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise ValueError(f"{INDEX} has a placeholder {{{{{match.group(1)}}}}} with no value")
        return values[match.group(1)]

    return _PLACEHOLDER.sub(value, html.decode("utf-8")).encode("utf-8")


def _file(content: bytes, suffix: str) -> File:
    content_type = _CONTENT_TYPES.get(suffix) or mimetypes.types_map.get(suffix, "application/octet-stream")
    if suffix == ".html":
        content_type = "text/html; charset=utf-8"
    gzipped = gzip.compress(content, compresslevel=9, mtime=0) if suffix in _TEXT_SUFFIXES else None
    if gzipped is not None and len(gzipped) >= len(content):
        gzipped = None
    return File(content, gzipped, content_type, f'"{fingerprint(content)}"')
