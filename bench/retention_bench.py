"""What the retention sweep costs over 100,000 sessions, on SQLite and on PostgreSQL, in one run.

For each store in turn (SQLite in a fresh data directory; PostgreSQL in a database of its
own created on 127.0.0.1:5432 and dropped at the end):

1. opens the companion as the app does (`app.wiring.open_companion`, long-term memory off)
   in front of the provider simulator (`python -m sim`, on a free loopback port);
2. makes `--templates` real sessions through it: each created and given one text turn,
   saved by the real saver (its reply audio too);
3. fills the store up to `--sessions` with copies of those sessions' rows, made by the
   database itself (`INSERT ... SELECT` joined with a list of new keys: a temporary table
   on SQLite, `unnest` of arrays on PostgreSQL): the `checkpoints` row (and on PostgreSQL
   its `checkpoint_blobs`) under a new session id (`secrets.token_urlsafe(24)`, as the
   app makes them) with a new checkpoint id, a uuid6 whose time is the copy's last turn:
   `--expired-percent` of them idle for longer than the retention (the default 7 days), the
   others within it, spread over the id order at random. A finished turn leaves no
   pending writes, so there are none to copy;
4. times, with the store at its full size:
   - finding the expired sessions: `Checkpoints.idle_threads`, paged by the sweep's batch
     (`SWEEP_BATCH`) to the end, the median of `--rounds`; and the query's plan;
   - the approach it replaces, every session's state loaded (`Companion.session` of each
     thread id, its `updated_at` parsed), over `--old-sample` sessions, extrapolated to all;
   - a dry run (`Companion.sweep(dry_run=True)`), then the whole sweep (`Companion.sweep()`),
     checking that it deleted exactly the expired sessions and kept every other.

Exit status: 0; 1 when the sweep deleted other than the expired sessions; 2 when the
benchmark could not run; 130 when interrupted. Run:
`.venv/bin/python bench/retention_bench.py [--sessions 100000 --json PATH]` (about 30 s).
Results are in docs/benchmarks.md#retention-sweep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import sqlite3
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from langgraph.checkpoint.base.id import UUID
from opentelemetry.trace import NoOpTracer
from prometheus_client import CollectorRegistry
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.companion import SWEEP_BATCH, Companion
from app.metrics import AppMetrics
from app.outbound import OutboundSettings
from app.outbound.telemetry import OutboundMetrics
from app.settings import AppSettings
from app.storage.conversations import IDLE_SQLITE, UUID_EPOCH, checkpoint_id_at
from app.wiring import open_companion
from bench.support import BenchError, Service, log, machine, run_benchmark, started_simulator

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
DAY = 86400.0
RETENTION_DAYS = 7.0  # APP_SESSION_RETENTION_DAYS's default

# The copies, from the real rows of their template session (SQLite).
SQLITE_COPIES = "CREATE TEMP TABLE copies (thread_id TEXT, checkpoint_id TEXT, template TEXT)"
SQLITE_COPY_CHECKPOINTS = """
INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type, checkpoint, metadata)
SELECT n.thread_id, c.checkpoint_ns, n.checkpoint_id, c.parent_checkpoint_id, c.type, c.checkpoint, c.metadata
FROM copies n JOIN checkpoints c ON c.thread_id = n.template"""
# The same on PostgreSQL, the new keys as three arrays.
NEW_KEYS = "unnest(%s::text[], %s::text[], %s::text[]) AS n(thread_id, checkpoint_id, template)"
POSTGRES_COPY_CHECKPOINTS = f"""
INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type, checkpoint, metadata)
SELECT n.thread_id, c.checkpoint_ns, n.checkpoint_id, c.parent_checkpoint_id, c.type, c.checkpoint, c.metadata
FROM {NEW_KEYS} JOIN checkpoints c ON c.thread_id = n.template"""
POSTGRES_COPY_BLOBS = f"""
INSERT INTO checkpoint_blobs (thread_id, checkpoint_ns, channel, version, type, blob)
SELECT n.thread_id, b.checkpoint_ns, b.channel, b.version, b.type, b.blob
FROM {NEW_KEYS} JOIN checkpoint_blobs b ON b.thread_id = n.template"""
THREADS = "SELECT DISTINCT thread_id FROM checkpoints"
COUNT_THREADS = "SELECT count(DISTINCT thread_id) FROM checkpoints"


def checkpoint_id_made_at(epoch: float) -> str:
    """A uuid6 as LangGraph makes them (`langgraph.checkpoint.base.id.uuid6`), at `epoch`."""
    timestamp = round(epoch * 10_000_000) + UUID_EPOCH
    return str(UUID(int=(timestamp >> 12) << 80 | (timestamp & 0x0FFF) << 64 | random.getrandbits(64), version=6))


def copies(count: int, expired: int, templates: list[str], now: float) -> list[tuple[str, str, str]]:
    """(session id, checkpoint id, template) for each copy: the first `expired` idle from 1
    hour to 30 days past the retention, the others active within it but its last hour."""
    cutoff = now - RETENTION_DAYS * DAY
    rows = []
    for index in range(count):
        written = cutoff - random.uniform(3600, 30 * DAY) if index < expired else random.uniform(cutoff + 3600, now)
        rows.append((secrets.token_urlsafe(24), checkpoint_id_made_at(written), templates[index % len(templates)]))
    return rows


# -- the stores ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_database(name: str) -> Iterator[str]:
    """A database of the benchmark's own, dropped afterwards; its URL."""
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        log(f"PostgreSQL: dropped the database {name}")


@contextlib.asynccontextmanager
async def companion_on(settings: AppSettings) -> AsyncIterator[Companion]:
    metrics = AppMetrics.build(CollectorRegistry())
    outbound = OutboundSettings()
    opened = open_companion(settings, outbound, NoOpTracer(), metrics, OutboundMetrics.build(CollectorRegistry()))
    async with opened as (companion, _):
        yield companion


def fill(settings: AppSettings, rows: list[tuple[str, str, str]]) -> None:
    if settings.database_url is None:
        with sqlite3.connect(settings.data_dir / "conversations.db") as connection:
            connection.execute(SQLITE_COPIES)
            connection.executemany("INSERT INTO copies VALUES (?, ?, ?)", rows)
            connection.execute(SQLITE_COPY_CHECKPOINTS)
        return
    keys = tuple(list(column) for column in zip(*rows, strict=True))
    with psycopg.connect(settings.database_url, autocommit=True) as connection:
        connection.execute(POSTGRES_COPY_CHECKPOINTS, keys)
        connection.execute(POSTGRES_COPY_BLOBS, keys)
        connection.execute("ANALYZE")  # its statistics, as autovacuum would take them after a change this size


def query(settings: AppSettings, statement: str, *parameters: Any) -> list[tuple[Any, ...]]:
    """On a connection of the benchmark's own (SQLite's `?` placeholders); the rows, if any."""
    if settings.database_url is None:
        with contextlib.closing(sqlite3.connect(settings.data_dir / "conversations.db")) as connection:
            return list(connection.execute(statement, parameters).fetchall())
    with psycopg.connect(settings.database_url, autocommit=True) as connection:
        cursor = connection.execute(statement.replace("?", "%s"), parameters)
        return list(cursor.fetchall()) if cursor.description else []


def plan(settings: AppSettings, cutoff: float) -> list[str]:
    """How the database runs the expired sessions' query (the first batch's)."""
    parameters = ("", checkpoint_id_at(cutoff), SWEEP_BATCH)
    if settings.database_url is None:
        return [str(row[-1]) for row in query(settings, f"EXPLAIN QUERY PLAN {IDLE_SQLITE}", *parameters)]
    return [str(row[0]) for row in query(settings, f"EXPLAIN (ANALYZE, BUFFERS) {IDLE_SQLITE}", *parameters)]


# -- the measurements ------------------------------------------------------------------------------------------


async def find_all(companion: Companion, cutoff: float) -> list[str]:
    """Every expired session, as the sweep pages through them."""
    found: list[str] = []
    after = ""
    while True:
        batch = await companion.checkpoints.idle_threads(cutoff, after, SWEEP_BATCH)
        found += [thread_id for thread_id, _ in batch]
        if len(batch) < SWEEP_BATCH:
            return found
        after = batch[-1][0]


async def timed_finds(companion: Companion, cutoff: float, rounds: int, expired: int) -> dict[str, Any]:
    """Seconds to find every expired session (median, least, each round) and the query's plan."""
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        found = await find_all(companion, cutoff)
        seconds.append(time.perf_counter() - started)
        if len(found) != expired:
            raise BenchError(f"the query found {len(found)} expired sessions, not {expired}")
    return {
        "median": statistics.median(seconds),
        "min": min(seconds),
        "rounds": seconds,
        "plan": plan(companion.settings, cutoff),
    }


async def load_states(companion: Companion, sample: int) -> float:
    """Seconds to load `sample` sessions' states as the replaced sweep did for every session."""
    thread_ids = [str(row[0]) for row in query(companion.settings, f"{THREADS} LIMIT ?", sample)]
    started = time.perf_counter()
    for thread_id in thread_ids:
        conversation = await companion.session(thread_id)
        datetime.fromisoformat(conversation["updated_at"]).timestamp()
    return time.perf_counter() - started


async def measure_store(
    name: str, settings: AppSettings, sessions: int, expired_percent: float, templates: int, rounds: int, sample: int
) -> dict[str, Any]:
    async with companion_on(settings) as companion:
        made = []
        for _ in range(templates):
            session_id, _ = await companion.create_session()
            await companion.take_turn(session_id, text="My tortoise Quillfeather sleeps under the marmalade lantern")
            made.append(session_id)
        now = time.time()
        expired = round(sessions * expired_percent / 100)
        started = time.perf_counter()
        fill(settings, copies(sessions - templates, expired, made, now))
        log(f"{name}: {sessions:,} sessions ({expired:,} expired) in {time.perf_counter() - started:.1f} s")
        cutoff = now - RETENTION_DAYS * DAY

        finds = {"as filled": await timed_finds(companion, cutoff, rounds, expired)}
        if settings.database_url is not None:
            # What autovacuum does in time: the visibility map lets the query skip the table.
            query(settings, "VACUUM ANALYZE checkpoints")
            finds["vacuumed"] = await timed_finds(companion, cutoff, rounds, expired)
        for condition, found in finds.items():
            log(f"{name}, {condition}: found the {expired:,} expired in {found['median'] * 1e3:.1f} ms (median)")

        old_seconds = await load_states(companion, sample)
        old_per_state = old_seconds / sample
        log(f"{name}: the old approach, {sample:,} states loaded in {old_seconds:.1f} s")

        dry = await companion.sweep(dry_run=True)
        swept = await companion.sweep()
        left = query(settings, COUNT_THREADS)[0][0]
        correct = len(dry.sessions) == len(swept.sessions) == expired and left == sessions - expired
        correct = correct and await find_all(companion, cutoff) == []
        log(
            f"{name}: dry run {dry.seconds:.2f} s, sweep of {len(swept.sessions):,} in {swept.seconds:.1f} s,"
            f" {left:,} sessions left{'' if correct else ' - WRONG'}"
        )
    return {
        "sessions": sessions,
        "expired": expired,
        "templates": templates,
        "find_s": finds,
        "old_sample": sample,
        "old_load_s": old_seconds,
        "old_per_state_ms": old_per_state * 1e3,
        "old_extrapolated_s": old_per_state * sessions,
        "dry_run_s": dry.seconds,
        "sweep_s": swept.seconds,
        "sweep_per_session_ms": swept.seconds / max(1, len(swept.sessions)) * 1e3,
        "deleted": len(swept.sessions),
        "left": left,
        "correct": correct,
    }


def settings_for(tmp: Path, store: str, sim: Service, database_url: str | None) -> AppSettings:
    return AppSettings(
        data_dir=tmp / f"{store}-data",
        database_url=database_url,
        feature_memory=False,
        session_retention_days=RETENTION_DAYS,
        groq_base_url=f"{sim.url}/openai/v1",
        groq_api_key="bench",
        elevenlabs_base_url=sim.url,
        elevenlabs_api_key="bench",
        log_level="warning",
    )


def run(tmp: Path, cleanup: contextlib.ExitStack, args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    sim = started_simulator(tmp, cleanup)
    database_url = cleanup.enter_context(postgres_database(f"retention_bench_{secrets.token_hex(4)}"))
    results: dict[str, Any] = {}
    for store, url in (("sqlite", None), ("postgresql", database_url)):
        measured = measure_store(
            store,
            settings_for(tmp, store, sim, url),
            args.sessions,
            args.expired_percent,
            args.templates,
            args.rounds,
            args.old_sample,
        )
        results[store] = asyncio.run(measured)
    print(f"\n{args.sessions:,} sessions, {args.expired_percent:g} % expired:")
    columns = ("old: load all (extrapolated)", "dry run", "sweep", "per session")
    print(f"{'':<12} {columns[0]:>30} {columns[1]:>9} {columns[2]:>9} {columns[3]:>12}")
    for store, result in results.items():
        old = f"{result['old_extrapolated_s']:.0f} s ({result['old_per_state_ms']:.2f} ms each)"
        print(
            f"{store:<12} {old:>30} {result['dry_run_s']:7.2f} s"
            f" {result['sweep_s']:7.1f} s {result['sweep_per_session_ms']:9.1f} ms"
        )
        for condition, found in result["find_s"].items():
            print(f"  find, {condition}: {found['median'] * 1e3:.1f} ms (median), plan:")
            print("    " + "\n    ".join(found["plan"]))
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **results}
    return report, 0 if all(result["correct"] for result in results.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--expired-percent", type=float, default=1.0)
    parser.add_argument("--templates", type=int, default=4, help="real sessions the others copy")
    parser.add_argument("--rounds", type=int, default=5, help="of the expired sessions' query")
    parser.add_argument("--old-sample", type=int, default=5_000, help="states loaded by the replaced approach")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    return run_benchmark(
        "retention_bench", lambda tmp, cleanup: run(tmp, cleanup, args), json_path=args.json, errors=(psycopg.Error,)
    )


if __name__ == "__main__":
    sys.exit(main())
