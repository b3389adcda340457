"""The streaming provider clients over the real shared outbound transport: `Groq.chat_stream`
(server-sent events) and `ElevenLabs.speak_stream` (`/stream`), against the simulator and,
for what the simulator does not do (a stall, a malformed event, a stream that ends cleanly
without `[DONE]`), against a small upstream that misbehaves on purpose.

What is checked: the pieces join to the whole answer of the non-stream call; Groq's usage
is counted, ElevenLabs' characters once; refusals before the stream map as `exchange`
maps them; a stream that breaks off or goes silent is ProviderUnavailable and one breaker
failure (after its head's success), so the breaker opens after a known number of them; a
consumer that stops early frees the response and counts no failure; the deadline ends a
slow stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from starlette.types import Receive, Scope, Send

from app.outbound import HostPolicy, Outbound
from app.outbound.breaker import Breaker
from app.providers.elevenlabs import ElevenLabs
from app.providers.errors import ProviderError, ProviderRejected, ProviderUnavailable
from app.providers.groq import ChatMessage, Groq
from tests.outbound_support import outbound, policy
from tests.servers import ServerThread, serve
from tests.sim_support import ELEVEN_KEY, GROQ_KEY, VOICE, running_sim

T = TypeVar("T")

MODEL = "llama-3.1-8b-instant"
SPEECH_MODEL = "eleven_flash_v2_5"
FORMAT = "mp3_44100_128"
# The simulator's reply to this is 32 tokens: "You love hiking ... I'll keep that in mind."
STATEMENT: list[ChatMessage] = [
    {"role": "user", "content": "I love hiking in the mountains with my dog and my sister lives in Paris"}
]
HELLO: list[ChatMessage] = [{"role": "user", "content": "Hello"}]
SPOKEN = "This sentence is long enough to be streamed in several pieces of whole frames"
CUT_AFTER = 1500  # bytes of the statement's 9.5 kB stream: five of its 34 events
SLACK = 1.5  # scheduling noise on a loaded two-core machine
BROKEN_OFF = {"RemoteProtocolError", "ReadError"}  # how httpx names a dropped connection mid-body


# -- the clients under test, on one Outbound ---------------------------------------------------------------


@dataclass
class Providers:
    out: Outbound
    registry: CollectorRegistry
    groq: Groq
    elevenlabs: ElevenLabs

    def tokens(self, direction: str) -> float:
        value = self.registry.get_sample_value("groq_tokens_total", {"model": MODEL, "direction": direction})
        return value or 0.0

    def characters(self) -> float:
        return self.registry.get_sample_value("elevenlabs_characters_total", {"model": SPEECH_MODEL}) or 0.0

    def breaker(self, name: str) -> Breaker:
        (host,) = [host for host in self.out.transport.hosts if host.policy_name == name]
        return host.breaker


def providers(
    groq_url: str,
    elevenlabs_url: str,
    *,
    groq_key: str = GROQ_KEY,
    groq_policy: HostPolicy | None = None,
    elevenlabs_policy: HostPolicy | None = None,
) -> Providers:
    """Both clients as the app builds them (app/wiring.py), on a fresh Outbound: breakers,
    bulkheads and counters of the test's own."""
    out = outbound(policy(), groq=groq_policy or policy(), elevenlabs=elevenlabs_policy or policy())
    registry = CollectorRegistry()
    groq = Groq(
        out.client("groq", groq_url, headers={"authorization": f"Bearer {groq_key}"}),
        tokens=Counter("groq_tokens", "", ["model", "direction"], registry=registry),
        audio_seconds=Counter("groq_audio_seconds", "", ["model"], registry=registry),
    )
    elevenlabs = ElevenLabs(
        out.client("elevenlabs", elevenlabs_url, headers={"xi-api-key": ELEVEN_KEY}),
        characters=Counter("elevenlabs_characters", "", ["model"], registry=registry),
    )
    return Providers(out, registry, groq, elevenlabs)


def on_sim(sim: ServerThread, **options: Any) -> Providers:
    return providers(f"{sim.url}/openai/v1", sim.url, **options)


async def collect(stream: AsyncIterator[T]) -> tuple[list[T], ProviderError | None]:
    """What a stream gave, and the error it ended with, if any."""
    given: list[T] = []
    try:
        async for item in stream:
            given.append(item)
    except ProviderError as error:
        return given, error
    return given, None


def chat(p: Providers, messages: list[ChatMessage] = STATEMENT, deadline: float = 5.0) -> AsyncIterator[str]:
    return p.groq.chat_stream(MODEL, messages, deadline=deadline)


async def timed_chat(
    make: Callable[[], Providers], deadline: float
) -> tuple[list[str], ProviderError | None, float, float]:
    """A streamed chat on providers `make` builds: its deltas, its error, how long it took
    and the breaker's failure rate after it."""
    p = make()
    started = time.monotonic()
    deltas, error = await collect(chat(p, deadline=deadline))
    elapsed = time.monotonic() - started
    rate = p.breaker("groq").failure_rate
    await p.out.aclose()
    return deltas, error, elapsed, rate


def speech(p: Providers, text: str = SPOKEN, deadline: float = 5.0) -> AsyncIterator[bytes]:
    return p.elevenlabs.speak_stream(text, voice_id=VOICE, model=SPEECH_MODEL, output_format=FORMAT, deadline=deadline)


def fault(http: httpx.Client, **fields: Any) -> None:
    assert http.post("/_sim/faults", json=fields).status_code == 201


def received(http: httpx.Client, route: str) -> int:
    return int(http.get("/_sim/calls").json()[route]["received"])


# -- an upstream that breaks its streams on purpose ---------------------------------------------------------


def event(data: dict[str, Any] | str) -> bytes:
    return b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"


def delta(content: str) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
FINAL = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "x_groq": {"id": "req_x", "usage": USAGE}}
ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}

# Each path's body, piece by piece. "whole" is a good stream cut at awkward places: an event
# split across pieces, CRLF line ends, a comment (a keep-alive), whitespace at both ends.
WHOLE = [
    event(ROLE) + event(delta("  "))[:20],
    event(delta("  "))[20:] + event(delta("Hello")).replace(b"\n", b"\r\n"),
    b": keep-alive\n\n" + event(delta(" there ")),
    event(delta("\n")) + event(FINAL),
    event("[DONE]"),
]
PIECES: dict[str, list[bytes]] = {
    "whole": WHOLE,
    "burst": WHOLE,
    "top-level-usage": [
        event(delta("Hi")),
        event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        event({"choices": [], "usage": USAGE}),
        event("[DONE]"),
    ],
    # Groq asked for `stream_options.include_usage`, as clients report it: both, the same.
    "both-usages": [event(delta("Hi")), event(FINAL), event({"choices": [], "usage": USAGE}), event("[DONE]")],
    "stall": [event(ROLE), event(delta("Hello"))],
    "late-stall": [event(ROLE), event(delta("Hello"))],
    "no-done": [event(delta("Hello")), event(FINAL)],
    "error-event": [event(delta("Hello")), event({"error": {"message": "secret upstream detail", "type": "x"}})],
    "not-audio": [b"this is no audio"],
    "no-audio": [],
}
# Events that are no chat.completion.chunk, each after a good one.
MALFORMED = {
    "json": "{not json",
    "not-an-object": "42",
    "no-choices": '{"id": "x"}',
    "no-delta": '{"choices": [{"index": 0}]}',
    "content-not-text": '{"choices": [{"delta": {"content": 7}}]}',
}
PIECES |= {f"malformed-{name}": [event(delta("Hello")), event(data)] for name, data in MALFORMED.items()}
PIECES["oversized"] = [event(delta("Hello")), b"data: " + b"x" * (1 << 20)]  # an event that never ends
CONTENT_TYPES = {"not-audio": b"text/plain", "no-audio": b"audio/mpeg"}
PAUSES = {"late-stall": 0.5, "burst": 0.0}  # between pieces; 0.01 s elsewhere


class Misbehaving:
    """The first segment of the path picks the body (`PIECES`); the stalls then send nothing
    until the client goes away. `clients` records each request's client address."""

    def __init__(self) -> None:
        self.clients: list[tuple[str, int]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        self.clients.append(tuple(scope["client"]))
        how = scope["path"].split("/")[1]
        content_type = CONTENT_TYPES.get(how, b"text/event-stream")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        for piece in PIECES[how]:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await asyncio.sleep(PAUSES.get(how, 0.01))  # each piece a read of its own
        if how.endswith("stall"):
            await asyncio.wait_for(receive(), 30)  # the client's disconnect
            return
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def misbehaving() -> Iterator[tuple[ServerThread, Misbehaving]]:
    app = Misbehaving()
    server = serve(app, timeout_keep_alive=30)
    yield server, app
    server.stop()


def on_misbehaving(server: ServerThread, how: str, **options: Any) -> Providers:
    return providers(f"{server.url}/{how}", f"{server.url}/{how}", **options)


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[ServerThread]:
    """The realistic profile, slowed down: 10 tokens a second (the statement's reply takes
    3.2 s), speech synthesised at one second of audio a second."""
    with running_sim(
        profile="realistic",
        realistic_ttft_ms=0,
        realistic_tokens_per_second=10,
        realistic_ttfb_ms=0,
        realistic_synthesis_speed=1.0,
    ) as server:
        yield server


# -- Groq ---------------------------------------------------------------------------------------------------


def test_deltas_join_to_the_whole_reply_and_the_usage_is_counted(sim_server: ServerThread, http: httpx.Client) -> None:
    async def scenario() -> tuple[str, tuple[float, float], list[str], tuple[float, float]]:
        p = on_sim(sim_server)
        whole = await p.groq.chat(MODEL, STATEMENT, deadline=5)
        after_whole = p.tokens("input"), p.tokens("output")
        deltas, error = await collect(chat(p))
        assert error is None
        await p.out.aclose()
        return whole, after_whole, deltas, (p.tokens("input"), p.tokens("output"))

    whole, after_whole, deltas, after_both = asyncio.run(scenario())
    assert len(deltas) > 10  # token by token, not the reply in one piece
    assert "".join(deltas) == whole
    assert after_whole[0] > 0
    assert after_whole[1] == 32
    assert after_both == (2 * after_whole[0], 2 * after_whole[1])  # the stream's usage, counted once


def test_events_are_read_across_pieces_and_whitespace_is_trimmed_as_chat_does(
    misbehaving: tuple[ServerThread, Misbehaving],
) -> None:
    async def scenario() -> tuple[list[str], float, float]:
        p = on_misbehaving(misbehaving[0], "whole")
        deltas, error = await collect(chat(p))
        assert error is None
        await p.out.aclose()
        return deltas, p.tokens("input"), p.tokens("output")

    deltas, prompt, completion = asyncio.run(scenario())
    assert deltas == ["Hello", " there"]  # the leading blanks dropped, the trailing ones never given
    assert (prompt, completion) == (7, 3)


@pytest.mark.parametrize("how", ["top-level-usage", "both-usages"])
def test_a_usage_outside_x_groq_is_counted_too_and_only_once(
    misbehaving: tuple[ServerThread, Misbehaving], how: str
) -> None:
    async def scenario() -> tuple[list[str], float, float]:
        p = on_misbehaving(misbehaving[0], how)
        deltas, error = await collect(chat(p))
        assert error is None
        await p.out.aclose()
        return deltas, p.tokens("input"), p.tokens("output")

    assert asyncio.run(scenario()) == (["Hi"], 7, 3)


def test_a_finished_stream_leaves_its_connection_for_the_next_call(
    misbehaving: tuple[ServerThread, Misbehaving],
) -> None:
    server, app = misbehaving
    seen_before = len(app.clients)

    async def scenario() -> None:
        p = on_misbehaving(server, "whole")
        for _ in range(2):
            assert (await collect(chat(p)))[1] is None
        await p.out.aclose()

    asyncio.run(scenario())
    first, second = app.clients[seen_before:]
    assert first == second  # the same client port: the body was read to its end after [DONE]


@pytest.mark.parametrize(
    ("refusal", "expected"),
    [
        ({"route": "chat", "status": 503}, ProviderUnavailable("groq", "status 503")),
        ({"route": "chat", "status": 498}, ProviderUnavailable("groq", "status 498")),
        ({"route": "chat", "status": 429}, ProviderUnavailable("groq", "status 429", 1.0)),
        ({"key": "gsk_wrong"}, ProviderRejected("groq", "status 401")),
        ({"model": "no-such-model"}, ProviderRejected("groq", "status 404")),
    ],
    ids=["503", "498", "429", "bad-key", "unknown-model"],
)
def test_refusals_before_the_stream_map_as_exchange_maps_them(
    sim_server: ServerThread, http: httpx.Client, refusal: dict[str, Any], expected: ProviderError
) -> None:
    if "route" in refusal:
        fault(http, **refusal, times=1)

    async def scenario() -> tuple[list[str], ProviderError | None]:
        p = on_sim(sim_server, groq_key=refusal.get("key", GROQ_KEY))
        result = await collect(p.groq.chat_stream(refusal.get("model", MODEL), STATEMENT, deadline=5))
        await p.out.aclose()
        return result

    deltas, error = asyncio.run(scenario())
    assert deltas == []
    assert type(error) is type(expected)
    assert error is not None
    assert (error.provider, error.reason, error.retry_after) == ("groq", expected.reason, expected.retry_after)


def test_a_stream_cut_short_is_unavailable_after_its_deltas_and_one_breaker_failure(
    sim_server: ServerThread, http: httpx.Client
) -> None:
    fault(http, route="chat", status=200, times=1, abort_after_bytes=CUT_AFTER)

    async def scenario() -> tuple[list[str], ProviderError | None, float, float]:
        p = on_sim(sim_server)
        deltas, error = await collect(chat(p))
        rate = p.breaker("groq").failure_rate
        await p.out.aclose()
        return deltas, error, rate, p.tokens("output")

    deltas, error, rate, tokens = asyncio.run(scenario())
    assert 0 < len(deltas) < 32
    assert isinstance(error, ProviderUnavailable)
    assert error.reason in BROKEN_OFF
    assert rate == 0.5  # the head's success, the broken body's failure
    assert tokens == 0  # the usage never came


def test_the_breaker_opens_after_failed_streams_each_counted_once(sim_server: ServerThread, http: httpx.Client) -> None:
    # Each failed stream is two outcomes in the window: its head's success and its body's
    # failure. With 6 calls needed at 50 %, the third failed stream trips it; were a stream's
    # failure counted twice the second would, were it not counted it never would.
    fault(http, route="chat", status=200, abort_after_bytes=CUT_AFTER)

    async def scenario() -> tuple[list[tuple[str | None, str, float]], ProviderError | None]:
        p = on_sim(sim_server, groq_policy=policy(minimum_calls=6, window_size=8, open_seconds=30))
        breaker = p.breaker("groq")
        after_each: list[tuple[str | None, str, float]] = []
        for _ in range(3):
            _, error = await collect(chat(p))
            after_each.append((error.reason if error else None, breaker.state, breaker.failure_rate))
        deltas, refused = await collect(chat(p))
        assert deltas == []
        await p.out.aclose()
        return after_each, refused

    after_each, refused = asyncio.run(scenario())
    assert [state for _, state, _ in after_each] == ["closed", "closed", "open"]
    assert [rate for _, _, rate in after_each[:2]] == [0.5, 0.5]
    assert all(reason in BROKEN_OFF for reason, _, _ in after_each)
    assert isinstance(refused, ProviderUnavailable)
    assert refused.reason == "BreakerOpen"
    assert refused.retry_after is not None
    assert refused.retry_after > 25
    assert received(http, "chat") == 3  # the fourth never left


def test_a_stalled_stream_times_out_as_a_breaker_failure(misbehaving: tuple[ServerThread, Misbehaving]) -> None:
    deltas, error, elapsed, rate = asyncio.run(
        timed_chat(
            lambda: on_misbehaving(misbehaving[0], "stall", groq_policy=policy(attempt_timeout=0.5)), deadline=5.0
        )
    )
    assert deltas == ["Hello"]
    assert isinstance(error, ProviderUnavailable)
    assert error.reason == "timed out"
    assert 0.5 <= elapsed < 0.5 + SLACK  # the read timeout, not the 5 s deadline
    assert rate == 0.5  # the head's success, the silence's failure


@pytest.mark.parametrize(
    ("how", "reason", "tokens"),
    [
        *((f"malformed-{name}", "malformed stream event", 0) for name in MALFORMED),
        ("oversized", "malformed stream event", 0),
        ("no-done", "stream ended before [DONE]", 3),
        ("error-event", "error event in stream", 0),
    ],
)
def test_a_stream_that_is_not_a_whole_chat_stream_is_unavailable(
    misbehaving: tuple[ServerThread, Misbehaving], how: str, reason: str, tokens: int
) -> None:
    async def scenario() -> tuple[list[str], ProviderError | None, float, str]:
        p = on_misbehaving(misbehaving[0], how)
        deltas, error = await collect(chat(p))
        state = p.breaker("groq").state
        await p.out.aclose()
        return deltas, error, p.tokens("output"), state

    deltas, error, counted, state = asyncio.run(scenario())
    assert deltas == ["Hello"]
    assert isinstance(error, ProviderUnavailable)
    assert error.reason == reason  # the provider's own words stay out of it
    assert counted == tokens  # what a usage that did come reported
    assert state == "closed"


def test_a_consumer_that_stops_early_frees_the_call_without_a_failure(slow_sim: ServerThread) -> None:
    # One call at a time and no wait for a slot: the next stream gets one only if closing
    # the first gave it back.
    async def scenario() -> tuple[str, float, str, float]:
        p = on_sim(slow_sim, groq_policy=policy(max_concurrency=1, bulkhead_wait=0))
        started = time.monotonic()
        async with aclosing(p.groq.chat_stream(MODEL, STATEMENT, deadline=10)) as stream:
            first = await anext(stream)
        stopped_after = time.monotonic() - started
        async with aclosing(p.groq.chat_stream(MODEL, HELLO, deadline=10)) as stream:
            second = await anext(stream)
        rate = p.breaker("groq").failure_rate
        await p.out.aclose()
        return first, stopped_after, second, rate

    first, stopped_after, second, rate = asyncio.run(scenario())
    assert (first, second) == ("You", "Hell")
    assert stopped_after < 1.0  # not the 3.2 s of the whole reply
    assert rate == 0.0


def test_the_deadline_ends_a_slow_stream(slow_sim: ServerThread) -> None:
    deltas, error, elapsed, rate = asyncio.run(timed_chat(lambda: on_sim(slow_sim), deadline=1.0))
    assert 3 < len(deltas) < 32  # a tenth of a second each, for a second
    assert isinstance(error, ProviderUnavailable)
    assert error.reason == "timed out"
    assert 1.0 <= elapsed < 1.0 + SLACK
    assert rate == 0.0  # cut short by the caller's deadline, as the transport counts it: not a failure


def test_the_deadline_ends_a_stall_before_the_read_timeout_and_counts_no_failure(
    misbehaving: tuple[ServerThread, Misbehaving],
) -> None:
    # The silence starts half a second in: the transport's read timeout (what was left of
    # the deadline when the attempt started, 1 s) would end it at 1.5 s, as a failure.
    deltas, error, elapsed, rate = asyncio.run(
        timed_chat(
            lambda: on_misbehaving(misbehaving[0], "late-stall", groq_policy=policy(attempt_timeout=2.0)), deadline=1.0
        )
    )
    assert deltas == ["Hello"]
    assert isinstance(error, ProviderUnavailable)
    assert error.reason == "timed out"
    assert 1.0 <= elapsed < 1.0 + SLACK
    assert rate == 0.0


def test_no_read_starts_past_the_deadline(misbehaving: tuple[ServerThread, Misbehaving]) -> None:
    # A consumer slower than the deadline: the rest of the stream came at once (in the
    # same read, most likely) and would be taken without waiting; the call is over all the same.
    async def scenario() -> tuple[list[str], ProviderError | None]:
        p = on_misbehaving(misbehaving[0], "burst")
        given: list[str] = []
        error: ProviderError | None = None
        try:
            async for text in chat(p, deadline=0.3):
                given.append(text)
                await asyncio.sleep(0.5)
        except ProviderError as raised:
            error = raised
        await p.out.aclose()
        return given, error

    given, error = asyncio.run(scenario())
    assert given == ["Hello"]
    assert isinstance(error, ProviderUnavailable)
    assert error.reason == "timed out"


# -- ElevenLabs ---------------------------------------------------------------------------------------------


def test_speech_pieces_join_to_the_whole_audio_and_characters_count_once(
    sim_server: ServerThread, http: httpx.Client
) -> None:
    async def scenario() -> tuple[bytes, str, list[bytes], float]:
        p = on_sim(sim_server)
        audio, content_type = await p.elevenlabs.speak(
            SPOKEN, voice_id=VOICE, model=SPEECH_MODEL, output_format=FORMAT, deadline=5
        )
        pieces, error = await collect(speech(p))
        assert error is None
        await p.out.aclose()
        return audio, content_type, pieces, p.characters()

    audio, content_type, pieces, characters = asyncio.run(scenario())
    assert content_type == "audio/mpeg"
    assert len(audio) > 10_000
    assert b"".join(pieces) == audio
    assert characters == 2 * len(SPOKEN)


def test_speech_streams_as_it_is_synthesised_and_the_deadline_ends_it(slow_sim: ServerThread) -> None:
    async def scenario() -> tuple[list[tuple[float, bytes]], ProviderError | None, float]:
        p = on_sim(slow_sim)
        started = time.monotonic()
        timed: list[tuple[float, bytes]] = []
        error: ProviderError | None = None
        try:
            async for piece in speech(p, deadline=1.0):
                timed.append((time.monotonic() - started, piece))
        except ProviderError as raised:
            error = raised
        elapsed = time.monotonic() - started
        await p.out.aclose()
        return timed, error, elapsed

    timed, error, elapsed = asyncio.run(scenario())
    assert len(timed) > 1
    assert timed[-1][0] - timed[0][0] > 0.3  # spread in time, not the audio at once
    assert isinstance(error, ProviderUnavailable)
    assert error.reason == "timed out"
    assert 1.0 <= elapsed < 1.0 + SLACK


@pytest.mark.parametrize(
    ("refusal", "voice", "expected"),
    [
        ({"route": "speech", "status": 503}, VOICE, ProviderUnavailable("elevenlabs", "status 503")),
        ({"route": "speech", "status": 429}, VOICE, ProviderUnavailable("elevenlabs", "status 429")),
        ({}, "not-a-voice", ProviderRejected("elevenlabs", "status 404")),
    ],
    ids=["503", "429", "unknown-voice"],
)
def test_speech_refusals_before_the_stream_map_as_exchange_maps_them(
    sim_server: ServerThread, http: httpx.Client, refusal: dict[str, Any], voice: str, expected: ProviderError
) -> None:
    if refusal:
        fault(http, **refusal, times=1)

    async def scenario() -> tuple[list[bytes], ProviderError | None, float]:
        p = on_sim(sim_server)
        result = await collect(
            p.elevenlabs.speak_stream(SPOKEN, voice_id=voice, model=SPEECH_MODEL, output_format=FORMAT, deadline=5)
        )
        await p.out.aclose()
        return (*result, p.characters())

    pieces, error, characters = asyncio.run(scenario())
    assert pieces == []
    assert type(error) is type(expected)
    assert error is not None
    assert (error.reason, error.retry_after) == (expected.reason, None)
    assert characters == 0


def test_speech_text_is_checked_before_anything_is_sent(sim_server: ServerThread, http: httpx.Client) -> None:
    async def scenario() -> ProviderError | None:
        p = on_sim(sim_server)
        _, error = await collect(speech(p, text="x" * 5001))
        await p.out.aclose()
        return error

    error = asyncio.run(scenario())
    assert isinstance(error, ProviderRejected)
    assert error.reason == "text must be 1 to 5000 characters"
    assert received(http, "speech") == 0


def test_speech_cut_short_is_unavailable_and_was_billed(sim_server: ServerThread, http: httpx.Client) -> None:
    fault(http, route="speech", status=200, times=1, abort_after_bytes=20_000)

    async def scenario() -> tuple[list[bytes], ProviderError | None, float, float]:
        p = on_sim(sim_server)
        pieces, error = await collect(speech(p))
        rate = p.breaker("elevenlabs").failure_rate
        await p.out.aclose()
        return pieces, error, p.characters(), rate

    pieces, error, characters, rate = asyncio.run(scenario())
    assert 0 < sum(map(len, pieces)) <= 20_000
    assert isinstance(error, ProviderUnavailable)
    assert error.reason in BROKEN_OFF
    assert characters == len(SPOKEN)  # billed on request
    assert rate == 0.5


@pytest.mark.parametrize(("how", "characters"), [("not-audio", 0), ("no-audio", len(SPOKEN))])
def test_speech_that_is_not_audio_is_rejected(
    misbehaving: tuple[ServerThread, Misbehaving], how: str, characters: int
) -> None:
    async def scenario() -> tuple[list[bytes], ProviderError | None, float]:
        p = on_misbehaving(misbehaving[0], how)
        pieces, error = await collect(speech(p))
        await p.out.aclose()
        return pieces, error, p.characters()

    pieces, error, counted = asyncio.run(scenario())
    assert pieces == []
    assert isinstance(error, ProviderRejected)
    assert error.reason == "answer is not audio"
    assert counted == characters  # a head that says audio was billed
