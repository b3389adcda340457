"""The targets the edge is held to (docs/benchmarks.md, "Targets"), as data: each knows its
threshold, how its value is read from a run's measurements, and how it renders its label
and verdict. A target is SKIP when a contender it needs was left out, and FAIL when one
of them answered with errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from bench.proxy.contenders import DIRECT, EDGE, EDGE_ALL_MEMORY, EDGE_ALL_REDIS, NGINX, NGINX_EQUIVALENT
from bench.proxy.memory import MemoryResult
from bench.proxy.wrk import Summary
from bench.support import GIB, MIB


@dataclass(frozen=True)
class Measurements:
    """What one run measured, for the targets and the report."""

    loaded: dict[str, Summary]  # at c=connections
    single: dict[str, Summary]  # at c=1
    memory: MemoryResult | None
    connections: int
    memory_bytes: int
    left_out: dict[str, str]  # why each contender that was not measured was left out

    def clean(self, name: str) -> bool:
        """No socket errors and no non-2xx answers, at c=N and at c=1."""
        return all(summary.clean for summary in (self.loaded.get(name), self.single.get(name)) if summary is not None)

    def added_latency_ms(self, name: str) -> float:
        """Median latency at c=1 over upstream direct's."""
        return self.single[name].p50_ms - self.single[DIRECT].p50_ms


@dataclass(frozen=True)
class Outcome:
    """A target judged: as the report prints it and the JSON keeps it."""

    name: str
    value: float | None
    shown: str
    verdict: str  # PASS, FAIL or SKIP

    def line(self) -> str:
        return f"[{self.verdict}] {self.name}: {self.shown}"


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


class Target(Protocol):
    def judge(self, run: Measurements) -> Outcome: ...


@dataclass(frozen=True)
class ThroughputShare:
    """`measured`'s req/s at c=N is at least `share` of `reference`'s."""

    measured: str
    reference: str
    share: float

    def judge(self, run: Measurements) -> Outcome:
        name = f"{self.measured} req/s >= {self.share * 100:g} % of {self.reference} (c={run.connections})"
        for contender in (self.reference, self.measured):
            if contender not in run.loaded:
                return Outcome(name, None, f"n/a ({run.left_out[contender]})", "SKIP")
        ratio = run.loaded[self.measured].requests_per_sec / run.loaded[self.reference].requests_per_sec
        problems = [contender for contender in (self.measured, self.reference) if not run.clean(contender)]
        shown = f"{ratio:.1%}" + (f" (errors from {', '.join(problems)})" if problems else "")
        return Outcome(name, ratio, shown, _verdict(ratio >= self.share and not problems))


@dataclass(frozen=True)
class AddedLatency:
    """`measured`'s median latency at c=1 exceeds upstream direct's by at most `limit_ms`."""

    measured: str
    limit_ms: float

    def judge(self, run: Measurements) -> Outcome:
        added = run.added_latency_ms(self.measured)
        return Outcome(
            f"{self.measured} added median latency <= {self.limit_ms:g} ms (c=1)",
            added,
            f"{added:.3f} ms",
            _verdict(added <= self.limit_ms and run.clean(self.measured)),
        )


@dataclass(frozen=True)
class RssGrowth:
    """The plain edge's peak RSS grows by at most `limit_mib` while the run's bytes stream in
    `direction`, and they all arrive."""

    direction: str
    limit_mib: float

    def judge(self, run: Measurements) -> Outcome:
        size = f"{run.memory_bytes / GIB:g} GiB" if run.memory_bytes >= GIB else f"{run.memory_bytes / MIB:g} MiB"
        name = f"edge RSS growth, {size} {self.direction} <= {self.limit_mib:g} MiB"
        transfer = run.memory.transfer(self.direction) if run.memory else None
        if transfer is None:
            return Outcome(name, None, "n/a (skipped)", "SKIP")
        shown = f"{transfer.growth_mib:.1f} MiB" + ("" if transfer.bytes_ok else " (BYTE COUNT WRONG)")
        return Outcome(
            name, transfer.growth_mib, shown, _verdict(transfer.growth_mib <= self.limit_mib and transfer.bytes_ok)
        )


TARGETS: tuple[Target, ...] = (
    ThroughputShare(EDGE, NGINX, 0.12),
    AddedLatency(EDGE, 0.35),
    RssGrowth("upload", 32.0),
    RssGrowth("download", 32.0),
    ThroughputShare(EDGE_ALL_MEMORY, NGINX_EQUIVALENT, 0.10),
    ThroughputShare(EDGE_ALL_REDIS, NGINX_EQUIVALENT, 0.06),
)
