"""Error tracking with Sentry, for the edge and the app: off unless `SENTRY_DSN` is set.

Off, nothing is imported or initialised (the SDK costs about 140 ms to import). On, one
`init_error_tracking` at start-up (per worker process) sends errors and nothing else: no
performance tracing (OpenTelemetry's job, `common.telemetry`), no sessions, no logs, no
trace headers on outgoing requests. What people say to the companion is never sent: the
events are scrubbed here, by `scrub_event` and `scrub_breadcrumb`, and by the SDK's own
`EventScrubber` with this project's denylist (docs/error-tracking.md):

- exception messages are replaced (a message can quote anything: a validation error
  quotes its input); the type and the stack trace stay, without local variables;
- a log line's event keeps the first line of its format string, redacted, without its
  arguments;
- the request keeps its method, its URL without the query and with capability ids
  redacted, and a few harmless headers; no body, cookies, user or client address;
- breadcrumbs are only outgoing HTTP requests (method, URL redacted, status): those of
  the logging, Redis and database integrations carry messages, keys and statements;
- extra data, tags and contexts lose every sensitive key (`SENSITIVE_KEYS`) and have every
  string redacted (`common.redaction`); the transaction is the route template.

Each event is tagged with the request's id (`request_id`), which finds its log line.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import tomllib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from pydantic import SecretStr
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from common.logs import request_id_var
from common.redaction import redact
from common.settings import Environment

if TYPE_CHECKING:
    from sentry_sdk._types import Breadcrumb, BreadcrumbHint, Event, Hint

PACKAGE = "voice-companion"
FILTERED = "[Filtered]"  # what the SDK's own scrubber writes in place of a value

# Keys whose values are dropped wherever they appear (request headers, extra data, tags,
# contexts, breadcrumb data), compared case-insensitively; added to the SDK's own list.
SENSITIVE_KEYS = (
    # what people say and hear
    "transcript",
    "transcription",
    "reply",
    "text",
    "said",
    "content",
    "prompt",
    "messages",
    "memory",
    "memories",
    "fact",
    "summary",
    "audio",
    "input",
    "body",
    # capabilities
    "session_id",
    "sessionid",
    "audio_id",
    "audio_url",
    "turn_id",
    # keys and credentials
    "authorization",
    "proxy-authorization",
    "xi-api-key",
    "xi_api_key",
    "x-api-key",
    "api-key",
    "api_key",
    "apikey",
    "groq_api_key",
    "elevenlabs_api_key",
    "qdrant_api_key",
    "sentry_dsn",
    "dsn",
    "password",
    "secret",
    "token",
    "cookie",
    "cookies",
    "set-cookie",
    "set_cookie",
    # a log record's rendered traceback and uvicorn's coloured copy of a message
    "exception",
    "color_message",
)
_SENSITIVE = frozenset(key.lower() for key in SENSITIVE_KEYS)

# The request headers an event keeps: nothing that identifies a person or holds a key.
KEPT_HEADERS = frozenset({"accept", "content-length", "content-type", "host"})
# Breadcrumbs of outgoing HTTP requests (the standard library's and httpx's); every other
# kind is dropped.
KEPT_BREADCRUMB_CATEGORIES = frozenset({"httplib"})
KEPT_BREADCRUMB_DATA = frozenset({"url", "method", "http.method", "status_code", "http.response.status_code", "reason"})
# Sentry's own trace context: random ids, and the sampling context the envelope's header
# is made of (ids, release, environment, a route template), which redaction would break.
TRACE_IDS = frozenset({"trace_id", "span_id", "parent_span_id", "dynamic_sampling_context"})
# A request id the project made (UUIDv7); anything else a client sent is not tagged.
MADE_REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# What Sentry refuses in a release name.
BAD_RELEASE = re.compile(r"[\n\t/\\]")


class ErrorTrackingSettings(Protocol):
    @property
    def environment(self) -> Environment: ...

    @property
    def sentry_dsn(self) -> SecretStr | None: ...

    @property
    def sentry_release(self) -> str | None: ...


def dsn_of(settings: ErrorTrackingSettings) -> str | None:
    """The DSN, or None when unset or empty (error tracking off)."""
    dsn = settings.sentry_dsn.get_secret_value().strip() if settings.sentry_dsn is not None else ""
    return dsn or None


def check_error_tracking(settings: ErrorTrackingSettings) -> None:
    """Start-up validation of `SENTRY_DSN` and `SENTRY_RELEASE`; the message names the
    variable and never repeats the DSN."""
    problems = []
    dsn = dsn_of(settings)
    if dsn is not None:
        from sentry_sdk.utils import BadDsn, Dsn

        try:
            Dsn(dsn)
        except BadDsn as error:
            problems.append(f"SENTRY_DSN: not a Sentry DSN such as https://<public key>@<host>/<project id> ({error})")
    release = settings.sentry_release
    if release and (BAD_RELEASE.search(release) or release.strip() in (".", "..", "", "latest") or len(release) > 200):
        problems.append(
            "SENTRY_RELEASE: Sentry refuses a release with a slash, backslash, tab or newline, "
            "'.', '..', 'latest', or more than 200 characters"
        )
    if problems:
        raise ValueError("\n  ".join(problems))


def default_release() -> str:
    """`voice-companion@<version>`: the installed package's version, else pyproject.toml's."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = _pyproject_version() or "unknown"
    return f"{PACKAGE}@{version}"


def _pyproject_version() -> str | None:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    version = project.get("version")
    return version if isinstance(version, str) else None


def init_error_tracking(settings: ErrorTrackingSettings, service: str, *, log_events: bool = True) -> bool:
    """Initialises Sentry for this process when `SENTRY_DSN` is set; whether it did.

    `service` is the events' `server_name` (not the host's name). With `log_events`, every
    record logged at ERROR becomes an event (the logging integration's handler, which runs
    after the process's own handlers); the app, whose log handler takes the traceback off
    the record, puts the handler first itself (`report_logged_errors`).
    """
    dsn = dsn_of(settings)
    if dsn is None:
        return False
    with warnings.catch_warnings():
        # sentry-sdk 2.75 deprecates the option for `data_collection`; said explicitly all the same.
        warnings.filterwarnings("ignore", "The send_default_pii option is deprecated", DeprecationWarning)
        _init(dsn, settings, service, log_events)
    return True


def _init(dsn: str, settings: ErrorTrackingSettings, service: str, log_events: bool) -> None:
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber

    sentry_sdk.init(
        dsn=dsn,
        environment=settings.environment.value,
        release=settings.sentry_release or default_release(),
        server_name=service,
        send_default_pii=False,
        include_local_variables=False,  # a turn's locals hold what was said
        max_request_body_size="never",
        traces_sample_rate=None,  # no tracing at all: OpenTelemetry traces
        trace_propagation_targets=[],  # no sentry-trace/baggage headers to the providers
        auto_session_tracking=False,
        event_scrubber=EventScrubber(denylist=[*DEFAULT_DENYLIST, *SENSITIVE_KEYS], recursive=True),
        before_send=scrub_event,
        before_breadcrumb=scrub_breadcrumb,
        integrations=[
            # No breadcrumbs from log records (they would carry every message), no Sentry logs.
            LoggingIntegration(level=None, event_level=logging.ERROR if log_events else None, sentry_logs_level=None)
        ],
    )


def report_logged_errors(config: dict[str, Any], settings: ErrorTrackingSettings) -> dict[str, Any]:
    """`config` (a `logging.config.dictConfig` document) with Sentry's event handler first
    on the root logger, at ERROR, when error tracking is on: it sees each record before
    the other handlers' filters change it (the app's redaction takes the traceback off the
    record). Records that carry an exception already reported (`ReportUnhandledErrors`)
    are dropped by the SDK's deduplication."""
    if dsn_of(settings) is None:
        return config
    handler = {"()": "sentry_sdk.integrations.logging.EventHandler", "level": "ERROR"}
    root = {**config["root"], "handlers": ["sentry", *config["root"]["handlers"]]}
    return {**config, "handlers": {"sentry": handler, **config["handlers"]}, "root": root}


class ReportUnhandledErrors:
    """Reports an exception that escapes the routes, then lets it go on to the app's own
    handler (`app.observability.RequestContextMiddleware`), which logs it and answers 500:
    the Sentry integrations see only what escapes the whole application, which nothing does.
    Added inside that handler, and only when error tracking is on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # what that handler leaves alone, uvicorn logs: a logged error
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            raise  # the client went away: nothing wrong on our side
        except Exception as exc:
            import sentry_sdk
            from sentry_sdk.utils import event_from_exception

            event, hint = event_from_exception(
                exc,
                client_options=sentry_sdk.get_client().options,
                mechanism={"type": "voice-companion", "handled": False},
            )
            sentry_sdk.capture_event(event, hint=hint)
            raise


# -- scrubbing -------------------------------------------------------------------------------


def scrub_event(event: Event, hint: Hint) -> Event | None:
    """`before_send`: what the event may keep of the request, the exception, the log line,
    the breadcrumbs, extra data, tags and contexts (the module's docstring)."""
    data = cast(dict[str, Any], event)
    data.pop("user", None)
    if "request" in data:
        data["request"] = _request(data["request"])
    for exception in _values(data.get("exception")):
        if exception.get("value"):
            exception["value"] = FILTERED
        _strip_frames(exception.get("stacktrace"))
    for thread in _values(data.get("threads")):
        _strip_frames(thread.get("stacktrace"))
    logentry = data.get("logentry")
    if isinstance(logentry, dict):
        # A format string is one line; what follows a newline is data (uvicorn logs a
        # traceback, exception messages and all, as the message itself).
        message = redact(str(logentry.get("message") or "").split("\n", 1)[0])
        data["logentry"] = {"message": message, "formatted": message}
    if isinstance(data.get("message"), str):
        data["message"] = redact(data["message"])
    if isinstance(data.get("transaction"), str):
        data["transaction"] = redact(data["transaction"])
    for key in ("extra", "tags"):
        if key in data:
            data[key] = _clean(data[key])
    contexts = data.get("contexts")
    if isinstance(contexts, dict):
        data["contexts"] = {
            redact(str(name)): (
                {key: value if key in TRACE_IDS else _clean_item(key, value) for key, value in context.items()}
                if isinstance(context, dict)
                else _clean(context)
            )
            for name, context in contexts.items()
        }
    breadcrumbs = data.get("breadcrumbs")
    if isinstance(breadcrumbs, dict) and isinstance(breadcrumbs.get("values"), list):
        kept = (scrub_breadcrumb(crumb, {}) for crumb in breadcrumbs["values"] if isinstance(crumb, dict))
        breadcrumbs["values"] = [crumb for crumb in kept if crumb is not None]
    request_id = request_id_var.get()
    if request_id is not None and MADE_REQUEST_ID.fullmatch(request_id):
        tags = data.get("tags")
        data["tags"] = {**(tags if isinstance(tags, dict) else {}), "request_id": request_id}
    return event


def scrub_breadcrumb(crumb: Breadcrumb, hint: BreadcrumbHint) -> Breadcrumb | None:
    """`before_breadcrumb`: outgoing HTTP requests only, their URL redacted and without its query."""
    if crumb.get("category") not in KEPT_BREADCRUMB_CATEGORIES:
        return None
    if isinstance(crumb.get("message"), str):
        crumb["message"] = redact(crumb["message"])
    data = crumb.get("data")
    if isinstance(data, dict):
        crumb["data"] = {
            key: _url(value) if key == "url" and isinstance(value, str) else _clean(value)
            for key, value in data.items()
            if key in KEPT_BREADCRUMB_DATA
        }
    return crumb


def _request(request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        return {}
    kept: dict[str, Any] = {}
    if isinstance(request.get("method"), str):
        kept["method"] = request["method"]
    if isinstance(request.get("url"), str):
        kept["url"] = _url(request["url"])
    headers = request.get("headers")
    if isinstance(headers, dict):
        kept["headers"] = {
            name: redact(str(value))
            for name, value in headers.items()
            if isinstance(name, str) and name.lower() in KEPT_HEADERS
        }
    return kept


def _url(url: str) -> str:
    """The URL without its query or fragment, capability ids redacted."""
    return redact(url.split("#", 1)[0].split("?", 1)[0])


def _values(container: Any) -> list[dict[str, Any]]:
    values = container.get("values") if isinstance(container, dict) else None
    return [value for value in values if isinstance(value, dict)] if isinstance(values, list) else []


def _strip_frames(stacktrace: Any) -> None:
    frames = stacktrace.get("frames") if isinstance(stacktrace, dict) else None
    for frame in frames if isinstance(frames, list) else ():
        if isinstance(frame, dict):
            frame.pop("vars", None)


def _clean_item(key: Any, value: Any) -> Any:
    return FILTERED if isinstance(key, str) and key.lower() in _SENSITIVE else _clean(value)


def _clean(value: Any) -> Any:
    """Sensitive keys filtered and every string redacted, at any depth."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(key) if isinstance(key, str) else key: _clean_item(key, item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value
