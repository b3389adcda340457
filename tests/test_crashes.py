"""Crashes, on the real thing: `python -m app` on SQLite in a data directory of its own,
memory and speech on (the embedded Qdrant and the reply audio write there too), in front
of the provider simulators, killed with SIGKILL at a random moment while several
sessions take turns at once - text and voice - and started again on the same directory,
round after round.

After every kill the database passes SQLite's integrity check, the app starts again, and
every session reads back through the API made of whole turns only: each of the person's
messages followed by the companion's reply, the turns answered before the kill all there
in order, the turn cut off by the kill either all there or not at all. Every reply's audio
is there. The rounds' moments come from a fixed seed, printed in every failure.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.app_support import (
    API,
    ApiClient,
    MessageBody,
    Simulators,
    app_environment,
    app_process,
    new_port,
    sqlite_integrity,
)
from tests.sim_support import wav_file

SEED = 1303
ROUNDS = 6
SESSIONS = 4
KILL_AFTER_S = (0.05, 0.4)
VOICE_EVERY = 3  # one turn in three is spoken


@pytest.fixture(autouse=True)
def fresh_sims(sims: Simulators) -> None:
    sims.reset()


@dataclass
class Said:
    """A turn as the client sent it: its words, or the recording the words come from."""

    text: str | None = None
    audio: bytes | None = None

    def matches(self, message: MessageBody) -> bool:
        if message["role"] != "user":
            return False
        if self.text is not None:
            return message["text"] == self.text
        assert self.audio is not None
        # The simulator's transcript names the recording by its hash.
        return message["text"].startswith(f"Sim transcript {hashlib.sha256(self.audio).hexdigest()[:8]}: ")


@dataclass
class Conversation:
    """What the client knows of one session: the turns answered, and the one the kill cut off."""

    session_id: str
    answered: list[Said] = field(default_factory=list)
    cut_off: Said | None = None
    failures: list[str] = field(default_factory=list)


def talk(
    url: str,
    conversation: Conversation,
    said: Callable[[int], Said],
    started: threading.Event,
    answered: threading.Event,
) -> None:
    """Takes turns until the app stops answering; the turn under way then is the one cut off."""
    with ApiClient(url, timeout=10) as client:
        started.wait()
        number = 0
        while True:
            turn = said(number)
            number += 1
            try:
                if turn.text is not None:
                    response = client.text_turn(conversation.session_id, turn.text)
                else:
                    assert turn.audio is not None
                    response = client.voice_turn(conversation.session_id, turn.audio, filename="clip.wav")
            except httpx.TransportError:
                conversation.cut_off = turn
                return
            if response.status_code != 200:
                conversation.failures.append(f"{response.status_code} {response.text}")
                return
            conversation.answered.append(turn)
            answered.set()


def check_whole_turns(messages: list[MessageBody], conversation: Conversation) -> None:
    """The session's new messages are whole turns: the ones answered, in order, then the
    cut-off one or nothing."""
    roles = [message["role"] for message in messages]
    assert roles == ["user", "assistant"] * (len(messages) // 2), f"not whole turns: {roles}"
    users = messages[0::2]
    assert len(users) in (len(conversation.answered), len(conversation.answered) + 1), (
        f"{len(users)} turns kept, {len(conversation.answered)} answered"
    )
    for turn, message in zip(conversation.answered, users, strict=False):
        assert turn.matches(message), (turn, message)
    if len(users) > len(conversation.answered):
        assert conversation.cut_off is not None, "a turn kept that was never sent"
        assert conversation.cut_off.matches(users[-1]), (conversation.cut_off, users[-1])


def test_kill_9_during_turns_leaves_whole_turns_and_a_sound_database(sims: Simulators, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "data"
    database = data_dir / "conversations.db"
    history: dict[str, list[MessageBody]] = {}  # each session's messages, as last read back
    conversations: list[Conversation] = []  # what the round before the kill sent
    spoken = 0

    def said(session: int, round_number: int) -> Callable[[int], Said]:
        def next_turn(number: int) -> Said:
            nonlocal spoken
            if number % VOICE_EVERY == VOICE_EVERY - 1:
                spoken += 1
                return Said(audio=wav_file(0.3, seed=spoken))
            # "my ...": a fact about the speaker, for the memory store to write.
            return Said(text=f"Round {round_number}, session {session}, turn {number}: my cat sleeps a lot.")

        return next_turn

    for round_number in range(ROUNDS + 1):
        where = f"seed {SEED}, round {round_number}"
        env = app_environment(sims, data_dir, new_port())
        with app_process(tmp_path / f"logs-{round_number}", env) as app:
            with ApiClient(app.url) as client:
                if not history:
                    history = {client.create_session(): [] for _ in range(SESSIONS)}
                for conversation in conversations:  # the round before, read back after its kill
                    check_round(client, conversation, history, where)
                if round_number % 2 == 0:
                    # This process recovered the killed one's write-ahead log itself.
                    assert sqlite_integrity(database) == "ok", where
                ready = client.get(f"{API}/ready")
                assert ready.status_code == 200, (where, ready.text)
                assert ready.json()["checks"] == {"database": "up", "memory": "up", "embedder": "up"}, (
                    where,
                    ready.text,
                )
            if round_number == ROUNDS:
                break

            conversations = [Conversation(session_id) for session_id in history]
            started, answered = threading.Event(), threading.Event()
            talkers = [
                threading.Thread(
                    target=talk, args=(app.url, conversation, said(number, round_number), started, answered)
                )
                for number, conversation in enumerate(conversations)
            ]
            for talker in talkers:
                talker.start()
            started.set()
            # Turns under way in every session by then: the first answer came, the others follow.
            assert answered.wait(timeout=10), f"{where}: no turn answered"
            time.sleep(rng.uniform(*KILL_AFTER_S))
            app.process.kill()  # SIGKILL: no drain, no clean-up, no last write
            app.process.wait(timeout=10)
            for talker in talkers:
                talker.join(timeout=15)
                assert not talker.is_alive(), where

        for conversation in conversations:
            assert not conversation.failures, (where, conversation.failures)
        assert any(conversation.cut_off for conversation in conversations), f"{where}: the kill cut no turn off"
        if round_number % 2 == 0:
            assert sqlite_integrity(database) == "ok", where  # opened here first, before the app's next start


def check_round(
    client: ApiClient, conversation: Conversation, history: dict[str, list[MessageBody]], where: str
) -> None:
    """The session as the round before left it: what it had, then whole turns; their audio there."""
    messages = client.session(conversation.session_id)["messages"]
    before = history[conversation.session_id]
    assert messages[: len(before)] == before, f"{where}: earlier turns changed"
    try:
        check_whole_turns(messages[len(before) :], conversation)
    except AssertionError as failed:
        raise AssertionError(f"{where}: {failed}") from None
    for message in messages[len(before) :]:
        if message["audio_url"] is not None:
            speech = client.get(message["audio_url"])
            assert speech.status_code == 200, (where, speech.text)
            assert speech.content, f"{where}: empty reply audio"
    history[conversation.session_id] = messages
