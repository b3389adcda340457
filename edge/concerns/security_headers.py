"""Security headers with `secure`: one preset for HTML pages, one for everything else.

Both are built once at start-up. A header the upstream already set is left as it is (the
app knows its own pages best); missing ones are added to every response, the edge's own
errors included, but a 304: a browser merges a 304's headers into the response it kept,
and a 304 has no content type to choose a preset by (an API preset on it would replace a
page's CSP with `default-src 'none'`). The upstream's `Server` and `X-Powered-By` are
removed from every response.

- HSTS: two years with subdomains by default (at least one year is enforced).
- HTML: a CSP for the voice page - scripts, styles and connections only from the page's
  own origin, no inline script, microphone recordings played back from `blob:` URLs,
  no framing; `Permissions-Policy` grants the microphone to the page's own origin only.
- Everything else: `default-src 'none'`, nothing to render, nothing to frame.
- Both: `nosniff`, `X-Frame-Options: DENY`, a referrer policy, COOP and CORP
  `same-origin`.
"""

from __future__ import annotations

import secure
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.scope import Headers

REMOVED = frozenset({b"server", b"x-powered-by"})

# Features a voice page never needs are switched off; the microphone is its own origin's.
PERMISSIONS = (
    secure.PermissionsPolicy().microphone("self").camera().geolocation().payment().usb().serial().display_capture()
)


API_CONTENT_SECURITY_POLICY = "default-src 'none'; frame-ancestors 'none'"
NO_REFERRER = secure.ReferrerPolicy().no_referrer()
STRICT_ORIGIN_WHEN_CROSS_ORIGIN = secure.ReferrerPolicy().strict_origin_when_cross_origin()


def html_content_security_policy(upgrade_insecure_requests: bool) -> str:
    csp = (
        secure.ContentSecurityPolicy()
        .default_src("'self'")
        .script_src("'self'")
        .style_src("'self'")
        .img_src("'self'", "data:", "blob:")
        .media_src("'self'", "blob:")
        .connect_src("'self'")
        .font_src("'self'")
        .worker_src("'self'", "blob:")
        .object_src("'none'")
        .base_uri("'self'")
        .form_action("'self'")
        .frame_ancestors("'none'")
    )
    if upgrade_insecure_requests:
        # Not in development: it would send a page served over http://localhost to https.
        csp = csp.upgrade_insecure_requests()
    return str(csp.header_value)


def preset(content_security_policy: str, hsts_max_age: int, referrer: secure.ReferrerPolicy) -> Headers:
    headers = secure.Secure(
        hsts=secure.StrictTransportSecurity().max_age(hsts_max_age).include_subdomains(),
        csp=secure.ContentSecurityPolicy().set(content_security_policy),
        permissions=PERMISSIONS,
        xfo=secure.XFrameOptions().deny(),
        xcto=secure.XContentTypeOptions().nosniff(),
        referrer=referrer,
        coop=secure.CrossOriginOpenerPolicy().same_origin(),
        corp=secure.CrossOriginResourcePolicy().same_origin(),
    ).headers
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, api_headers: Headers, html_headers: Headers) -> None:
        self.app = app
        self.api_headers = api_headers
        self.html_headers = html_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def send_with_security_headers(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                headers = message.get("headers", ())
                if message["status"] == 304:
                    message["headers"] = [header for header in headers if header[0] not in REMOVED]
                else:
                    message["headers"] = self.secure(headers)
            await send(message)

        await self.app(scope, receive, send_with_security_headers)

    def secure(self, headers: Headers) -> Headers:
        kept: Headers = []
        present = set()
        is_html = False
        for name, value in headers:
            if name in REMOVED:
                continue
            if name == b"content-type" and value.startswith(b"text/html"):
                is_html = True
            present.add(name)
            kept.append((name, value))
        kept += [header for header in (self.html_headers if is_html else self.api_headers) if header[0] not in present]
        return kept
