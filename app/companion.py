"""Sessions and turns: what the API asks of the app, in the app's own words.

A turn runs the workflow once. Its state is saved once, when the run ends (LangGraph's
`durability="exit"`). A turn that does not finish - cut off by the timeout, or without
words to answer - is rolled back to the checkpoint from before it, since LangGraph also
saves what a stopped run had done. When the language model is down the run still ends
normally, keeping the user's words without a reply.

The run stops once the reply is spoken (app/workflow/graph.py) and the turn is answered;
what only the next turn needs - the memory extraction and the running summary - is run by
a task of its own after it, still holding the session: the session's next turn (or its
deletion) waits for it, and sees its results. That work has its own time
(APP_REMEMBER_BUDGET_S + APP_SUMMARISE_BUDGET_S); whatever of it fails is skipped, as it
always was, and `settled()` waits for all of it (the app's shutdown does).

Turns of one session, and its deletion, run one at a time: in the process (an asyncio
lock), then across the replicas sharing a PostgreSQL database (`Checkpoints.hold`,
docs/app.md#several-replicas). Waiting counts against the turn's time: a turn that cannot
have its session within APP_TURN_TIMEOUT_S times out like any other. The API asks
everything of this class and reaches past it into no store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from langchain_core.runnables import RunnableConfig

from app.audio import AudioFormat
from app.memory.store import MemoryUnavailable
from app.metrics import AppMetrics
from app.settings import AppSettings
from app.storage.audio import StoredAudio
from app.storage.conversations import Checkpoints
from app.storage.full import storage_full
from app.workflow.graph import TurnGraph
from app.workflow.nodes import NothingHeard, TranscriptionFailed, now
from app.workflow.state import Conversation, Services, Turn, TurnContext, TurnEvents

logger = logging.getLogger("app.companion")

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
# Expired sessions found per query: a backlog is swept a batch at a time, not held at once.
SWEEP_BATCH = 500


class SessionNotFound(Exception):
    pass


class TranscriptionUnavailable(Exception):
    pass


class NoSpeech(Exception):
    pass


class ReplyUnavailable(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__("reply unavailable")
        self.retry_after = retry_after


class TurnTimedOut(Exception):
    pass


class SessionBusy(Exception):
    """The session's turn under way did not let go within APP_TURN_TIMEOUT_S."""


# How a turn that was refused is counted (`app_turns_total`'s `outcome`).
TURN_OUTCOMES: dict[type[Exception], str] = {
    SessionNotFound: "not_found",
    TranscriptionUnavailable: "transcription_unavailable",
    NoSpeech: "no_speech",
    ReplyUnavailable: "reply_unavailable",
    TurnTimedOut: "turn_timeout",
}


@dataclass(frozen=True)
class TurnResult:
    turn_id: str
    transcript: str
    reply: str
    audio_id: str | None
    degraded: list[str]
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Readiness:
    database: bool  # a real query answered
    memory: bool | None  # None: long-term memory is off
    breakers: dict[str, str]  # breaker state per outside service, by name


class Companion:
    def __init__(
        self,
        graph: TurnGraph,
        checkpoints: Checkpoints,
        services: Services,
        breaker_states: Callable[[], dict[str, str]],
        metrics: AppMetrics,
    ) -> None:
        self.graph = graph
        self.metrics = metrics
        self.checkpoints = checkpoints
        self.services = services
        self.settings: AppSettings = services.settings
        self._breaker_states = breaker_states
        self._turn_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._after_turns: set[asyncio.Task[None]] = set()
        self._streamed_turns: set[asyncio.Task[TurnResult]] = set()

    # -- sessions --------------------------------------------------------------------------

    async def create_session(self) -> tuple[str, str]:
        session_id = secrets.token_urlsafe(24)  # 32 characters, 192 random bits
        created_at = now()
        initial: Conversation = {
            "session_id": session_id,
            "created_at": created_at,
            "updated_at": created_at,
            "messages": [],
            "summary": "",
            "summarised": 0,
        }
        await self.graph.aupdate_state(_config(session_id), initial, as_node="__start__")
        self.metrics.sessions_started.inc()
        return session_id, created_at

    async def session(self, session_id: str) -> Conversation:
        if not SESSION_ID.match(session_id):
            raise SessionNotFound
        snapshot = await self.graph.aget_state(_config(session_id))
        values = cast(Conversation, snapshot.values)
        if not values.get("session_id"):
            raise SessionNotFound
        return values

    async def delete_session(self, session_id: str, *, idle_before: float | None = None) -> bool:
        """Removes everything the session left: its state, its memories and its audio, with
        no copy of its words left in the SQLite files (`Checkpoints.delete`). A turn under
        way, on any replica, ends first: its messages and audio go too, and it cannot save
        its state over the deletion. With `idle_before` (the retention sweep's cutoff, epoch
        seconds) only if the session is still idle since before then once it is ours: a
        turn that reached it meanwhile keeps it. Whether it was removed."""
        await self.session(session_id)
        async with self._one_at_a_time(session_id, self._deadline()):
            conversation = await self.session(session_id)
            if idle_before is not None and (await self.checkpoints.written_at(session_id) or 0.0) >= idle_before:
                return False
            if self.services.memory is not None:  # MemoryUnavailable: keep all, retry later
                await self.services.memory.forget_session(session_id)
            await self.services.audio.delete(
                [message["audio_id"] for message in conversation["messages"] if "audio_id" in message]
            )
            await self.checkpoints.delete(session_id)
        if idle_before is None:  # the sweep counts its own (`app_sessions_expired_total`)
            self.metrics.sessions_deleted.inc()
        return True

    # -- turns -------------------------------------------------------------------------------

    async def take_turn(
        self,
        session_id: str,
        *,
        text: str | None = None,
        audio: bytes | None = None,
        audio_format: AudioFormat | None = None,
        events: TurnEvents | None = None,
    ) -> TurnResult:
        """One turn; with `events`, a streaming one, told each step's results as they come
        (`stream_turn`)."""
        kind = "text" if text is not None else "voice"
        started = time.perf_counter()
        outcome = "error"
        try:
            await self.session(session_id)
            deadline = self._deadline()
            held = AsyncExitStack()
            try:
                await held.enter_async_context(self._one_at_a_time(session_id, deadline))
            except SessionBusy:
                logger.warning("turn timed out waiting for the session's turn under way")
                raise TurnTimedOut from None
            try:
                result = await self._run_turn(session_id, deadline, text, audio, audio_format, events)
            except BaseException:
                await held.aclose()
                raise
            # The session stays held until the work after the answer is done.
            task = asyncio.create_task(self._after_the_answer(session_id, result, held))
            self._after_turns.add(task)
            task.add_done_callback(self._after_turns.discard)
            outcome = "ok"
            return result
        except Exception as failed:
            outcome = "storage_full" if storage_full(failed) else TURN_OUTCOMES.get(type(failed), "error")
            raise
        finally:
            self.metrics.turns.labels(kind, outcome).inc()
            self.metrics.turn_duration.labels(kind).observe(time.perf_counter() - started)

    async def _run_turn(
        self,
        session_id: str,
        deadline: float,
        text: str | None,
        audio: bytes | None,
        audio_format: AudioFormat | None,
        events: TurnEvents | None,
    ) -> TurnResult:
        """The answered turn; its run stopped after the answer, with the work after it left."""
        turn: Turn = {"turn_id": uuid.uuid4().hex, "degraded": [], "timings_ms": {}}
        if text is not None:
            turn["text"] = text
        before = await self.graph.aget_state(_config(session_id))
        if not before.values.get("session_id"):  # deleted while this turn waited
            raise SessionNotFound
        started = time.perf_counter()
        context = TurnContext(self.services, deadline, audio=audio, audio_format=audio_format, events=events)
        try:
            async with asyncio.timeout_at(deadline):
                final: dict[str, Any] = await self.graph.ainvoke(
                    {"turn": turn}, _config(session_id), context=context, durability="exit"
                )
        except TimeoutError:
            logger.warning("turn timed out; session left as it was", extra={"turn_id": turn["turn_id"]})
            await self._restore(session_id, before.config)
            raise TurnTimedOut from None
        except NothingHeard:
            await self._restore(session_id, before.config)
            raise NoSpeech from None
        except TranscriptionFailed as error:
            logger.warning("transcription unavailable: %s", error.reason)
            await self._restore(session_id, before.config)
            raise TranscriptionUnavailable from None
        except Exception as failed:
            if not storage_full(failed):
                raise
            # No room for something the turn made (its reply's audio, its state). The run may
            # still have saved its way out - the person's words without the reply: taken
            # back, if there is room for that.
            if (await self.graph.aget_state(_config(session_id))).config != before.config:
                await self._restore(session_id, before.config)
            raise
        try:
            await self.checkpoints.keep_latest(session_id)
        except Exception as failed:
            if not storage_full(failed):
                raise
            # The turn is saved whole; the next turn prunes what this one could not.
            logger.warning("no room to prune the session's older checkpoints after a turn")
        result: Turn = final["turn"]
        self._count(result)
        result["timings_ms"]["total"] = round((time.perf_counter() - started) * 1000, 1)
        if result.get("reply_unavailable"):
            raise ReplyUnavailable(result.get("retry_after", 5.0))
        return TurnResult(
            turn_id=result["turn_id"],
            transcript=result.get("transcript", ""),
            reply=result.get("reply", ""),
            audio_id=result.get("audio_id"),
            degraded=list(result["degraded"]),
            timings_ms=result["timings_ms"],
        )

    async def stream_turn(
        self,
        session_id: str,
        *,
        text: str | None = None,
        audio: bytes | None = None,
        audio_format: AudioFormat | None = None,
    ) -> AsyncIterator[tuple[str, dict[str, Any] | TurnResult]]:
        """A turn as its events: `transcript`, `reply` deltas, `audio` chunks, then `done`
        with the result; a failure raises as `take_turn` does, after the events before it.
        The turn runs in a task of its own: a consumer that goes away (the client hung up)
        does not stop it, and it completes - words, reply and speech saved - or rolls back
        as any turn does."""
        queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()

        def tell(name: str, data: dict[str, Any]) -> None:
            queue.put_nowait((name, data))

        turn = asyncio.create_task(
            self.take_turn(session_id, text=text, audio=audio, audio_format=audio_format, events=tell)
        )
        self._streamed_turns.add(turn)
        turn.add_done_callback(self._streamed_turns.discard)
        turn.add_done_callback(lambda _: queue.put_nowait(None))
        while (event := await queue.get()) is not None:
            yield event
        yield "done", await turn

    async def _after_the_answer(self, session_id: str, answered: TurnResult, held: AsyncExitStack) -> None:
        """Resumes the turn's run after its answer - remember, summarise - and then lets the
        session go. Each step skips what fails; a run that cannot finish in its time keeps
        what it did (LangGraph saves it) and the next turn starts afresh."""
        async with held:
            settings = self.settings
            budget = settings.remember_budget_s + settings.summarise_budget_s
            deadline = asyncio.get_running_loop().time() + budget
            try:
                async with asyncio.timeout_at(deadline):
                    final: dict[str, Any] = await self.graph.ainvoke(
                        None, _config(session_id), context=TurnContext(self.services, deadline), durability="exit"
                    )
            except TimeoutError:
                logger.warning("the work after a turn's answer ran out of time; skipped")
                return
            except Exception as failed:
                if not storage_full(failed):
                    logger.exception("the work after a turn's answer failed; skipped")
                    return
                logger.warning("no room to save the work after a turn's answer (the memory, the summary); skipped")
                return
            finally:
                with contextlib.suppress(Exception):  # the next turn prunes what this cannot
                    await self.checkpoints.keep_latest(session_id)
            turn: Turn = final["turn"]
            for stage in set(turn["timings_ms"]) - set(answered.timings_ms):
                self.metrics.stage_duration.labels(stage).observe(turn["timings_ms"][stage] / 1000)
            for degradation in set(turn["degraded"]) - set(answered.degraded):
                self.metrics.degradations.labels(degradation).inc()
            if turn.get("remembered"):
                self.metrics.memories_written.inc()

    async def settled(self) -> None:
        """Returns once every streamed turn whose client went away, and the work after every
        answered turn, is done (or skipped)."""
        while self._streamed_turns or self._after_turns:
            await asyncio.gather(*self._streamed_turns, *self._after_turns, return_exceptions=True)

    def _count(self, turn: Turn) -> None:
        for stage, milliseconds in turn["timings_ms"].items():
            self.metrics.stage_duration.labels(stage).observe(milliseconds / 1000)
        for degradation in turn["degraded"]:
            self.metrics.degradations.labels(degradation).inc()
        self.metrics.memories_recalled.inc(len(turn.get("memories", ())))

    async def _restore(self, session_id: str, before: RunnableConfig) -> None:
        """Puts the session back as it was before a turn that did not finish: LangGraph saves
        what a run had done when it stops, even when it was cut off."""
        await self.graph.aupdate_state(before, None, as_node="__start__")
        await self.checkpoints.keep_latest(session_id)

    def _deadline(self) -> float:
        """When a turn arriving now is up (the event loop's time)."""
        return asyncio.get_running_loop().time() + self.settings.turn_timeout_s

    @asynccontextmanager
    async def _one_at_a_time(self, session_id: str, deadline: float) -> AsyncIterator[None]:
        """The session to the caller alone while entered: the in-process lock first, so that
        turns waiting in one replica hold no database connection, then the replicas'
        (`Checkpoints.hold`). SessionBusy if both cannot be had by `deadline`."""
        lock = self._turn_locks.get(session_id)
        if lock is None:
            lock = self._turn_locks[session_id] = asyncio.Lock()
        async with AsyncExitStack() as held:
            try:
                async with asyncio.timeout_at(deadline):
                    await held.enter_async_context(lock)
                await held.enter_async_context(self.checkpoints.hold(session_id, deadline))
            except TimeoutError:
                raise SessionBusy from None
            yield

    # -- reply audio and readiness ---------------------------------------------------------

    async def find_audio(self, audio_id: str) -> StoredAudio | None:
        """A reply's speech and its content type, if the id is one."""
        return await self.services.audio.find(audio_id)

    async def readiness(self) -> Readiness:
        """Real queries on the conversation database and (memory on) the memory store; the breakers."""
        return Readiness(
            database=await self.checkpoints.check(),
            memory=None if self.services.memory is None else await self.services.memory.check(),
            breakers=self._breaker_states(),
        )

    # -- housekeeping ------------------------------------------------------------------------

    async def sweep(self, dry_run: bool = False) -> SweepReport:
        """Removes sessions idle longer than APP_SESSION_RETENTION_DAYS, each through
        `delete_session` (state, memories, audio), and reply audio older than
        APP_AUDIO_RETENTION_HOURS; with `dry_run`, only finds what would go. One process of
        all those on the store sweeps at a time (`Checkpoints.only_one`); another finds it
        held and skips. Idle since: when the session's state was last saved (its creation,
        its last turn). A session a turn reached since it was found stays, and so does one
        whose turn under way does not end in time or whose memories cannot be reached:
        the next sweep tries again."""
        started = time.perf_counter()
        async with self.checkpoints.only_one("sweep") as held:
            if not held:
                logger.info("retention sweep skipped: another process is sweeping")
                return SweepReport(dry_run=dry_run, held_elsewhere=True, sessions=(), audio=0, seconds=0.0)
            audio_seconds = self.settings.audio_retention_hours * 3600
            if dry_run:
                audio = await self.services.audio.count_older_than(audio_seconds)
            else:
                audio = await self.services.audio.delete_older_than(audio_seconds)
                self.metrics.audio_expired.inc(audio)
            sessions = await self._expired_sessions(dry_run)
        seconds = time.perf_counter() - started
        if not dry_run:
            self.metrics.sweep_duration.observe(seconds)
        return SweepReport(dry_run=dry_run, held_elsewhere=False, sessions=sessions, audio=audio, seconds=seconds)

    async def _expired_sessions(self, dry_run: bool) -> tuple[ExpiredSession, ...]:
        """Found a batch at a time, paged by session id: one kept (busy, say) is not found
        again by this sweep."""
        cutoff = time.time() - self.settings.session_retention_days * 86400
        gone: list[ExpiredSession] = []
        after = ""
        while True:
            batch = await self.checkpoints.idle_threads(cutoff, after, SWEEP_BATCH)
            for session_id, written in batch:
                if dry_run or await self._expire(session_id, cutoff):
                    gone.append(ExpiredSession.of(session_id, written))
            if len(batch) < SWEEP_BATCH:
                return tuple(gone)
            after = batch[-1][0]

    async def _expire(self, session_id: str, cutoff: float) -> bool:
        try:
            removed = await self.delete_session(session_id, idle_before=cutoff)
        except (SessionNotFound, MemoryUnavailable, SessionBusy):  # gone already, or kept for the next sweep
            return False
        if removed:
            self.metrics.sessions_expired.inc()
        return removed


@dataclass(frozen=True)
class ExpiredSession:
    """A session a sweep removed, or would, told apart without its id (capability ids are
    never printed or logged)."""

    fingerprint: str  # the first 12 hex digits of its id's SHA-256: not enough to find the id
    idle_since: str  # when its state was last saved, ISO 8601 in UTC

    @classmethod
    def of(cls, session_id: str, written: float) -> ExpiredSession:
        return cls(
            fingerprint=hashlib.sha256(session_id.encode()).hexdigest()[:12],
            idle_since=datetime.fromtimestamp(written, UTC).isoformat(timespec="seconds"),
        )


@dataclass(frozen=True)
class SweepReport:
    """What a sweep removed, or with `dry_run` would have."""

    dry_run: bool
    held_elsewhere: bool  # another process was sweeping: this one did nothing
    sessions: tuple[ExpiredSession, ...]
    audio: int  # reply audio past its own retention (files, or rows with PostgreSQL)
    seconds: float


def _config(session_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": session_id}}
