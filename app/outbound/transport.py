"""The one httpx transport every outbound call goes through.

A call passes, in this order:

1. the host's 429 block: refused with `HostRateLimited` until the Retry-After instant;
2. the breaker: refused at once with `BreakerOpen` while open, or while half-open with
   its probes in flight;
3. the bulkhead: waits at most `bulkhead_wait` for a slot, else `BulkheadFull`; the slot
   is held until the response body is closed (a stream counts against the provider's
   concurrency limit until it ends);
4. attempts, each with its own span and timeout, until one succeeds or retrying is unsafe,
   over budget, refused by the breaker, or would overrun the call's deadline.

What the transport keeps - policy, breaker, bulkhead, retry budget, 429 block - is per
provider and authority: a request carries its provider's name in the `outbound.provider`
extension (the clients `Outbound` builds set it), so two providers at one address keep
apart. A request without a name gets the authority's nameless state, with the `default`
policy.

Per call, request extensions override the policy: `outbound.deadline` (seconds for the
whole call) and `outbound.idempotent` (True: safe to repeat; False: never repeat).
Timeouts set on the httpx client are replaced by the policy's. A failed response that
asked to wait (`Retry-After`, `retry-after-ms`) comes back with the wait, capped by the
policy, in its `outbound.retry_after` extension.

A response is returned to the caller as soon as its head arrives: nothing is retried
after that, so no stream is ever restarted after its first byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from time import monotonic

import httpx
from opentelemetry import trace

from app.outbound.breaker import Breaker, Permit
from app.outbound.classify import (
    IDEMPOTENT_METHODS,
    TOO_MANY_REQUESTS,
    is_failure_status,
    is_replayable,
    is_upstream_failure,
)
from app.outbound.errors import BreakerOpen, BulkheadFull, DeadlineExceeded, HostRateLimited
from app.outbound.host import Host, HostKey, host_key
from app.outbound.policy import HostPolicy
from app.outbound.retry import delay_before_retry, retry_after_seconds
from app.outbound.telemetry import OutboundMetrics, OutboundTelemetry

DEADLINE_EXTENSION = "outbound.deadline"
IDEMPOTENT_EXTENSION = "outbound.idempotent"
PROVIDER_EXTENSION = "outbound.provider"
RETRY_AFTER_EXTENSION = "outbound.retry_after"

DEFAULT_POLICY_NAME = "default"


class ResilientTransport(httpx.AsyncBaseTransport):
    """Wraps the real transport; shared by every outbound client, so `aclose` from a
    client is ignored and only the owner's `shutdown` closes the real one."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        default_policy: HostPolicy,
        tracer: trace.Tracer,
        metrics: OutboundMetrics,
    ) -> None:
        self._inner = inner
        self._default_policy = default_policy
        self._hosts: dict[HostKey, Host] = {}
        self._telemetry = OutboundTelemetry(tracer, metrics)

    @property
    def hosts(self) -> list[Host]:
        return list(self._hosts.values())

    def bind(self, base_url: str, name: str, policy: HostPolicy) -> Host:
        """Binds the provider `name`, with `policy`, to the authority of `base_url`: the
        requests naming it get a breaker, bulkhead and budget of their own there, whoever
        else is at that address (one simulator standing in for several providers, a
        gateway in front of several APIs). Binding the same name again changes nothing."""
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"outbound {name!r}: {base_url!r} is not an http(s) URL with a host")
        key = host_key(name, url)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = Host.create(url, name, policy, self._telemetry.breaker_moved(name))
        return host

    async def aclose(self) -> None:
        """Ignored: a client closing itself must not close the transport the others share."""

    async def shutdown(self) -> None:
        await self._inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        telemetry = self._telemetry
        url = request.url
        host = self._hosts.get(host_key(request.extensions.get(PROVIDER_EXTENSION), url))
        if host is None:
            host = self._nameless_host(url)
        policy = host.policy
        total = request.extensions.get(DEADLINE_EXTENSION, policy.total_deadline)
        if not isinstance(total, int | float) or total <= 0:
            raise ValueError(f"{DEADLINE_EXTENSION} must be a positive number of seconds, not {total!r}")
        started = monotonic()

        if host.blocked_until > started:
            telemetry.rejected(host, "rate_limited", host.blocked_until - started)
            raise HostRateLimited(host.authority, host.blocked_until - started)
        try:
            permit = host.breaker.acquire()
        except BreakerOpen as error:
            telemetry.rejected(host, "breaker_open", error.retry_after)
            raise
        try:
            await self._enter_bulkhead(host, min(policy.bulkhead_wait, total), telemetry)
        except BaseException as error:
            host.breaker.release(permit)
            if isinstance(error, asyncio.CancelledError):
                telemetry.call_finished(host, "cancelled")
            raise
        try:
            response = await self._send(request, host, permit, started + total, total, telemetry)
        except BaseException:
            host.bulkhead.release()
            raise
        if response.is_closed:
            # Read in full by the inner transport (httpx.MockTransport does): no body to guard.
            host.bulkhead.release()
            return response
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = GuardedBody(response.stream, host, permit)
        return response

    def _nameless_host(self, url: httpx.URL) -> Host:
        """The state of requests that name no provider (or one not bound to this authority)."""
        key = host_key(None, url)
        host = self._hosts.get(key)
        if host is None:
            if url.scheme not in ("http", "https"):
                # What the inner transport would raise, before a breaker exists for it.
                raise httpx.UnsupportedProtocol(f"outbound calls use http or https, not {url.scheme!r}")
            host = self._hosts[key] = Host.create(
                url, DEFAULT_POLICY_NAME, self._default_policy, self._telemetry.breaker_moved(DEFAULT_POLICY_NAME)
            )
        return host

    @staticmethod
    async def _enter_bulkhead(host: Host, wait: float, telemetry: OutboundTelemetry) -> None:
        bulkhead = host.bulkhead
        if not bulkhead.locked():
            await bulkhead.acquire()  # returns without suspending when a slot is free
            return
        try:
            if wait <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait):
                await bulkhead.acquire()
        except TimeoutError:
            telemetry.rejected(host, "bulkhead_full")
            raise BulkheadFull(host.authority, host.policy.max_concurrency, wait) from None

    async def _send(
        self,
        request: httpx.Request,
        host: Host,
        permit: Permit,
        deadline: float,
        total: float,
        telemetry: OutboundTelemetry,
    ) -> httpx.Response:
        """Attempts until an outcome is final; returns the response or raises the error."""
        policy = host.policy
        breaker = host.breaker
        host.retry_budget.record_call(monotonic())
        idempotent: bool | None = request.extensions.get(IDEMPOTENT_EXTENSION)
        if idempotent is None:
            idempotent = policy.all_methods_idempotent or request.method in IDEMPOTENT_METHODS
        replayable = is_replayable(request)
        resend_count = 0
        while True:
            attempt_timeout = min(policy.attempt_timeout, deadline - monotonic())
            if attempt_timeout <= 0:  # the wait for a bulkhead slot took all of it
                breaker.release(permit)
                telemetry.call_finished(host, "deadline_exceeded")
                raise DeadlineExceeded(host.authority, total)
            # httpcore bounds each step of the attempt - waiting for a pooled connection,
            # connecting, every write and every read, of the head and later of the body -
            # by what is left of the attempt. (An `asyncio.timeout` around the whole attempt
            # would also stop a head trickled byte by byte, but it measured 11 us a call,
            # more than everything else the transport does on a success.)
            request.extensions["timeout"] = {
                "connect": min(policy.connect_timeout, attempt_timeout),
                "read": attempt_timeout,
                "write": attempt_timeout,
                "pool": attempt_timeout,
            }
            span = telemetry.start_attempt(request, host, resend_count)
            response: httpx.Response | None = None
            error: httpx.TransportError | None = None
            try:
                response = await self._inner.handle_async_request(request)
            except httpx.TransportError as raised:
                error = raised
                telemetry.end_attempt(span, host, error=error)
            except asyncio.CancelledError:
                # The caller went away: that says nothing about the upstream.
                breaker.release(permit)
                telemetry.end_attempt(span, host, error=asyncio.CancelledError())
                telemetry.call_finished(host, "cancelled")
                raise
            except BaseException as raised:
                breaker.release(permit)
                telemetry.end_attempt(span, host, error=raised)
                telemetry.call_finished(host, "error")
                raise

            retry_after: float | None = None
            if response is not None:
                status = response.status_code
                telemetry.end_attempt(span, host, status=status)
                if status != TOO_MANY_REQUESTS and not is_failure_status(status):
                    breaker.record_success(permit)
                    telemetry.call_finished(host, "success")
                    return response
                retry_after = retry_after_seconds(response.headers, policy.retry_after_cap)
                if retry_after is not None:
                    response.extensions[RETRY_AFTER_EXTENSION] = retry_after
                if status == TOO_MANY_REQUESTS:
                    # The upstream is well, but asks everybody to wait: block the host.
                    breaker.release(permit)
                    if retry_after is not None:
                        host.block_for(retry_after)
                else:
                    breaker.record_failure(permit, f"HTTP {status}")
                delay = delay_before_retry(
                    policy,
                    idempotent=idempotent,
                    resend_count=resend_count,
                    status=status,
                    retry_after=retry_after,
                )
            else:
                assert error is not None
                if isinstance(error, httpx.TimeoutException) and attempt_timeout < policy.attempt_timeout:
                    # Cut short by the deadline, not given its full time: not the upstream's fault.
                    breaker.release(permit)
                    telemetry.call_finished(host, "deadline_exceeded")
                    raise DeadlineExceeded(host.authority, total) from error
                if is_upstream_failure(error):
                    breaker.record_failure(permit, error)
                else:
                    breaker.release(permit)
                delay = delay_before_retry(policy, idempotent=idempotent, resend_count=resend_count, error=error)

            next_permit = await self._before_retry(host, delay, deadline, replayable, response, telemetry)
            if next_permit is None:
                return self._final(host, response, error, telemetry)
            permit = next_permit
            resend_count += 1

    async def _before_retry(
        self,
        host: Host,
        delay: float | None,
        deadline: float,
        replayable: bool,
        failed_response: httpx.Response | None,
        telemetry: OutboundTelemetry,
    ) -> Permit | None:
        """Waits and takes a permit for the next attempt; None when there is none to make.

        The failed response stays open while waiting, so it can still be returned if the
        retry is refused; it is closed only once the next attempt is certain.
        """
        if delay is None or not replayable:
            return None
        # A retry also waits out a 429 block, its own or another call's.
        delay = max(delay, host.blocked_until - monotonic())
        if delay >= deadline - monotonic():
            return None
        if not host.retry_budget.try_spend(monotonic()):
            telemetry.retry_budget_exhausted(host)
            return None
        try:
            await asyncio.sleep(delay)
            permit = host.breaker.acquire()
        except BreakerOpen:
            return None
        except BaseException:
            if failed_response is not None:
                await failed_response.aclose()
            raise
        if failed_response is not None:
            await failed_response.aclose()
        telemetry.retried(host)
        return permit

    @staticmethod
    def _final(
        host: Host,
        response: httpx.Response | None,
        error: httpx.TransportError | None,
        telemetry: OutboundTelemetry,
    ) -> httpx.Response:
        if response is not None:
            rate_limited = response.status_code == TOO_MANY_REQUESTS
            telemetry.call_finished(host, "rate_limited" if rate_limited else "failure")
            return response
        assert error is not None
        telemetry.call_finished(host, "failure" if is_upstream_failure(error) else "error")
        raise error


class GuardedBody(httpx.AsyncByteStream):
    """The response body as the caller reads it: frees the bulkhead slot when closed, and
    tells the breaker when the body breaks off after a good head (a stream that keeps
    dying trips the breaker like a failing status does)."""

    def __init__(self, stream: httpx.AsyncByteStream, host: Host, permit: Permit) -> None:
        self._stream = stream
        self._breaker: Breaker = host.breaker
        self._bulkhead = host.bulkhead
        self._permit = permit
        self._holds_slot = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except httpx.TransportError as error:
            if is_upstream_failure(error):
                self._breaker.record_failure(self._permit, error)
            raise

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._holds_slot:
                self._holds_slot = False
                self._bulkhead.release()
