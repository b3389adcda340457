"""Request metrics: the route label of `http_server_request_duration_seconds`, and
`edge_errors_total` by code for every error the edge answered itself, which edge/errors.py
marks in the scope; `common.metrics.RequestDurationMiddleware` times each request and calls
both (docs/metrics.md#the-edge).

The route label is never the raw path (unbounded: scanners send anything): for the edge's
own endpoints their path, otherwise the path pattern of the first policy rule that matches
and sets more than `redact` (`/api/v1/sessions/*/turns`), else of the first that matches
at all (`/api/v1/sessions/*/**`), else `other`.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter
from starlette.types import Scope

from edge.policy import Policy, RouteRule, RouteTable
from edge.scope import EDGE_ERROR_SCOPE_KEY, is_edge_path

OTHER = "other"
OWN_ROUTES = frozenset({"/_edge/live", "/_edge/ready"})


class RouteLabels:
    def __init__(self, policy: Policy) -> None:
        acting = [rule for rule in policy.routes if _acts_on(rule)]
        ordered = [*acting, *(rule for rule in policy.routes if not _acts_on(rule))]
        self.table = RouteTable(OTHER, [(rule, rule.path) for rule in ordered])
        # A path's label never changes; the paths seen most (pages, assets, probes) are
        # looked up once. Paths with ids in them come and go through the bounded cache.
        self.label = functools.lru_cache(maxsize=4096)(self._label)

    def __call__(self, scope: Scope) -> str:
        return self.label(scope["method"], scope["path"])

    def _label(self, method: str, path: str) -> str:
        if is_edge_path(path):
            return path if path in OWN_ROUTES else OTHER
        return self.table.lookup(method, path)


class EdgeErrors:
    """Counts the error a request was answered by the edge itself, if it was."""

    def __init__(self, errors: Counter) -> None:
        self.errors = errors

    def __call__(self, scope: Scope) -> None:
        code = scope.get(EDGE_ERROR_SCOPE_KEY)
        if code is not None:
            self.errors.labels(code).inc()


def _acts_on(rule: RouteRule) -> bool:
    """Whether the rule sets more than `redact`."""
    return any(value is not None for value in (rule.rate_limit, rule.rate_limit_key, rule.max_body_bytes, rule.cache))
