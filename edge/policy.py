"""Per-route rules from the optional policy file `EDGE_POLICY_FILE` (TOML or YAML).

```toml
[[routes]]
name = "voice-turns"
path = "/api/v1/sessions/*/turns"   # a prefix, or a glob: * one segment, ** any
methods = ["POST"]                  # optional; all methods when absent
rate_limit = "10/minute;200/day"    # or "off"
max_body_bytes = 10485760
cache = "no-store"                  # immutable | revalidate | no-store | a Cache-Control value
redact = true                       # what each `*` matched is `{redacted}` in logs and spans
```

Each concern asks only for its own setting: for a request, the first rule (in file order)
that matches and sets it wins, else the environment's default applies. Paths are matched
against the decoded path, the one applications route on.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.settings import ConfigurationError
from edge.settings import check_rate_limit, check_rate_limit_key

T = TypeVar("T")

# Stands for a redacted part of a path; reads like a path template (`/sessions/{redacted}`).
REDACTED = "{redacted}"


class RouteRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    path: str = Field(pattern=r"^/")
    methods: list[str] | None = None
    rate_limit: str | None = None
    rate_limit_key: list[str] | None = None
    max_body_bytes: int | None = Field(None, ge=0)
    cache: str | None = None
    redact: bool | None = None

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: list[str] | None) -> list[str] | None:
        return [method.upper() for method in value] if value is not None else None

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _rate_limit(cls, value: Any) -> Any:
        if value is False:  # YAML reads a bare `off` as false
            return "off"
        return check_rate_limit(value) if isinstance(value, str) else value

    @field_validator("rate_limit_key")
    @classmethod
    def _rate_limit_key(cls, value: list[str] | None) -> list[str] | None:
        return check_rate_limit_key(value) if value is not None else None

    @model_validator(mode="after")
    def _redact_needs_a_wildcard(self) -> RouteRule:
        # Only `*` wildcards are redacted: without one, `redact = true` would hide nothing.
        if self.redact and not any("*" in segment for segment in self.path.split("/") if segment != "**"):
            raise ValueError(f"redact = true needs a `*` in path {self.path!r} to mark the secret segments")
        return self

    @property
    def label(self) -> str:
        """How the rule is named in headers and logs."""
        return self.name or self.path


class Policy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    routes: list[RouteRule] = []


def load_policy(path: Path | None) -> Policy:
    if path is None:
        return Policy()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"EDGE_POLICY_FILE: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"EDGE_POLICY_FILE: {path} is not UTF-8 text (byte {exc.start})") from None
    try:
        document: Any = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"EDGE_POLICY_FILE: {path} is not valid {path.suffix[1:]}: {exc}") from None
    try:
        return Policy.model_validate(document or {})
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"])
            problems.append(f"  {where}: {problem['msg'].removeprefix('Value error, ')}")
        raise ConfigurationError(f"EDGE_POLICY_FILE: {path}:\n" + "\n".join(problems)) from None


def path_matcher(pattern: str) -> Callable[[str], bool]:
    """A prefix (on a segment boundary) or, with `*`, a glob over path segments: `*` is any
    one segment (or part of one), a `**` segment any number of segments, none included."""
    if "*" not in pattern:
        prefix = pattern.rstrip("/")
        return lambda path: path == prefix or path.startswith(prefix + "/") or (not prefix and path == "/")
    compiled = _glob(pattern)
    return lambda path: compiled.fullmatch(path) is not None


def _glob(pattern: str) -> re.Pattern[str]:
    """The glob as a regular expression, each `*` (not `**`) a capture group for redaction."""
    regex = ""
    for segment in pattern.split("/")[1:]:
        if segment == "**":
            regex += "(?:/.*)?"
        else:
            regex += "/" + "([^/]*)".join(re.escape(part) for part in segment.split("*"))
    # DOTALL: a decoded path may hold a newline (`%0A`), and `**` must match it all the same.
    return re.compile(regex, re.DOTALL)


class PathRedactor:
    """The path as the edge's logs and spans show it: the first rule matching the request
    that sets `redact` decides; with `redact = true`, whatever each `*` of its path matched is
    replaced by `{redacted}` (what `**` matched is kept: it names the route, not the secret)."""

    def __init__(self, policy: Policy) -> None:
        self._rules = [
            (frozenset(rule.methods) if rule.methods else None, _redaction(rule.path, rule.redact))
            for rule in policy.routes
            if rule.redact is not None
        ]

    def __call__(self, method: str, path: str) -> str:
        for methods, redaction in self._rules:
            if (methods is None or method in methods) and (shown := redaction(path)) is not None:
                return shown
        return path


def _redaction(pattern: str, redact: bool) -> Callable[[str], str | None]:
    """The path as shown when `pattern` matches it, else None."""
    if not redact:
        matches = path_matcher(pattern)
        return lambda path: path if matches(path) else None
    compiled = _glob(pattern)

    def redacted(path: str) -> str | None:
        match = compiled.fullmatch(path)
        if match is None:
            return None
        parts: list[str] = []
        end = 0
        for group in range(1, compiled.groups + 1):
            start, stop = match.span(group)
            if start < stop:  # an empty match hides nothing: shown as it came
                parts += (path[end:start], REDACTED)
                end = stop
        parts.append(path[end:])
        return "".join(parts)

    return redacted


class RouteTable(Generic[T]):
    """One concern's view of the policy: the value for a request."""

    def __init__(self, default: T, rules: list[tuple[RouteRule, T]]) -> None:
        self.default = default
        self._rules = [
            (path_matcher(rule.path), frozenset(rule.methods) if rule.methods else None, value) for rule, value in rules
        ]

    @classmethod
    def from_policy(cls, policy: Policy, default: T, setting: Callable[[RouteRule], T | None]) -> RouteTable[T]:
        rules = [(rule, value) for rule in policy.routes if (value := setting(rule)) is not None]
        return cls(default, rules)

    def lookup(self, method: str, path: str) -> T:
        for matches, methods, value in self._rules:
            if (methods is None or method in methods) and matches(path):
                return value
        return self.default
