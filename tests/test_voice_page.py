"""The voice page in Debian's Chromium, through the edge of a stack started like `make run`,
with a fake microphone playing speech made by espeak-ng (docs/page.md#tests).

Each test has a fresh browser context (its own localStorage and permissions); the stack
and the browsers are shared. The simulator's fault API makes providers fail on purpose.

Streamed turns (server-sent events) are played against `StreamingApp`, a small server of
the protocol with the page's own files and routes, which paces its events and holds `done`
until the test lets it go; the browser's Web Audio is observed by an init script that
records every AudioBufferSourceNode's start and stop."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.page import routes as page_routes
from app.page.assets import build_page
from edge.concerns.security_headers import html_content_security_policy
from sim.mp3 import silent_mp3
from tests.browser import assert_accessible, launch, needs_chromium, opened_page
from tests.processes import PROJECT_ROOT
from tests.servers import ServerThread, serve
from tests.test_run_stack import Stack, started_stack

TURN_TIMEOUT_MS = 30000
TURN_LIMIT = 'rate_limit = "10/minute;200/day"'
SPOKEN = "Hello there. I love hiking in the mountains, and my sister lives in Paris."
pytestmark = [
    needs_chromium,
    pytest.mark.skipif(
        shutil.which("espeak-ng") is None, reason="needs espeak-ng (make test-tools installs it as root)"
    ),
]


@dataclass
class Browsers:
    with_microphone: Browser  # a fake microphone playing `speech`, permission prompts accepted
    asking: Browser  # the same microphone, prompts left to the context's permissions (none: denied)
    without_microphone: Browser  # no capture device at all
    speech: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`make run`'s stack, but for the voice-turn limit (10 a minute), which a module of
    turns would reach: the 429 test has a stack of its own with the limit as shipped."""
    directory = tmp_path_factory.mktemp("page-stack")
    policy = directory / "edge-policy.toml"
    shipped = (PROJECT_ROOT / "config" / "edge-policy.toml").read_text()
    assert TURN_LIMIT in shipped
    policy.write_text(shipped.replace(TURN_LIMIT, 'rate_limit = "1000/minute"'))
    with started_stack(directory, EDGE_POLICY_FILE=str(policy)) as running:
        yield running


@pytest.fixture(scope="module")
def browsers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browsers]:
    speech = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), SPOKEN], check=True, timeout=30)
    with sync_playwright() as playwright:
        yield Browsers(
            with_microphone=launch(
                playwright,
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={speech}%noloop",
            ),
            asking=launch(
                playwright,
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={speech}%noloop",
            ),
            without_microphone=launch(playwright),
            speech=speech,
        )


@pytest.fixture
def sim(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.sim_url, timeout=5) as client:
        client.post("/_sim/reset").raise_for_status()
        yield client
        client.post("/_sim/reset").raise_for_status()


@pytest.fixture
def page(stack: Stack, browsers: Browsers, sim: httpx.Client) -> Iterator[Page]:
    with opened_page(browsers.with_microphone, stack.edge_url) as opened:
        yield opened


def talk_button(page: Page) -> Locator:
    return page.locator("#talk-button")


def companion_messages(page: Page) -> Locator:
    """The companion's replies, a streamed one once it is whole (its `done`)."""
    return page.get_by_role("log").locator(".message.companion:not(.streaming)")


def streaming_reply(page: Page) -> Locator:
    return page.get_by_role("log").locator(".message.companion.streaming")


def user_messages(page: Page) -> Locator:
    return page.get_by_role("log").locator(".message.user")


def wait_for_replies(page: Page, count: int) -> None:
    expect(companion_messages(page)).to_have_count(count, timeout=TURN_TIMEOUT_MS)


def expect_reply_played(page: Page) -> None:
    expect(page.locator("body")).to_have_attribute("data-state", "speaking", timeout=10000)


def send_text(page: Page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()


def session_id(page: Page) -> str | None:
    value: str | None = page.evaluate("() => localStorage.getItem('voice-companion.session')")
    return value


# -- talking -----------------------------------------------------------------------------------


def test_a_voice_turn_by_holding_space_shows_transcript_and_reply_and_plays_it(page: Page) -> None:
    expect(page.get_by_role("status")).to_have_text("Ready")
    assert_accessible(page)
    page.locator("main").click(position={"x": 2, "y": 2})  # a gesture, and the focus off any control
    page.keyboard.down("Space")
    expect(page.locator("body")).to_have_attribute("data-state", "recording")
    levels = []
    for _ in range(12):  # the level meter follows the voice
        page.wait_for_timeout(150)
        levels.append(page.locator("#meter-level").evaluate("element => parseFloat(element.style.width) || 0"))
    expect(page.locator("#countdown")).to_have_text(re.compile(r"^\d+:\d\d left$"))
    # Key repeat while the bar is held does not start another recording.
    page.keyboard.down("Space")
    page.keyboard.up("Space")
    wait_for_replies(page, 1)
    expect(user_messages(page)).to_have_count(1)
    # The transcript replaces the placeholder the recording was shown with.
    expect(user_messages(page).first.locator(".text")).not_to_have_text("Voice message")
    expect(user_messages(page).first.locator(".text")).not_to_be_empty()
    expect(companion_messages(page).first.locator(".text")).not_to_be_empty()
    expect_reply_played(page)
    assert max(levels) > 0, levels
    assert_accessible(page)


def test_a_voice_turn_with_the_button_held_and_one_in_toggle_mode(page: Page) -> None:
    button = page.get_by_role("button", name=re.compile(r"^Hold to talk"))
    button.hover()
    page.mouse.down()
    expect(page.get_by_role("button", name="Release to send")).to_be_visible()
    page.wait_for_timeout(1500)
    page.mouse.up()
    wait_for_replies(page, 1)
    expect_reply_played(page)

    page.get_by_label(re.compile("Toggle mode")).check()
    toggle = page.get_by_role("button", name="Press to talk")
    toggle.click()
    expect(page.get_by_role("button", name="Press to send")).to_be_visible()
    page.wait_for_timeout(1200)
    page.get_by_role("button", name="Press to send").click()
    wait_for_replies(page, 2)
    expect(user_messages(page)).to_have_count(2)


def test_a_recording_under_300_ms_is_dropped_with_a_hint(page: Page, sim: httpx.Client) -> None:
    page.locator("main").click(position={"x": 2, "y": 2})
    page.keyboard.down("Space")
    expect(page.locator("body")).to_have_attribute("data-state", "recording")
    page.keyboard.up("Space")
    expect(page.get_by_role("status")).to_contain_text("Too short")
    assert sim.get("/_sim/calls").json().get("transcribe", {}).get("received", 0) == 0


# -- typing, sessions ------------------------------------------------------------------------


def test_a_text_turn_survives_a_reload_and_delete_removes_it_on_the_server(page: Page, stack: Stack) -> None:
    send_text(page, "I love hiking in the mountains.")
    wait_for_replies(page, 1)
    identifier = session_id(page)
    assert identifier
    page.reload()
    expect(page.get_by_role("status")).to_have_text("Conversation restored")
    expect(user_messages(page)).to_have_text(["YouI love hiking in the mountains."])
    wait_for_replies(page, 1)

    page.get_by_role("button", name="Delete conversation").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    assert_accessible(page)
    dialog.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("status")).to_have_text("Conversation deleted")
    expect(companion_messages(page)).to_have_count(0)
    assert session_id(page) is None
    assert httpx.get(f"{stack.edge_url}/api/v1/sessions/{identifier}", timeout=5).status_code == 404


def test_a_session_gone_on_the_server_quietly_starts_a_new_one(page: Page, stack: Stack) -> None:
    send_text(page, "Hello")
    wait_for_replies(page, 1)
    identifier = session_id(page)
    httpx.delete(f"{stack.edge_url}/api/v1/sessions/{identifier}", timeout=5).raise_for_status()
    page.reload()
    expect(page.get_by_role("status")).to_have_text("Ready")
    expect(companion_messages(page)).to_have_count(0)
    expect(page.get_by_role("alert")).to_be_hidden()
    send_text(page, "Hello again")
    wait_for_replies(page, 1)
    assert session_id(page) not in (None, identifier)


def test_keyboard_alone_from_load_to_reply(page: Page) -> None:
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "message":
            break
    else:
        pytest.fail("Tab never reached the message box")
    page.keyboard.type("Hello from the keyboard")
    page.keyboard.press("Enter")
    wait_for_replies(page, 1)
    # On to the talk button: Enter starts a recording and Enter again sends it.
    page.locator("#talk-button").focus()
    page.keyboard.press("Enter")
    expect(page.locator("body")).to_have_attribute("data-state", "recording")
    page.wait_for_timeout(1000)
    page.keyboard.press("Enter")
    wait_for_replies(page, 2)


# -- failures ----------------------------------------------------------------------------------


def test_offline_banner_disables_talking_and_sending_and_recovery_brings_them_back(page: Page) -> None:
    page.context.set_offline(True)
    banner = page.locator("#offline-banner")
    expect(banner).to_be_visible()
    expect(page.get_by_role("status")).to_have_text("Offline")
    expect(talk_button(page)).to_be_disabled()
    expect(page.get_by_role("button", name="Send")).to_be_disabled()
    assert_accessible(page)
    page.context.set_offline(False)
    expect(banner).to_be_hidden(timeout=10000)
    expect(talk_button(page)).to_be_enabled()
    send_text(page, "Back again")
    wait_for_replies(page, 1)


def test_a_speech_outage_gives_a_text_reply_with_play_reply(page: Page, sim: httpx.Client) -> None:
    sim.post("/_sim/faults", json={"route": "speech", "status": 500, "times": -1}).raise_for_status()
    send_text(page, "Tell me something")
    wait_for_replies(page, 1)
    reply = companion_messages(page).first
    expect(reply).to_contain_text("Spoken reply unavailable")
    expect(reply.get_by_role("button", name="Play reply")).to_be_visible()
    expect(page.get_by_role("status")).to_have_text("Reply shown as text")


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "json"])
def test_a_refused_play_offers_play_reply_which_then_plays(
    stack: Stack, browsers: Browsers, sim: httpx.Client, streamed: bool
) -> None:
    # Typed, submitted and watched through the DevTools protocol without a user gesture
    # (Playwright's own evaluations, expectations included, count as one), so the browser
    # refuses to play the reply: the audio element's play() (the JSON turn, without
    # ReadableStream) or the AudioContext (a streamed turn; this headless Chromium lets one run
    # without a gesture, people's browsers do not: GESTURE_POLICY does as they do).
    with probed_page(browsers.with_microphone, stack.edge_url, GESTURE_POLICY if streamed else WITHOUT_STREAMS) as page:
        cdp = page.context.new_cdp_session(page)

        def without_gesture(expression: str) -> object:
            answer = cdp.send(
                "Runtime.evaluate", {"expression": expression, "userGesture": False, "returnByValue": True}
            )
            return answer["result"].get("value")

        assert without_gesture("navigator.userActivation.hasBeenActive") is False
        without_gesture(
            'document.getElementById("message").value = "Hello without a gesture";'
            'document.getElementById("message-form").requestSubmit()'
        )
        for _ in range(100):
            if without_gesture("document.querySelectorAll('.message.companion .play.needed').length") == 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no Play reply button: {without_gesture('document.body.innerText')}")
        play = companion_messages(page).first.get_by_role("button", name="Play reply")
        expect(page.get_by_role("status")).to_have_text("Select Play reply to hear the answer")
        play.click()
        expect_reply_played(page)
        expect(companion_messages(page).first.get_by_role("button", name="Replay")).to_be_visible()


def test_reply_unavailable_keeps_the_words_counts_down_and_try_again_answers_once(
    page: Page, sim: httpx.Client, stack: Stack
) -> None:
    sim.post("/_sim/faults", json={"route": "chat", "status": 400, "times": 1}).raise_for_status()
    send_text(page, "Are you there?")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("A reply can't be given right now", timeout=TURN_TIMEOUT_MS)
    expect(alert).to_contain_text(re.compile(r"Your words were kept\. Try again in \d+ s\."))
    expect(user_messages(page).first).to_contain_text("Kept; no reply yet")
    assert_accessible(page)
    retry = alert.get_by_role("button", name="Try again")
    expect(retry).to_be_enabled(timeout=TURN_TIMEOUT_MS)
    retry.click()
    wait_for_replies(page, 1)
    identifier = session_id(page)
    messages = httpx.get(f"{stack.edge_url}/api/v1/sessions/{identifier}", timeout=5).json()["messages"]
    assert [message["role"] for message in messages] == ["user", "assistant"]


def test_too_many_turns_count_down_from_retry_after(browsers: Browsers, tmp_path: Path) -> None:
    with started_stack(tmp_path) as shipped, opened_page(browsers.with_microphone, shipped.edge_url) as page:
        send_text(page, "Hello")  # the page's session, and one turn of the ten
        wait_for_replies(page, 1)
        identifier = session_id(page)
        for _ in range(9):
            httpx.post(f"{shipped.edge_url}/api/v1/sessions/{identifier}/turns", json={"text": "hi"}, timeout=30)
        send_text(page, "One more")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("Too many messages for now")
        expect(alert).to_contain_text(re.compile(r"You can send again in \d+ s\."))
        expect(page.get_by_role("button", name="Send")).to_be_disabled()
        expect(talk_button(page)).to_be_disabled()
        first = int(re.findall(r"in (\d+) s", alert.inner_text())[0])
        page.wait_for_timeout(2100)
        assert int(re.findall(r"in (\d+) s", alert.inner_text())[0]) < first
        expect(user_messages(page).last).to_contain_text("Not sent")


def test_microphone_denied_says_how_to_allow_it(stack: Stack, browsers: Browsers) -> None:
    with opened_page(browsers.asking, stack.edge_url, permissions=[]) as page:
        talk_button(page).click()
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("Microphone access is blocked")
        expect(alert).to_contain_text("set Microphone to Allow")
        assert_accessible(page)
        alert.get_by_role("button", name="Dismiss").click()
        expect(alert).to_be_hidden()


def test_no_microphone_says_to_connect_one(stack: Stack, browsers: Browsers) -> None:
    with opened_page(browsers.without_microphone, stack.edge_url) as page:
        talk_button(page).click()
        expect(page.get_by_role("alert")).to_contain_text("No microphone was found")


# -- delivery -------------------------------------------------------------------------------


def test_the_page_and_its_assets_are_cached_as_they_should_be(stack: Stack) -> None:
    page = httpx.get(stack.edge_url + "/", timeout=5)
    assert page.headers["cache-control"] == "no-cache"
    assert "'unsafe-inline'" not in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(/assets/[^"]+)"', page.text)
    assert len(assets) >= 3
    for path in assets:
        response = httpx.get(stack.edge_url + path, timeout=5)
        assert response.status_code == 200, path
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable", path
    for inline in ("<script>", "<style", " style="):
        assert inline not in page.text
    revalidated = httpx.get(stack.edge_url + "/", headers={"if-none-match": page.headers["etag"]}, timeout=5)
    assert revalidated.status_code == 304
    assert "content-security-policy" not in revalidated.headers


def test_the_first_load_weighs_at_most_100_kb_compressed(stack: Stack) -> None:
    """The HTML and every asset it names, and those name, as they come over the wire
    (gzip); the figure is in docs/page.md#weight."""
    wanted, seen, total = ["/"], set(), 0
    with httpx.Client(base_url=stack.edge_url, headers={"accept-encoding": "gzip"}, timeout=5) as client:
        while wanted:
            path = wanted.pop()
            response = client.get(path)
            assert response.status_code == 200, path
            assert response.headers.get("content-encoding") == "gzip" or path.endswith(".svg"), path
            total += response.num_bytes_downloaded
            for found in re.findall(r"/assets/[A-Za-z0-9_.-]+", response.text):
                if found not in seen:
                    seen.add(found)
                    wanted.append(found)
    assert len(seen) >= 7
    assert total <= 100 * 1024, total


# -- streamed turns ------------------------------------------------------------------------

# What the page needs of the app's settings; the page is built from its own files.
PAGE_VALUES = {"max_audio_seconds": "120", "turn_timeout_s": "30", "max_text_chars": "2000"}
REPLY = ["Here is ", "a reply ", "that streams. ", "It comes in ", "pieces, ", "and speaks as it goes."]
SAMPLE_RATE = 44100
# Distinct lengths tell the chunks apart in the browser; the first is the longest, so that
# the later ones, sent together just after it, finish decoding first.
CHUNK_SECONDS = (1.6, 0.3, 0.7)
BARGE_IN_CHUNK_SECONDS = (3.0, 3.0, 3.0)
# Records every AudioBufferSourceNode's start and stop (the page's CSP does not govern it).
AUDIO_PROBE = """
(() => {
  const log = (window.audioProbe = { starts: [], stops: [] });
  const start = AudioBufferSourceNode.prototype.start;
  AudioBufferSourceNode.prototype.start = function (when = 0, ...rest) {
    this.probeIndex = log.starts.length;
    log.starts.push({ when, duration: this.buffer.duration, now: this.context.currentTime, at: performance.now() });
    return start.call(this, when, ...rest);
  };
  const stop = AudioBufferSourceNode.prototype.stop;
  AudioBufferSourceNode.prototype.stop = function (...rest) {
    log.stops.push({ index: this.probeIndex, at: performance.now() });
    return stop.apply(this, rest);
  };
})();
"""
WITHOUT_STREAMS = "delete window.ReadableStream;"
# Chrome's autoplay policy, which this headless Chromium does not apply to Web Audio: a
# context made before the page's first user activation stays suspended until one.
GESTURE_POLICY = """
(() => {
  const Context = window.AudioContext;
  window.AudioContext = class extends Context {
    constructor(...rest) {
      super(...rest);
      if (navigator.userActivation.hasBeenActive) return;
      this.suspend();
      const resume = this.resume.bind(this);
      this.resume = () => (navigator.userActivation.hasBeenActive ? resume() : new Promise(() => {}));
    }
  };
})();
"""
# The first chunk's decoding finishes last (Chromium decodes one at a time, in order).
FIRST_DECODED_LAST = """
(() => {
  const decode = BaseAudioContext.prototype.decodeAudioData;
  let calls = 0;
  BaseAudioContext.prototype.decodeAudioData = function (data) {
    const decoded = decode.call(this, data);
    if (calls++ > 0) return decoded;
    return decoded.then((buffer) => new Promise((resolve) => setTimeout(() => resolve(buffer), 500)));
  };
})();
"""


def sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def mp3_chunk(seconds: float) -> bytes:
    return silent_mp3(seconds, SAMPLE_RATE, 64)


@dataclass
class StreamingApp:
    """The turn protocol as the app serves it (docs/page.md#streamed-turns), with the page's own
    files and routes and the edge's HTML content security policy. `mode`: "stream", "json" (a
    JSON answer whatever is asked, as an app that does not stream) or "error" (the reply breaks
    off with `reply_unavailable`). `done` is held until `release` is set."""

    mode: str = "stream"
    chunk_seconds: tuple[float, ...] = CHUNK_SECONDS
    accepts: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    done_sent: threading.Event = field(default_factory=threading.Event)
    abandoned: threading.Event = field(default_factory=threading.Event)  # the client went mid-stream

    def reset(self, mode: str = "stream", chunk_seconds: tuple[float, ...] = CHUNK_SECONDS) -> None:
        self.mode, self.chunk_seconds = mode, chunk_seconds
        self.accepts.clear()
        for event in (self.release, self.done_sent, self.abandoned):
            event.clear()

    def chunks(self) -> list[bytes]:
        return [mp3_chunk(seconds) for seconds in self.chunk_seconds]

    def document(self, transcript: str) -> dict[str, Any]:
        return {
            "turn_id": "t1",
            "transcript": transcript,
            "reply": "".join(REPLY),
            "audio_url": "/api/v1/audio/a1",
            "degraded": [],
            "timings_ms": {"total": 1},
        }

    async def events(self, transcript: str) -> AsyncIterator[bytes]:
        finished = False
        try:
            yield sse("transcript", {"text": transcript})
            for delta in REPLY[:3]:
                await asyncio.sleep(0.05)
                yield sse("reply", {"delta": delta})
            if self.mode == "error":
                error = {"code": "reply_unavailable", "message": "No reply.", "request_id": "r1"}
                yield sse("error", {"error": error})
                finished = True
                return
            chunks = [base64.b64encode(chunk).decode() for chunk in self.chunks()]
            yield sse("audio", {"seq": 0, "content_type": "audio/mpeg", "data": chunks[0]})
            # Several events in one write, and one event split across two writes.
            await asyncio.sleep(0.05)
            yield b"".join(
                sse("audio", {"seq": seq, "content_type": "audio/mpeg", "data": data})
                for seq, data in enumerate(chunks[1:], start=1)
            )
            split = sse("reply", {"delta": REPLY[3]})
            yield split[:9]
            await asyncio.sleep(0.15)
            yield split[9:] + b"".join(sse("reply", {"delta": delta}) for delta in REPLY[4:])
            for _ in range(600):  # at most 30 s
                if self.release.is_set():
                    break
                await asyncio.sleep(0.05)
            yield sse("done", self.document(transcript))
            finished = True
            self.done_sent.set()
        finally:
            if not finished:
                self.abandoned.set()

    def asgi(self) -> ASGIApp:
        api = FastAPI()
        api.state.page = build_page(PAGE_VALUES)
        api.state.assets = dict(api.state.page.assets)
        api.include_router(page_routes.router)

        @api.post("/api/v1/sessions", status_code=201)
        async def create_session() -> dict[str, str]:
            return {"session_id": "s1", "created_at": "2026-01-01T00:00:00Z"}

        @api.post("/api/v1/sessions/{session_id}/turns")
        async def take_turn(session_id: str, request: Request) -> Response:
            accept = request.headers.get("accept", "")
            self.accepts.append(accept)
            if request.headers.get("content-type", "").startswith("application/json"):
                transcript = (await request.json())["text"]
            else:
                await request.form()
                transcript = "What the microphone heard"
            if "text/event-stream" not in accept or self.mode == "json":
                return JSONResponse(self.document(transcript))
            return StreamingResponse(
                self.events(transcript), media_type="text/event-stream", headers={"cache-control": "no-store"}
            )

        @api.get("/api/v1/audio/{audio_id}")
        async def audio(audio_id: str) -> Response:
            return Response(b"".join(self.chunks()), media_type="audio/mpeg")

        policy = html_content_security_policy(upgrade_insecure_requests=False).encode()

        async def with_policy(scope: Scope, receive: Receive, send: Send) -> None:
            async def send_with_policy(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"content-security-policy", policy)]
                await send(message)

            await api(scope, receive, send_with_policy)

        return with_policy


@pytest.fixture(scope="module")
def streaming_server() -> Iterator[tuple[ServerThread, StreamingApp]]:
    app = StreamingApp()
    server = serve(app.asgi())
    try:
        yield server, app
    finally:
        server.stop()


@pytest.fixture
def streaming(streaming_server: tuple[ServerThread, StreamingApp]) -> Iterator[tuple[str, StreamingApp]]:
    server, app = streaming_server
    app.reset()
    yield server.url, app
    app.release.set()  # a stream still held ends


@contextlib.contextmanager
def probed_page(browser: Browser, url: str, *scripts: str) -> Iterator[Page]:
    """`opened_page` with the audio probe (and `scripts`) run before the page's own."""
    with opened_page(browser, "about:blank") as page:
        for script in (AUDIO_PROBE, *scripts):
            page.add_init_script(script)
        page.goto(url)
        yield page


def audio_probe(page: Page) -> dict[str, list[dict[str, float]]]:
    found: dict[str, list[dict[str, float]]] = page.evaluate("() => window.audioProbe")
    return found


def wait_for_starts(page: Page, count: int, timeout: float = 15) -> list[dict[str, float]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        starts = audio_probe(page)["starts"]
        if len(starts) >= count:
            return starts
        page.wait_for_timeout(50)
    pytest.fail(f"fewer than {count} chunks started: {audio_probe(page)}")


def test_a_streamed_turn_shows_the_reply_as_it_comes_and_plays_the_chunks_in_order_without_gaps(
    browsers: Browsers, streaming: tuple[str, StreamingApp]
) -> None:
    url, app = streaming
    with probed_page(browsers.with_microphone, url, FIRST_DECODED_LAST) as page:
        send_text(page, "Tell me a story")
        # The reply grows before `done` (which the server still holds).
        streamed = streaming_reply(page)
        expect(streamed.locator(".text")).to_have_text("".join(REPLY), timeout=10000)
        assert not app.done_sent.is_set()
        expect(page.locator("body")).to_have_attribute("data-state", "speaking")
        # While it streams, the log does not announce each piece: the bubble is hidden from
        # assistive technology, and the page stays accessible.
        expect(streamed).to_have_attribute("aria-hidden", "true")
        expect(companion_messages(page)).to_have_count(0)
        assert_accessible(page)
        starts = wait_for_starts(page, 3)
        app.release.set()
        wait_for_replies(page, 1)
        expect(streamed).to_have_count(0)
        reply = companion_messages(page).first
        expect(reply.get_by_role("button", name="Replay")).to_be_visible()
        expect(reply).not_to_have_attribute("aria-hidden", "true")
        expect(reply.locator(".text")).to_have_text("".join(REPLY))
        expect(user_messages(page).first.locator(".text")).to_have_text("Tell me a story")
        assert_accessible(page)
        # The chunks played in seq order (told apart by their lengths), each starting where
        # the one before it ends: no overlap, no gap (all came before the first one ended).
        assert app.accepts == ["text/event-stream"]
        assert len(starts) == len(CHUNK_SECONDS), starts
        for start, seconds in zip(starts, CHUNK_SECONDS, strict=True):
            assert abs(start["duration"] - seconds) < 0.1, starts
        for before, after in itertools.pairwise(starts):
            assert after["when"] >= before["when"] + before["duration"] - 0.001, starts
            assert after["when"] <= before["when"] + before["duration"] + 0.01, starts
        # When the last chunk has ended, the page is ready again.
        expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=10000)
        expect(page.get_by_role("status")).to_have_text("Ready")
        assert audio_probe(page)["stops"] == []


def test_talking_during_a_streamed_reply_stops_every_chunk_at_once_and_abandons_the_stream(
    browsers: Browsers, streaming: tuple[str, StreamingApp]
) -> None:
    url, app = streaming
    app.reset(chunk_seconds=BARGE_IN_CHUNK_SECONDS)
    with probed_page(browsers.with_microphone, url) as page:
        send_text(page, "Talk for a while")
        wait_for_starts(page, 3)  # one playing, two scheduled after it
        expect(page.locator("body")).to_have_attribute("data-state", "speaking")
        expect(talk_button(page)).to_be_enabled()
        page.locator("main").click(position={"x": 2, "y": 2})
        page.keyboard.down("Space")
        barged_in = page.evaluate("() => performance.now()")
        expect(page.locator("body")).to_have_attribute("data-state", "recording")
        assert app.abandoned.wait(5), "the stream was not abandoned"
        page.wait_for_timeout(1000)
        probe = audio_probe(page)
        assert sorted(stop["index"] for stop in probe["stops"]) == [0, 1, 2], probe
        assert all(stop["at"] - barged_in < 200 for stop in probe["stops"]), (barged_in, probe)
        assert len(probe["starts"]) == 3, probe
        page.keyboard.up("Space")
        # What was said of the reply stays, marked, and announced now.
        reply = companion_messages(page).first
        expect(reply).to_contain_text("Interrupted")
        expect(reply).not_to_have_attribute("aria-hidden", "true")
        assert not app.done_sent.is_set()
        # The recording is the next turn; its answer plays as the first did.
        app.release.set()
        wait_for_replies(page, 2)
        assert_accessible(page)


def test_an_error_event_is_told_as_the_json_turn_tells_it(
    browsers: Browsers, streaming: tuple[str, StreamingApp]
) -> None:
    url, app = streaming
    app.reset(mode="error")
    with probed_page(browsers.with_microphone, url) as page:
        send_text(page, "Are you there?")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("A reply can't be given right now")
        expect(alert).to_contain_text(re.compile(r"Your words were kept\. Try again in \d+ s\."))
        expect(user_messages(page).first).to_contain_text("Kept; no reply yet")
        expect(companion_messages(page)).to_have_count(0)
        assert app.accepts == ["text/event-stream"]
        assert_accessible(page)


@pytest.mark.parametrize(
    ("mode", "scripts", "accept"),
    [("json", (), "text/event-stream"), ("stream", (WITHOUT_STREAMS,), "")],
    ids=["the-app-answers-json", "no-readable-streams"],
)
def test_without_a_stream_the_json_turn_plays_the_reply_as_before(
    browsers: Browsers, streaming: tuple[str, StreamingApp], mode: str, scripts: tuple[str, ...], accept: str
) -> None:
    url, app = streaming
    app.reset(mode=mode)
    with probed_page(browsers.with_microphone, url, *scripts) as page:
        send_text(page, "Hello")
        wait_for_replies(page, 1)
        expect(companion_messages(page).first.locator(".text")).to_have_text("".join(REPLY))
        expect_reply_played(page)
        expect(companion_messages(page).first.get_by_role("button", name="Replay")).to_be_visible()
        assert [a if a == "text/event-stream" else "" for a in app.accepts] == [accept]
        assert audio_probe(page)["starts"] == []  # the audio element played it, not Web Audio


# -- streamed turns through the edge, from the real app ------------------------------------

# Each sentence's speech takes this long on the simulator: the reply's text comes first, its
# audio chunks after it one by one, and `done` after the last.
SPEECH_LATENCY_MS = 1500


def test_the_apps_streamed_turn_shows_the_text_before_done_and_plays_its_chunks_back_to_back(
    stack: Stack, browsers: Browsers, sim: httpx.Client
) -> None:
    sim.put("/_sim/latency", json={"speech": SPEECH_LATENCY_MS}).raise_for_status()
    with probed_page(browsers.with_microphone, stack.edge_url) as page:
        send_text(page, "Hello")
        streamed = streaming_reply(page)
        expect(streamed.locator(".text")).not_to_be_empty(timeout=TURN_TIMEOUT_MS)
        expect(companion_messages(page)).to_have_count(0)  # no `done` yet
        wait_for_replies(page, 1)
        reply = companion_messages(page).first
        expect(reply.get_by_role("button", name="Replay")).to_be_visible()
        expect(reply.locator(".text")).to_have_text(re.compile(r"\w[.?!] .*\w[.?!]"))  # two sentences or more
        starts = wait_for_starts(page, 2)
        for before, after in itertools.pairwise(starts):
            assert after["when"] >= before["when"] + before["duration"] - 0.001, starts
        expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=15000)
        assert audio_probe(page)["stops"] == []
        assert_accessible(page)


def test_talking_over_the_apps_streamed_reply_stops_it_and_the_app_still_completes_that_turn(
    stack: Stack, browsers: Browsers, sim: httpx.Client
) -> None:
    sim.put("/_sim/latency", json={"speech": SPEECH_LATENCY_MS}).raise_for_status()
    with probed_page(browsers.with_microphone, stack.edge_url) as page:
        send_text(page, "Hello")
        wait_for_starts(page, 1, timeout=TURN_TIMEOUT_MS / 1000)  # the first sentence speaks
        expect(companion_messages(page)).to_have_count(0)  # the later ones are still to come
        page.locator("main").click(position={"x": 2, "y": 2})
        page.keyboard.down("Space")
        barged_in = page.evaluate("() => performance.now()")
        expect(page.locator("body")).to_have_attribute("data-state", "recording")
        # The later sentences would have come by now had the stream been read.
        page.wait_for_timeout(2 * SPEECH_LATENCY_MS + 500)
        page.keyboard.up("Space")
        probe = audio_probe(page)
        assert len(probe["starts"]) == 1, probe
        assert [stop["index"] for stop in probe["stops"]] == [0], probe
        assert probe["stops"][0]["at"] - barged_in < 200, (barged_in, probe)
        expect(companion_messages(page).first).to_contain_text("Interrupted")
        # The recording is the next turn; the app completed the interrupted one first.
        wait_for_replies(page, 2)
        identifier = session_id(page)
        messages = httpx.get(f"{stack.edge_url}/api/v1/sessions/{identifier}", timeout=5).json()["messages"]
        assert [message["role"] for message in messages] == ["user", "assistant", "user", "assistant"]
        assert messages[1]["audio_url"]
        assert_accessible(page)
