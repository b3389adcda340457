"""What a backup of the embedded stores (SQLite and embedded Qdrant, the app's defaults)
costs in time and size at 1,000 and 10,000 sessions, and what restoring it costs, in one run.

1. opens the companion as the app does (`app.wiring.open_companion`, long-term memory on)
   in front of the provider simulator (`python -m sim`, on a free loopback port), in a
   fresh data directory, and makes `--templates` real sessions through it, each given
   `--turns` text turns that state a fact about the speaker, so that each has a memory
   collection of its own (`<data_dir>/qdrant/collection/memories-<session id>/`);
2. with the companion closed, fills the data directory up to each of `--sessions` in turn:
   the checkpoint rows copied by SQLite itself under new session ids (`INSERT ... SELECT`,
   as bench/retention_bench.py does), and for each copy its template's collection
   directory copied under the copy's name, with its entry in the embedded Qdrant's
   `meta.json` (written once per fill): what qdrant-client's embedded mode keeps on disk,
   and loads at start;
   then opens the companion on it to check that a copied session reads and recalls its
   memories (`companion.services.memory.recall`);
3. times, `--rounds` times at each size (median, least and greatest):
   - `app.storage.backup.back_up_embedded` (snapshots, checksums, the gzipped tar, its
     verification, the rename): seconds, the archive's bytes against the data's
     (`conversations.db` and `qdrant/`), and the process's peak RSS meanwhile;
   - `verify_backup` of that archive alone (checksums, extraction, SQLite's integrity
     check of every database in it), to split it from the rest;
   - `app.storage.restore.restore` of it (the app is not running), then, after the last
     round, the restored directory opened by the companion and a session read and recalled;
   and, once at the largest size, one more backup under cProfile: where its time goes.

Exit status: 0; 1 when a filled or restored data directory does not give back its sessions
and memories; 2 when the benchmark could not run; 130 when interrupted. Run:
`.venv/bin/python bench/backup_bench.py [--sessions 1000 10000 --json PATH]` (about 5 min).
Results are in docs/benchmarks.md#backups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import json
import pstats
import resource
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.settings import AppSettings
from app.storage import backup, restore
from app.storage.backup import BackupError
from bench.retention_bench import companion_on, copies, fill
from bench.support import MIB, BenchError, Service, log, machine, run_benchmark, started_simulator

# One fact about the speaker each: the simulator's memory model stores each one.
FACTS = (
    "My sister lives in Paris.",
    "I work as a nurse at the hospital in Lyon.",
    "My dog is called Max and he loves the beach.",
    "I play the cello in an orchestra on Sundays.",
    "My favourite meal is my grandmother's lentil soup.",
    "I grew up on a farm near the mountains.",
)
QUESTION = "Where does my sister live?"
ANSWER = "Paris"
T = TypeVar("T")
COUNT_POINTS = "SELECT count(*) FROM points"
# What the cProfile'd backup is broken into: (label, file name ending, function name). An
# "of which" is part of the row above it; the "all:" rows cut across the others.
PHASES = (
    ("snapshot: every database by SQLite's backup API", "backup.py", "_snapshot_sqlite"),
    (
        "of which the copying and its commit (Connection.backup)",
        "~",
        "<method 'backup' of 'sqlite3.Connection' objects>",
    ),
    ("manifest: SHA-256 of every member", "backup.py", "_sha256_of"),
    ("tar.gz: the archive written", "tarfile.py", "add"),
    ("of which compressing (zlib)", "~", "<method 'compress' of 'zlib.Compress' objects>"),
    ("verify: whole", "backup.py", "verify_backup"),
    ("of which the extraction with its checksums", "backup.py", "_extract"),
    ("of which SQLite's integrity checks", "backup.py", "_check_sqlite"),
    ("all: SQLite files opened (sqlite3.connect)", "~", "<built-in method _sqlite3.connect>"),
    ("all: directories made (staging, extraction)", "~", "<built-in method posix.mkdir>"),
    ("all: fsync (every extracted member, the archive)", "~", "<built-in method posix.fsync>"),
    ("all: rmtree (the staging, the verify's extraction)", "shutil.py", "rmtree"),
)


def collection_dir(data_dir: Path, session_id: str) -> Path:
    return backup.qdrant_path(data_dir) / "collection" / f"{backup.COLLECTION_PREFIX}{session_id}"


def points_in(data_dir: Path, session_id: str) -> int:
    storage = collection_dir(data_dir, session_id) / backup.STORAGE_FILE
    if not storage.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(f"{storage.resolve().as_uri()}?mode=ro", uri=True)) as connection:
        return int(connection.execute(COUNT_POINTS).fetchone()[0])


def bytes_under(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def data_bytes(data_dir: Path) -> dict[str, int]:
    """What a backup takes: the conversations (with their write-ahead log) and the embedded Qdrant."""
    database = backup.conversations_path(data_dir)
    logs = database.with_name(database.name + "-wal")
    conversations = sum(path.stat().st_size for path in (database, logs) if path.is_file())
    qdrant = bytes_under(backup.qdrant_path(data_dir))
    return {"conversations": conversations, "qdrant": qdrant, "total": conversations + qdrant}


# -- the data ------------------------------------------------------------------------------------------


async def make_templates(settings: AppSettings, count: int, turns: int) -> list[str]:
    """`count` real sessions of `turns` text turns each, every turn a fact to remember."""
    made = []
    async with companion_on(settings) as companion:
        for _ in range(count):
            session_id, _ = await companion.create_session()
            for turn in range(turns):
                result = await companion.take_turn(session_id, text=FACTS[turn % len(FACTS)])
                if result.degraded:
                    raise BenchError(f"a template turn was degraded: {result.degraded}")
            made.append(session_id)
    for session_id in made:  # closed: what is on disk is all there is
        if points_in(settings.data_dir, session_id) == 0:
            raise BenchError("a template session has no memory collection on disk")
    return made


def grow(settings: AppSettings, templates: list[str], to: int) -> list[str]:
    """Copies of the templates up to `to` sessions: their checkpoints and their collections.
    The new session ids."""
    data_dir = settings.data_dir
    with contextlib.closing(sqlite3.connect(backup.conversations_path(data_dir))) as connection:
        present = int(connection.execute("SELECT count(DISTINCT thread_id) FROM checkpoints").fetchone()[0])
    rows = copies(to - present, 0, templates, time.time())
    fill(settings, rows)
    meta_file = backup.qdrant_path(data_dir) / backup.QDRANT_META
    meta: dict[str, Any] = json.loads(meta_file.read_text())
    collections = meta["collections"]
    for session_id, _, template in rows:
        shutil.copytree(collection_dir(data_dir, template), collection_dir(data_dir, session_id))
        collections[f"{backup.COLLECTION_PREFIX}{session_id}"] = collections[f"{backup.COLLECTION_PREFIX}{template}"]
    temporary = meta_file.with_name(meta_file.name + ".tmp")  # replaced as qdrant-client does (`_save`)
    temporary.write_text(json.dumps(meta))
    temporary.replace(meta_file)
    return [session_id for session_id, _, _ in rows]


def opens(settings: AppSettings, session_id: str, turns: int, memories: int) -> dict[str, Any]:
    return asyncio.run(_opens(settings, session_id, turns, memories))


async def _opens(settings: AppSettings, session_id: str, turns: int, memories: int) -> dict[str, Any]:
    """The companion opened on the data directory (embedded Qdrant loads every collection
    then): the session read, its `turns` turns there, and its `memories` recalled."""
    started = time.perf_counter()
    async with companion_on(settings) as companion:
        opened = time.perf_counter() - started
        rss = rss_mib()
        conversation = await companion.session(session_id)
        memory = companion.services.memory
        if memory is None:
            raise BenchError("the companion opened without long-term memory")
        recalled = await memory.recall(session_id, QUESTION, settings.memory_recall_limit)
    messages = len(conversation["messages"])
    found = any(ANSWER in recollection.text for recollection in recalled)
    return {
        "open_s": opened,
        "rss_open_mib": rss,
        "messages": messages,
        "recalled": len(recalled),
        "correct": messages == 2 * turns and len(recalled) == min(memories, settings.memory_recall_limit) and found,
    }


# -- the measurements ------------------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    # Linux: "5" resets the process's high-water mark of its resident set, which
    # getrusage's ru_maxrss reports, so that each backup's own peak is read.
    Path("/proc/self/clear_refs").write_text("5")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def timed(call: Callable[..., T], *arguments: Any) -> tuple[float, T]:
    started = time.perf_counter()
    result = call(*arguments)
    return time.perf_counter() - started, result


def measure_size(
    settings: AppSettings, sessions: int, rounds: int, probe: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    data_dir, directory = settings.data_dir, settings.backups
    data = data_bytes(data_dir)
    backed_up, verified, restored, archives, peaks, before = [], [], [], [], [], []
    members = 0
    for _ in range(rounds):
        reset_peak_rss()
        before.append(peak_rss_mib())
        seconds, made = timed(backup.back_up_embedded, data_dir, directory, 1)
        peaks.append(peak_rss_mib())
        backed_up.append(seconds)
        archives.append(made.size)
        if made.sessions != sessions:
            raise BenchError(f"the backup holds {made.sessions} sessions, not {sessions}")
        seconds, manifest = timed(backup.verify_backup, made.path)
        verified.append(seconds)
        members = len(manifest["files"])
        seconds, done = timed(restore.restore, settings, made.path)
        restored.append(seconds)
        shutil.rmtree(done.replaced)  # what it replaced: the same data, kept aside
    restored_data = data_bytes(data_dir)
    check = probe()
    archive = statistics.median(archives)
    log(
        f"{sessions:,} sessions: backup {statistics.median(backed_up):.1f} s,"
        f" verify {statistics.median(verified):.1f} s, restore {statistics.median(restored):.1f} s;"
        f" {data['total'] / MIB:.1f} MiB in {archive / MIB:.1f} MiB;"
        f" the restored data {'opens' if check['correct'] else 'is WRONG'}"
    )
    return {
        "sessions": sessions,
        "data_bytes": data,
        "restored_data_bytes": restored_data,
        "archive_bytes": archive,
        "archive_members": members,
        "ratio": data["total"] / archive,
        "backup_s": spread(backed_up),
        "verify_s": spread(verified),
        "restore_s": spread(restored),
        "rss_before_backup_mib": spread(before),
        "backup_peak_rss_mib": spread(peaks),
        "restored_opens": check,
    }


def profile_backup(settings: AppSettings) -> dict[str, Any]:
    """Cumulative seconds of the backup's phases, one more backup under cProfile."""
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(backup.back_up_embedded, settings.data_dir, settings.backups, 1)
    total = time.perf_counter() - started
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    phases = {
        label: sum(row[3] for (file, _, function), row in stats.items() if file.endswith(ending) and function == name)
        for label, ending, name in PHASES
    }
    return {"total_s": total, "phases_s": phases}


def settings_for(tmp: Path, sim: Service) -> AppSettings:
    return AppSettings(
        data_dir=tmp / "data",
        backup_dir=tmp / "backups",
        feature_memory=True,
        groq_base_url=f"{sim.url}/openai/v1",
        groq_api_key="bench",
        elevenlabs_base_url=sim.url,
        elevenlabs_api_key="bench",
        log_level="warning",
    )


def run(tmp: Path, cleanup: contextlib.ExitStack, args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    sim = started_simulator(tmp, cleanup)
    settings = settings_for(tmp, sim)
    templates = asyncio.run(make_templates(settings, args.templates, args.turns))
    sim.stop()  # no turn is taken from here on
    points = [points_in(settings.data_dir, session_id) for session_id in templates]
    log(f"{args.templates} template sessions of {args.turns} turns, {sum(points)} memories")
    results: dict[str, Any] = {}
    for sessions in sorted(args.sessions):
        seconds, added = timed(grow, settings, templates, sessions)
        probe = functools.partial(opens, settings, added[-1], args.turns, min(points))
        filled = probe()
        log(
            f"filled to {sessions:,} sessions in {seconds:.1f} s; the companion opens on it in"
            f" {filled['open_s']:.1f} s{'' if filled['correct'] else ', WRONG'}"
        )
        results[str(sessions)] = {
            "fill_s": seconds,
            "filled_opens": filled,
            **measure_size(settings, sessions, args.rounds, probe),
        }
    profile = profile_backup(settings)
    print(f"\n{'sessions':>9} {'data':>10} {'archive':>10} {'ratio':>6} {'backup':>8} {'verify':>8} {'restore':>8}")
    for result in results.values():
        print(
            f"{result['sessions']:9,} {result['data_bytes']['total'] / MIB:6.1f} MiB"
            f" {result['archive_bytes'] / MIB:6.1f} MiB"
            f" {result['ratio']:6.1f} {result['backup_s']['median']:6.1f} s {result['verify_s']['median']:6.1f} s"
            f" {result['restore_s']['median']:6.1f} s   (RSS {result['rss_before_backup_mib']['median']:.0f} MiB,"
            f" peak {result['backup_peak_rss_mib']['median']:.0f} MiB during the backup)"
        )
    print(f"one backup at {max(args.sessions):,} sessions under cProfile, {profile['total_s']:.1f} s:")
    for label, seconds in profile["phases_s"].items():
        indent = "    " if label.startswith("of which") else "  "
        print(f"{indent}{label:<{64 - len(indent)}} {seconds:6.1f} s")
    report = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "templates": args.templates,
        "turns": args.turns,
        "memories_per_template": points,
        "rounds": args.rounds,
        "sizes": results,
        "profile_at_largest": profile,
    }
    correct = all(
        result["filled_opens"]["correct"] and result["restored_opens"]["correct"] for result in results.values()
    )
    return report, 0 if correct else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1_000, 10_000], help="sizes measured, in turn")
    parser.add_argument("--templates", type=int, default=4, help="real sessions the others copy")
    parser.add_argument("--turns", type=int, default=4, help="text turns of each template, each a fact")
    parser.add_argument("--rounds", type=int, default=3, help="backups, verifications and restores at each size")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if min(args.sessions) < args.templates:
        parser.error("--sessions must be at least --templates")
    return run_benchmark(
        "backup_bench", lambda tmp, cleanup: run(tmp, cleanup, args), json_path=args.json, errors=(BackupError,)
    )


if __name__ == "__main__":
    sys.exit(main())
