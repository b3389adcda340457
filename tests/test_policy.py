"""The policy file: loading TOML and YAML, refusing invalid files with the place at fault,
path matching, and the first-rule-that-sets-it lookup each concern uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.api.routes import MULTIPART_ALLOWANCE
from app.settings import AppSettings
from common.settings import ConfigurationError
from edge.policy import REDACTED, PathRedactor, Policy, RouteRule, RouteTable, load_policy, path_matcher

TOML_POLICY = """
[[routes]]
name = "voice-turns"
path = "/api/v1/sessions/*/turns"
methods = ["POST"]
rate_limit = "10/minute;200/day"
max_body_bytes = 10485760

[[routes]]
name = "sessions"
path = "/api/v1/sessions"
methods = ["post", "Put"]
rate_limit = "20/hour"
rate_limit_key = ["client", "header:X-Api-Key"]

[[routes]]
path = "/assets/**"
cache = "immutable"
rate_limit = "off"
"""

YAML_POLICY = """
routes:
  - name: voice-turns
    path: /api/v1/sessions/*/turns
    methods: [POST]
    rate_limit: 10/minute;200/day
    max_body_bytes: 10485760
  - name: sessions
    path: /api/v1/sessions
    methods: [post, Put]
    rate_limit: 20/hour
    rate_limit_key: [client, "header:X-Api-Key"]
  - path: /assets/**
    cache: immutable
    rate_limit: "off"
"""

EXPECTED = Policy(
    routes=[
        RouteRule(
            name="voice-turns",
            path="/api/v1/sessions/*/turns",
            methods=["POST"],
            rate_limit="10/minute;200/day",
            max_body_bytes=10485760,
        ),
        RouteRule(
            name="sessions",
            path="/api/v1/sessions",
            methods=["POST", "PUT"],
            rate_limit="20/hour",
            rate_limit_key=["client", "header:X-Api-Key"],
        ),
        RouteRule(path="/assets/**", cache="immutable", rate_limit="off"),
    ]
)


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [("policy.toml", TOML_POLICY), ("policy.yaml", YAML_POLICY)])
def test_valid_policy_file_loads_every_rule_in_order(tmp_path: Path, name: str, text: str) -> None:
    policy = load_policy(write(tmp_path, name, text))
    assert policy == EXPECTED
    voice, sessions, assets = policy.routes
    assert voice.label == "voice-turns"
    assert voice.methods == ["POST"]
    assert voice.rate_limit == "10/minute;200/day"
    assert voice.rate_limit_key is None
    assert voice.cache is None
    assert sessions.methods == ["POST", "PUT"]  # methods are upper-cased
    assert sessions.rate_limit_key == ["client", "header:x-api-key"]  # header names normalised
    assert assets.label == "/assets/**"  # a rule without a name is labelled by its path
    assert assets.rate_limit == "off"
    assert assets.max_body_bytes is None


def test_toml_and_yaml_spellings_load_the_same_policy(tmp_path: Path) -> None:
    assert load_policy(write(tmp_path, "p.toml", TOML_POLICY)) == load_policy(write(tmp_path, "p.yml", YAML_POLICY))


def test_bare_yaml_off_means_off(tmp_path: Path) -> None:
    # YAML 1.1 reads an unquoted `off` as false; it must still mean "no limit".
    policy = load_policy(write(tmp_path, "policy.yaml", "routes:\n  - path: /static\n    rate_limit: off\n"))
    assert policy.routes[0].rate_limit == "off"


def test_no_file_and_empty_files_are_empty_policies(tmp_path: Path) -> None:
    assert load_policy(None) == Policy()
    assert load_policy(write(tmp_path, "empty.yaml", "")) == Policy()
    assert load_policy(write(tmp_path, "empty.toml", "")) == Policy()
    assert load_policy(write(tmp_path, "none.toml", "routes = []\n")).routes == []


# -- refusing invalid files ------------------------------------------------------------------------------


INVALID = [
    pytest.param(
        "policy.toml",
        '[[routes]]\npath = "/api"\nrate_limit = "10/fortnight"\n',
        ["routes.0.rate_limit", "10/fortnight"],
        id="toml-bad-rate-limit",
    ),
    pytest.param(
        "policy.yaml",
        "routes:\n  - path: /api\n    rate_limit: 10/fortnight\n",
        ["routes.0.rate_limit", "10/fortnight"],
        id="yaml-bad-rate-limit",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\npath = "/ok"\nrate_limit = "5/minute"\n\n[[routes]]\npath = "/api"\nrate_limit = "1/eon"\n',
        ["routes.1.rate_limit", "1/eon"],
        id="second-rule-at-fault",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\npath = "/api"\nratelimit = "10/minute"\n',
        ["routes.0.ratelimit", "Extra inputs are not permitted"],
        id="unknown-rule-key",
    ),
    pytest.param(
        "policy.yaml",
        "route:\n  - path: /api\n",
        ["route", "Extra inputs are not permitted"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\npath = "api/v1"\nrate_limit = "10/minute"\n',
        ["routes.0.path"],
        id="path-without-leading-slash",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\nrate_limit = "10/minute"\n',
        ["routes.0.path", "Field required"],
        id="path-missing",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\npath = "/api"\nrate_limit_key = ["cookie:session"]\n',
        ["routes.0.rate_limit_key", "cookie:session"],
        id="bad-key-part",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\npath = "/api"\nrate_limit_key = ["header:X-Real-IP"]\n',
        ["routes.0.rate_limit_key", "removes that header"],
        id="key-on-a-header-the-edge-drops",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\nname = "has spaces"\npath = "/api"\n',
        ["routes.0.name"],
        id="bad-name",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\npath = "/api"\nmax_body_bytes = -1\n',
        ["routes.0.max_body_bytes"],
        id="negative-body-limit",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\npath = "/api"\nrate_limit = 10\n',
        ["routes.0.rate_limit"],
        id="rate-limit-not-a-string",
    ),
    pytest.param(
        "policy.yaml",
        "- path: /api\n",
        ["policy.yaml"],
        id="yaml-list-instead-of-mapping",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\npath = "/api/v1/sessions"\nredact = true\n',
        ["routes.0", "redact = true needs a `*`", "/api/v1/sessions"],
        id="redact-on-a-prefix",
    ),
    pytest.param(
        "policy.yaml",
        "routes:\n  - path: /api/**\n    redact: true\n",
        ["routes.0", "redact = true needs a `*`", "/api/**"],
        id="redact-with-only-double-star",
    ),
    pytest.param(
        "policy.toml",
        '[[routes]]\npath = "/api/*"\nredact = "sometimes"\n',
        ["routes.0.redact"],
        id="redact-not-a-boolean",
    ),
]


@pytest.mark.parametrize(("name", "text", "fragments"), INVALID)
def test_invalid_policy_names_the_file_and_the_field(
    tmp_path: Path, name: str, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigurationError) as raised:
        load_policy(path)
    message = str(raised.value)
    assert message.startswith("EDGE_POLICY_FILE: "), message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_yaml_syntax_is_a_configuration_error(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yaml", "routes:\n  - path: /api\n    methods: [GET\n")
    with pytest.raises(ConfigurationError) as raised:
        load_policy(path)
    message = str(raised.value)
    assert message.startswith(f"EDGE_POLICY_FILE: {path} is not valid yaml"), message


def test_bad_toml_syntax_is_a_configuration_error(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.toml", '[[routes]\npath = "/api"\n')
    with pytest.raises(ConfigurationError) as raised:
        load_policy(path)
    assert str(raised.value).startswith(f"EDGE_POLICY_FILE: {path} is not valid toml"), str(raised.value)


def test_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigurationError) as raised:
        load_policy(path)
    message = str(raised.value)
    assert message.startswith("EDGE_POLICY_FILE: cannot read"), message
    assert str(path) in message


def test_file_that_is_not_text_is_a_configuration_error(tmp_path: Path) -> None:
    # A binary or Latin-1 file must stop the start-up with the file named, like any other
    # unreadable file, not with a traceback.
    path = write(tmp_path, "policy.yaml", b"routes:\n  - path: /caf\xe9\n")
    with pytest.raises(ConfigurationError) as raised:
        load_policy(path)
    assert str(path) in str(raised.value)


# -- path matching --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        # A prefix, on a segment boundary.
        ("/api", "/api", True),
        ("/api", "/api/", True),
        ("/api", "/api/x", True),
        ("/api", "/api/x/y", True),
        ("/api", "/apix", False),
        ("/api", "/ap", False),
        ("/api", "/other/api", False),
        ("/api/", "/api", True),
        ("/api/", "/api/x", True),
        ("/api/", "/apix", False),
        ("/", "/", True),
        ("/", "/anything/at/all", True),
        # `*`: exactly one segment, the whole path matched.
        ("/a/*/c", "/a/b/c", True),
        ("/a/*/c", "/a/b/x/c", False),
        ("/a/*/c", "/a/c", False),
        ("/a/*/c", "/a/b/c/d", False),
        ("/a/*", "/a/b", True),
        ("/a/*", "/a/b/c", False),
        ("/files/*.png", "/files/x.png", True),
        ("/files/*.png", "/files/x/y.png", False),
        ("/files/*.png", "/files/x.gif", False),
        # `**`: any depth.
        ("/a/**", "/a/b", True),
        ("/a/**", "/a/b/c/d", True),
        ("/a/**", "/ab/c", False),
        ("/a/**/z", "/a/b/z", True),
        ("/a/**/z", "/a/b/c/d/z", True),
        ("/a/**/z", "/a/b/z/q", False),
        ("/a/**/z", "/a/z", True),  # "any number" of segments includes none
        # Everything but the wildcards is literal.
        ("/v1.0/*", "/v1.0/x", True),
        ("/v1.0/*", "/v1x0/x", False),
        ("/a+b/*", "/a+b/x", True),
        ("/a+b/*", "/aab/x", False),
        # A decoded path may hold a newline (`%0A`): still one segment, still any depth.
        ("/a/*", "/a/b\nc", True),
        ("/a/**", "/a/b\nc/d", True),
        ("/a/**/z", "/a/\n/z", True),
    ],
)
def test_path_matcher(pattern: str, path: str, matches: bool) -> None:
    assert bool(path_matcher(pattern)(path)) is matches


# -- the first rule that sets the value ---------------------------------------------------------------------


def table_policy() -> Policy:
    return Policy(
        routes=[
            RouteRule(path="/api", cache="no-store"),
            RouteRule(name="turns", path="/api/v1/sessions/*/turns", methods=["post"], rate_limit="2/minute"),
            RouteRule(name="api", path="/api", rate_limit="50/minute"),
            RouteRule(name="v1", path="/api/v1", rate_limit="1/minute"),
            RouteRule(name="uploads", path="/uploads/**", methods=["PUT", "POST"], rate_limit="5/minute"),
        ]
    )


def test_lookup_returns_the_value_of_the_first_matching_rule_that_sets_it() -> None:
    limits = RouteTable.from_policy(table_policy(), "default", lambda rule: rule.rate_limit)

    assert limits.lookup("POST", "/api/v1/sessions/abc/turns") == "2/minute"
    # The turns rule is for POST only; the next rule that sets a limit wins.
    assert limits.lookup("GET", "/api/v1/sessions/abc/turns") == "50/minute"
    # File order, not the most specific path: /api comes before /api/v1.
    assert limits.lookup("GET", "/api/v1/other") == "50/minute"
    # The cache-only rule matches too but sets no limit, so it is skipped.
    assert limits.lookup("GET", "/api") == "50/minute"
    assert limits.lookup("PUT", "/uploads/a/b") == "5/minute"
    assert limits.lookup("GET", "/uploads/a/b") == "default"
    assert limits.lookup("GET", "/apix") == "default"
    assert limits.lookup("GET", "/") == "default"
    assert "1/minute" not in [limits.lookup(method, "/api/v1") for method in ("GET", "POST", "PUT")]

    caching = RouteTable.from_policy(table_policy(), None, lambda rule: rule.cache)
    assert caching.lookup("GET", "/api/v1/sessions/abc/turns") == "no-store"
    assert caching.lookup("GET", "/elsewhere") is None


def test_lookup_with_no_rule_setting_the_value_is_the_default() -> None:
    table = RouteTable.from_policy(table_policy(), 1024, lambda rule: rule.max_body_bytes)
    assert table.lookup("POST", "/api/v1/sessions/abc/turns") == 1024
    assert RouteTable.from_policy(Policy(), "x", lambda rule: rule.rate_limit).lookup("GET", "/") == "x"


def test_methods_from_a_file_are_matched_whatever_their_case(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            "policy.yaml",
            "routes:\n  - path: /api\n    methods: [post]\n    rate_limit: 1/second\n",
        )
    )
    table = RouteTable.from_policy(policy, "default", lambda rule: rule.rate_limit)
    assert table.lookup("POST", "/api/x") == "1/second"
    assert table.lookup("GET", "/api/x") == "default"


def test_the_shipped_policy_file_is_valid_and_lets_voice_uploads_through() -> None:
    """A turn's body may be the app's largest recording in its multipart envelope: the app,
    not the edge, refuses a recording over its limit (tests/test_size_limits.py)."""
    policy = load_policy(Path(__file__).resolve().parent.parent / "config" / "edge-policy.toml")
    body_limits = RouteTable.from_policy(policy, 1024 * 1024, lambda rule: rule.max_body_bytes)
    app_audio_limit = AppSettings.model_fields["max_audio_bytes"].default
    assert body_limits.lookup("POST", "/api/v1/sessions/abc/turns") == app_audio_limit + MULTIPART_ALLOWANCE
    assert body_limits.lookup("POST", "/api/v1/sessions") == 1024 * 1024


# -- redaction ------------------------------------------------------------------------------------------


def test_redact_loads_from_toml_and_yaml(tmp_path: Path) -> None:
    toml = '[[routes]]\npath = "/s/*/**"\nredact = true\n\n[[routes]]\npath = "/s/public"\nredact = false\n'
    yaml_text = "routes:\n  - path: /s/*/**\n    redact: true\n  - path: /s/public\n    redact: false\n"
    expected = Policy(routes=[RouteRule(path="/s/*/**", redact=True), RouteRule(path="/s/public", redact=False)])
    assert load_policy(write(tmp_path, "p.toml", toml)) == expected
    assert load_policy(write(tmp_path, "p.yaml", yaml_text)) == expected
    assert RouteRule(path="/x").redact is None


def redactor(*rules: RouteRule) -> PathRedactor:
    return PathRedactor(Policy(routes=list(rules)))


@pytest.mark.parametrize(
    ("pattern", "path", "shown"),
    [
        # Each `*` is redacted; `**` and the literal parts are kept.
        ("/sessions/*", "/sessions/abc", "/sessions/{redacted}"),
        ("/sessions/*/**", "/sessions/abc", "/sessions/{redacted}"),
        ("/sessions/*/**", "/sessions/abc/turns", "/sessions/{redacted}/turns"),
        ("/sessions/*/**", "/sessions/abc/turns/7/x", "/sessions/{redacted}/turns/7/x"),
        ("/sessions/*/**", "/sessions/abc/", "/sessions/{redacted}/"),
        ("/a/*/b/*", "/a/one/b/two", "/a/{redacted}/b/{redacted}"),
        ("/files/*.png", "/files/secret.png", "/files/{redacted}.png"),
        ("/k/key-*-*", "/k/key-1-2", "/k/key-{redacted}-{redacted}"),
        ("/**/token/*", "/x/y/token/abc", "/x/y/token/{redacted}"),
        # A segment holding a newline is still one segment, and all of it is redacted.
        ("/sessions/*/**", "/sessions/ab\ncd/turns\n", "/sessions/{redacted}/turns\n"),
        # An empty segment hides nothing and is shown as it came.
        ("/sessions/*/**", "/sessions//turns", "/sessions//turns"),
        # A path the rule does not match is shown in full.
        ("/sessions/*/**", "/sessions", "/sessions"),
        ("/sessions/*/**", "/other/abc", "/other/abc"),
        ("/sessions/*", "/sessions/abc/turns", "/sessions/abc/turns"),
    ],
)
def test_redactor_replaces_what_each_star_matched(pattern: str, path: str, shown: str) -> None:
    assert redactor(RouteRule(path=pattern, redact=True))("GET", path) == shown


def test_redactor_first_rule_that_sets_redact_wins() -> None:
    redact = redactor(
        RouteRule(path="/s/*/turns", rate_limit="1/minute"),  # matches, sets no `redact`: skipped
        RouteRule(path="/s/public/**", redact=False),  # an exemption, before the broad rule
        RouteRule(path="/s/*/**", methods=["delete"], redact=True),
        RouteRule(path="/s/*/*", redact=True),
        RouteRule(path="/s/**", redact=False),  # never reached for what the rules above match
    )
    assert redact("GET", "/s/abc/turns") == "/s/{redacted}/{redacted}"
    assert redact("DELETE", "/s/abc/turns") == "/s/{redacted}/turns"
    assert redact("DELETE", "/s/abc") == "/s/{redacted}"
    assert redact("GET", "/s/abc") == "/s/abc"  # only DELETE is redacted at that depth
    assert redact("DELETE", "/s/public/abc") == "/s/public/abc"
    assert redact("GET", "/elsewhere/abc") == "/elsewhere/abc"


def test_redactor_without_redact_rules_shows_paths_as_they_came() -> None:
    assert redactor()("GET", "/sessions/abc") == "/sessions/abc"
    assert redactor(RouteRule(path="/sessions/*", rate_limit="1/minute"))("GET", "/sessions/abc") == "/sessions/abc"


SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "config" / "edge-policy.toml"
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"]
SESSION_ID = "0194f3c2-9b1e-7a3d-8c4f-2e6b1a9d0c57"
AUDIO_ID = "3f9a1c2e4b5d6e7f8091a2b3c4d5e6f7"


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize(
    ("path", "shown"),
    [
        (f"/api/v1/sessions/{SESSION_ID}", "/api/v1/sessions/{redacted}"),
        (f"/api/v1/sessions/{SESSION_ID}/", "/api/v1/sessions/{redacted}/"),
        (f"/api/v1/sessions/{SESSION_ID}/turns", "/api/v1/sessions/{redacted}/turns"),
        (f"/api/v1/sessions/{SESSION_ID}/turns/2/audio", "/api/v1/sessions/{redacted}/turns/2/audio"),
        (f"/api/v1/audio/{AUDIO_ID}", "/api/v1/audio/{redacted}"),
        (f"/api/v1/audio/{AUDIO_ID}/x", "/api/v1/audio/{redacted}/x"),
        # Paths without an id are shown as they are.
        ("/api/v1/sessions", "/api/v1/sessions"),
        ("/api/v1/ready", "/api/v1/ready"),
        ("/", "/"),
    ],
)
def test_the_shipped_policy_redacts_session_and_audio_ids_for_every_method(method: str, path: str, shown: str) -> None:
    redact = PathRedactor(load_policy(SHIPPED_POLICY))
    assert redact(method, path) == shown
    assert SESSION_ID not in shown
    assert AUDIO_ID not in shown
    assert (REDACTED in shown) is (path != shown)
