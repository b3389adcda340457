"""Request metrics: the route label of `http_server_request_duration_seconds`
(common/metrics.py times the request), and `edge_errors_total` by code for every error the
edge answered itself, which edge/errors.py marks in the scope (docs/metrics.md#the-edge).

The route label is never the raw path (unbounded: scanners send anything): for the edge's
own endpoints their path, otherwise the path pattern of the first policy rule that matches
and sets more than `redact` (`/api/v1/sessions/*/turns`), else of the first that matches
at all (`/api/v1/sessions/*/**`), else `other`.
"""

from __future__ import annotations

from prometheus_client import Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from edge.policy import Policy, RouteRule, RouteTable
from edge.scope import EDGE_ERROR_SCOPE_KEY, is_edge_path

OTHER = "other"
OWN_ROUTES = frozenset({"/_edge/live", "/_edge/ready"})


class RouteLabels:
    def __init__(self, policy: Policy) -> None:
        self.specific = RouteTable.from_policy(policy, OTHER, lambda rule: rule.path if _acts_on(rule) else None)
        self.any = RouteTable.from_policy(policy, OTHER, lambda rule: rule.path)

    def __call__(self, scope: Scope) -> str:
        method, path = scope["method"], scope["path"]
        if is_edge_path(path):
            return path if path in OWN_ROUTES else OTHER
        route = self.specific.lookup(method, path)
        return route if route != OTHER else self.any.lookup(method, path)


class EdgeErrorsMiddleware:
    def __init__(self, app: ASGIApp, errors: Counter) -> None:
        self.app = app
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            code = scope.get(EDGE_ERROR_SCOPE_KEY)
            if code is not None:
                self.errors.labels(code).inc()


def _acts_on(rule: RouteRule) -> bool:
    """Whether the rule sets more than `redact`."""
    return any(value is not None for value in (rule.rate_limit, rule.rate_limit_key, rule.max_body_bytes, rule.cache))
