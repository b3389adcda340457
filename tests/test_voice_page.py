"""The voice page in Debian's Chromium, through the edge of a stack started like `make run`,
with a fake microphone playing speech made by espeak-ng (docs/page.md#tests).

Each test has a fresh browser context (its own localStorage and permissions); the stack
and the browsers are shared. The simulator's fault API makes providers fail on purpose."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from tests.browser import assert_accessible, launch, needs_chromium, opened_page
from tests.processes import PROJECT_ROOT
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
    return page.get_by_role("log").locator(".message.companion")


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


def test_a_refused_play_offers_play_reply_which_then_plays(page: Page) -> None:
    # Typed, submitted and watched through the DevTools protocol without a user gesture
    # (Playwright's own evaluations, expectations included, count as one), so the browser
    # refuses to play the reply.
    cdp = page.context.new_cdp_session(page)

    def without_gesture(expression: str) -> object:
        answer = cdp.send("Runtime.evaluate", {"expression": expression, "userGesture": False, "returnByValue": True})
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
        pytest.fail("no Play reply button")
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
