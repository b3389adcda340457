"""Every file reference in the docs, and in the code's docstrings and comments, resolves.

- Markdown links in README.md and the Markdown files under docs/: a relative target must
  exist (relative to the document; a leading `/` is the repository root, as on GitHub), and
  an `#anchor` must be the GitHub slug of a heading of the target, or of the document itself
  when the link is only an anchor. Links with a scheme (`https:`, `mailto:`) are not fetched.
- Repository paths ending in a known extension, written anywhere in those Markdown files or
  in a docstring or comment of the Python packages (docs/proxy.md#slow-clients,
  config/edge-policy.toml): they are read from the repository root, and must exist, their
  anchors likewise.

Paths under the directories `.gitignore` lists (the benchmarks' results) are outputs, not
references, and are skipped. The repository stands alone: a relative path that leaves it
fails, and so does an absolute path to a Markdown file or into the directory the checkout
sits in. Other absolute paths are URL paths (`/api/v1/openapi.json`), and are skipped.
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
import unicodedata
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_PACKAGES = ("app", "edge", "sim", "common", "bench", "scripts", "tests")
EXTENSIONS = ("md", "py", "toml", "json", "yml", "yaml", "lock", "sh", "txt")

# Two or more path segments ending in a known extension, with an optional anchor; never a
# piece of a URL or of a longer name (`x.md.bak`).
PATH_REFERENCE = re.compile(
    rf"(?<![\w./:-])(/?(?:[\w.-]+/)+[\w.-]+\.(?:{'|'.join(EXTENSIONS)}))(?:#([\w-]+))?(?![\w/-]|\.\w)"
)
FENCED_CODE = re.compile(r"^ {0,3}(```|~~~).*?(?:^ {0,3}\1[^\n]*$|\Z)", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
LINK_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def blanked(text: str, pattern: re.Pattern[str]) -> str:
    """`text` with what `pattern` matches turned into spaces, so offsets and lines stay put."""
    return pattern.sub(lambda match: re.sub(r"[^\n]", " ", match.group()), text)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text in lower case, without punctuation other
    than `-` and `_`, each space a `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = (c for c in text if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc")
    return "".join(kept).replace(" ", "-")


@cache
def anchors(document: Path) -> frozenset[str]:
    """The anchors of a Markdown file's headings; a repeated slug gets `-1`, `-2`..."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for match in HEADING.finditer(blanked(document.read_text(), FENCED_CODE)):
        slug = github_slug(match.group(1))
        repeats = seen.get(slug, 0)
        seen[slug] = repeats + 1
        found.add(f"{slug}-{repeats}" if repeats else slug)
    return frozenset(found)


def ignored_directories(root: Path) -> list[str]:
    """`.gitignore`'s directory patterns: `/bench/results/` (anchored) or `.venv/` (anywhere)."""
    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    return [line.strip() for line in lines if line.strip().endswith("/") and not line.startswith("#")]


def is_ignored(root: Path, relative: str) -> bool:
    directories = relative.split("/")[:-1]
    for pattern in ignored_directories(root):
        name = pattern.strip("/")
        if relative.startswith(f"{name}/") if pattern.startswith("/") else name in directories:
            return True
    return False


def unresolved(root: Path, path: str, anchor: str | None) -> str | None:
    """Why `path` (normalised, absolute) with `anchor` is not a file of the repository, or None."""
    if path != str(root) and not path.startswith(f"{root}{os.sep}"):
        return "outside the repository (it must stand alone)"
    relative = Path(path).relative_to(root).as_posix()
    if is_ignored(root, relative):
        return None
    target = Path(path)
    if not target.exists():
        return "no such file"
    if anchor is None:
        return None
    if target.suffix != ".md":
        return "an anchor on a file without headings"
    if anchor not in anchors(target):
        return f"no heading with the anchor #{anchor} in {relative}"
    return None


def path_reference_problems(root: Path, origin: str, text: str, first_line: int = 1) -> Iterator[str]:
    """Problems with the repository paths written in `text`, read from the repository root."""
    for match in PATH_REFERENCE.finditer(text):
        path, anchor = match.group(1), match.group(2)
        if path.startswith("/"):
            # A URL path (`/api/v1/openapi.json`), unless it names a document or lies in the
            # directory around the checkout: then a file outside the repository.
            surroundings = root.parent
            nearby = surroundings != Path(root.anchor) and path.startswith(f"{surroundings}/")
            if not nearby and not path.endswith(".md"):
                continue
            reason: str | None = "outside the repository (it must stand alone)"
        else:
            reason = unresolved(root, os.path.normpath(root / path), anchor)
        if reason:
            yield f"{origin}:{first_line + line_of(text, match.start()) - 1}: {match.group()}: {reason}"


def markdown_problems(root: Path, document: Path) -> list[str]:
    origin = document.relative_to(root).as_posix()
    text = document.read_text()
    links: list[tuple[int, str]] = []

    prose = blanked(blanked(text, FENCED_CODE), CODE_SPAN)
    for pattern in (LINK, LINK_DEFINITION):
        for match in pattern.finditer(prose):
            links.append((match.start(1), match.group(1)))
    # The links' targets are checked as links, not again as paths from the root.
    without_link_targets = list(text)
    for offset, target in links:
        without_link_targets[offset : offset + len(target)] = " " * len(target)

    problems: list[str] = []
    for offset, target in sorted(links):
        if SCHEME.match(target):
            continue
        path, _, anchor = unquote(target).partition("#")
        if path.startswith("/"):
            resolved = os.path.normpath(root / path.lstrip("/"))
        else:
            resolved = os.path.normpath(document.parent / path) if path else str(document)
        reason = unresolved(root, resolved, anchor or None)
        if reason:
            problems.append(f"{origin}:{line_of(text, offset)}: ({target}): {reason}")
    problems.extend(path_reference_problems(root, origin, "".join(without_link_targets)))
    return problems


def docstrings_and_comments(source: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every docstring and comment of a Python module."""
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and ast.get_docstring(node, clean=False) is not None
        ):
            docstring = node.body[0]
            end = docstring.end_lineno or docstring.lineno
            yield docstring.lineno, "\n".join(lines[docstring.lineno - 1 : end])
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string


def python_problems(root: Path, module: Path) -> list[str]:
    origin = module.relative_to(root).as_posix()
    return [
        problem
        for line, text in docstrings_and_comments(module.read_text())
        for problem in path_reference_problems(root, origin, text, line)
    ]


def markdown_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def python_files(root: Path) -> list[Path]:
    return [
        module
        for package in PYTHON_PACKAGES
        for module in sorted((root / package).rglob("*.py"))
        if "__pycache__" not in module.parts
    ]


def test_every_reference_in_the_docs_resolves() -> None:
    problems = [problem for document in markdown_files(ROOT) for problem in markdown_problems(ROOT, document)]
    assert not problems, "broken references:\n" + "\n".join(problems)


def test_every_reference_in_docstrings_and_comments_resolves() -> None:
    problems = [problem for module in python_files(ROOT) for problem in python_problems(ROOT, module)]
    assert not problems, "broken references:\n" + "\n".join(problems)


# -- the checker itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Framing the edge can prove", "framing-the-edge-can-prove"),
        ("429 and Retry-After", "429-and-retry-after"),
        ("What is measured, and why this way", "what-is-measured-and-why-this-way"),
        ("Edge (`python -m edge`)", "edge-python--m-edge"),
        ("The `/_sim/` API", "the-_sim-api"),
        ("`POST /openai/v1/chat/completions`", "post-openaiv1chatcompletions"),
        ("See [the proxy](proxy.md) <em>now</em>", "see-the-proxy-now"),
        ("Ünïcode stays", "ünïcode-stays"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "pkg").mkdir()
    (root / ".gitignore").write_text("/out/\n.cache/\n*.pyc\n")
    (root / "pkg" / "real.py").write_text("")
    (root / "docs" / "guide.md").write_text(
        "# Guide\n\n## Set-up (`make run`)\n\n## Notes\n\n## Notes\n\n```sh\n# Not a heading\n```\n"
    )
    return root


def test_markdown_checker_reports_each_broken_reference_with_its_line(repository: Path) -> None:
    readme = repository / "README.md"
    readme.write_text(
        "# Read me\n"
        "[fine](docs/guide.md#set-up-make-run), [again](docs/guide.md#notes-1), [self](#read-me),\n"
        "[root](/pkg/real.py), [web](https://example.com/missing.md), [mail](mailto:x@example.com)\n"
        "[gone](docs/gone.md) and [bad anchor](docs/guide.md#notes-2)\n"
        "[wrapped\n"
        "link](#nowhere), [code anchor](pkg/real.py#top), [out](../elsewhere.md)\n"
        "`[not a link](docs/gone.md)` names pkg/real.py, pkg/missing.py and docs/guide.md#not-here;\n"
        "outputs: out/run.json, pkg/.cache/x.json; URL paths: /api/v1/openapi.json\n"
        "```\n[in code](docs/gone.md) docs/guide.md#not-a-heading\n```\n"
        "[definition]: docs/undefined.md\n"
        f"see {repository.parent}/shared/tool.py, /srv/reference/notes.md\n"
    )
    assert markdown_problems(repository, readme) == [
        "README.md:4: (docs/gone.md): no such file",
        "README.md:4: (docs/guide.md#notes-2): no heading with the anchor #notes-2 in docs/guide.md",
        "README.md:6: (#nowhere): no heading with the anchor #nowhere in README.md",
        "README.md:6: (pkg/real.py#top): an anchor on a file without headings",
        "README.md:6: (../elsewhere.md): outside the repository (it must stand alone)",
        "README.md:12: (docs/undefined.md): no such file",
        "README.md:7: docs/gone.md: no such file",
        "README.md:7: pkg/missing.py: no such file",
        "README.md:7: docs/guide.md#not-here: no heading with the anchor #not-here in docs/guide.md",
        "README.md:10: docs/gone.md: no such file",
        "README.md:10: docs/guide.md#not-a-heading: no heading with the anchor #not-a-heading in docs/guide.md",
        f"README.md:13: {repository.parent}/shared/tool.py: outside the repository (it must stand alone)",
        "README.md:13: /srv/reference/notes.md: outside the repository (it must stand alone)",
    ]


def test_python_checker_reads_docstrings_and_comments_only(repository: Path) -> None:
    module = repository / "pkg" / "module.py"
    module.write_text(
        '"""A module, documented in docs/guide.md#notes.\n'
        "\n"
        "Its design: docs/design.md.\n"
        '"""\n'
        "\n"
        'PATH = "docs/not-a-reference.md"\n'
        "\n"
        "\n"
        "def run() -> None:\n"
        '    """See pkg/real.py and pkg/gone.py."""\n'
        "    # why: docs/guide.md#why\n"
    )
    assert python_problems(repository, module) == [
        "pkg/module.py:3: docs/design.md: no such file",
        "pkg/module.py:10: pkg/gone.py: no such file",
        "pkg/module.py:11: docs/guide.md#why: no heading with the anchor #why in docs/guide.md",
    ]
