"""app/page/assets.py: content-hashed names, rewritten references, refused mistakes."""

from __future__ import annotations

import gzip
import re

import pytest

from app.page.assets import build_page
from edge.concerns.cache_policy import FINGERPRINTED

INDEX = b'<link href="/assets/style.css"><script type="module" src="/assets/main.js"></script>{{limit}}'
SOURCES = {
    "index.html": INDEX,
    "main.js": b'import { say } from "/assets/say.js";\nsay();\n',
    "say.js": b"export function say() {\n" + b"  console.log('hello, world');\n" * 20 + b"}\n",
    "style.css": b"body { margin: 0 }\n",
}


def test_every_reference_is_to_a_hashed_name_the_edge_caches_as_immutable() -> None:
    page = build_page({"limit": "120"}, SOURCES)
    html = page.index.content.decode()
    assert html.endswith("</script>120")
    names = sorted(page.assets)
    assert [name.split(".")[0] for name in names] == ["main", "say", "style"]
    for name in names:
        assert f"/assets/{name}" in html or name.startswith("say.")
        assert FINGERPRINTED.search(f"/assets/{name}"), name
    main = next(file for name, file in page.assets.items() if name.startswith("main."))
    say = next(name for name in names if name.startswith("say."))
    assert f'from "/assets/{say}"' in main.content.decode()
    assert page.first_load[0].content_type == "text/html; charset=utf-8"
    assert len(page.first_load) == 4


def test_a_change_deep_in_the_imports_renames_every_module_above_it() -> None:
    before = build_page({"limit": "1"}, SOURCES)
    after = build_page({"limit": "1"}, {**SOURCES, "say.js": SOURCES["say.js"].replace(b"hello", b"hi")})
    renamed = set(before.assets) ^ set(after.assets)
    assert sorted(name.split(".")[0] for name in renamed) == ["main", "main", "say", "say"]


def test_text_files_are_kept_gzipped_when_that_pays() -> None:
    page = build_page({"limit": "1"}, SOURCES)
    say = next(file for name, file in page.assets.items() if name.startswith("say."))
    assert say.gzipped is not None
    assert gzip.decompress(say.gzipped) == say.content
    style = next(file for name, file in page.assets.items() if name.startswith("style."))
    assert style.gzipped is None  # 20 bytes: gzip's header alone is larger


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ({**SOURCES, "main.js": b'import "/assets/gone.js";'}, "main.js refers to /assets/gone.js"),
        ({**SOURCES, "say.js": b'import "/assets/main.js";'}, "an import cycle: main.js -> say.js -> main.js"),
        ({**SOURCES, "index.html": INDEX + b"{{unknown}}"}, "placeholder {{unknown}} with no value"),
    ],
    ids=["missing", "cycle", "placeholder"],
)
def test_a_mistake_in_the_files_stops_the_start_up_with_what_it_is(sources: dict[str, bytes], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build_page({"limit": "1"}, sources)
