"""What a hung provider costs a turn, with the app's default budgets and policies.

1. starts one provider simulator (`python -m sim`, both providers at its address, as
   `make run` has it) and the app (`python -m app`, `ENVIRONMENT=development`, no `APP_*`
   setting of the turn budgets or outbound policies: the defaults), on free loopback ports;
2. `--runs` times over, takes one turn in each case, timing it as a client sees it:
   - `healthy`: a text turn, nothing wrong;
   - `speech hung`: the next speech synthesis never answers (`{"hang": true}`): the turn
     must come back as a text reply (`degraded: ["speech"]`);
   - `model hung`: the next chat completion never answers: 503 `reply_unavailable`;
   - `transcription hung`: a voice turn whose transcription never answers: 503
     `transcription_unavailable`;
   and checks the answer is that one, and that the app hung up on the hung call (the
   simulator counts it 499);
3. prints the median and the longest turn of each case, and PASS/FAIL against the
   targets: a hung speech synthesis or a hung model answered within 10 s.

Exit status: 0, 1 when a target is missed, 2 when the benchmark could not run, 130 when
interrupted. Run: `.venv/bin/python bench/turn_budget_bench.py [--runs 2 --json PATH]`
(about 25 s a run). Results are in docs/resilience.md#a-turns-time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import BenchError, Service, clean_env, free_port, log, machine, run_benchmark

TARGETS_S = {"speech hung": 10.0, "model hung": 10.0}
API = "/api/v1"


def wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(int(seconds * rate) * 2))
    return buffer.getvalue()


def services(tmp: Path) -> tuple[Service, Service]:
    sim_port, app_port = free_port(), free_port()
    prefixes = ("APP_", "SIM_", "GROQ_", "ELEVENLABS_", "OTEL_", "EDGE_")
    sim = Service(
        "sim",
        [sys.executable, "-m", "sim"],
        sim_port,
        tmp / "sim.log",
        clean_env(
            prefixes,
            {
                "SIM_HOST": "127.0.0.1",
                "SIM_PORT": str(sim_port),
                "SIM_SPEECH_ENGINE": "tone",
                "SIM_MP3_ENCODER": "silent",
            },
        ),
        "/_sim/health",
    )
    app = Service(
        "app",
        [sys.executable, "-m", "app"],
        app_port,
        tmp / "app.log",
        clean_env(
            prefixes,
            {
                "ENVIRONMENT": "development",
                "APP_HOST": "127.0.0.1",
                "APP_PORT": str(app_port),
                "APP_DATA_DIR": str(tmp / "data"),
                "APP_LOG_LEVEL": "warning",
                "GROQ_BASE_URL": f"http://127.0.0.1:{sim_port}/openai/v1",
                "ELEVENLABS_BASE_URL": f"http://127.0.0.1:{sim_port}",
                "GROQ_API_KEY": "bench",
                "ELEVENLABS_API_KEY": "bench",
            },
        ),
        f"{API}/ready",
    )
    return sim, app


class Turns:
    def __init__(self, sim: Service, app: Service) -> None:
        self.sim = httpx.Client(base_url=sim.url, trust_env=False, timeout=10)
        self.app = httpx.Client(base_url=app.url, trust_env=False, timeout=120)
        self.session_id = self.app.post(f"{API}/sessions").json()["session_id"]

    def close(self) -> None:
        self.sim.close()
        self.app.close()

    def hang(self, route: str) -> None:
        response = self.sim.post("/_sim/faults", json={"route": route, "hang": True, "times": 1})
        if response.status_code != 201:
            raise BenchError(f"the simulator refused the hang fault: {response.text}")

    def hung_up_on(self, route: str) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.sim.get("/_sim/calls").json()[route]["statuses"].get("499", 0) >= 1:
                return True
            time.sleep(0.05)
        return False

    def text(self) -> httpx.Response:
        return self.app.post(f"{API}/sessions/{self.session_id}/turns", json={"text": "Are you there?"})

    def voice(self) -> httpx.Response:
        files = {"audio": ("speech.wav", wav(), "audio/wav")}
        return self.app.post(f"{API}/sessions/{self.session_id}/turns", files=files)


def expect(response: httpx.Response, status: int, code: str | None = None, degraded: list[str] | None = None) -> None:
    if response.status_code != status:
        raise BenchError(f"expected {status}, got {response.status_code}: {response.text[:200]}")
    body = response.json()
    if code is not None and body["error"]["code"] != code:
        raise BenchError(f"expected {code}, got {body}")
    if degraded is not None and body["degraded"] != degraded:
        raise BenchError(f"expected degraded {degraded}, got {body}")


def cases(turns: Turns) -> dict[str, tuple[str | None, Callable[[], httpx.Response], Callable[[httpx.Response], None]]]:
    """Per case: the route that hangs, the turn, and the check of its answer."""
    return {
        "healthy": (None, turns.text, lambda response: expect(response, 200, degraded=[])),
        "speech hung": ("speech", turns.text, lambda response: expect(response, 200, degraded=["speech"])),
        "model hung": ("chat", turns.text, lambda response: expect(response, 503, "reply_unavailable")),
        "transcription hung": (
            "transcribe",
            turns.voice,
            lambda response: expect(response, 503, "transcription_unavailable"),
        ),
    }


def run(args: argparse.Namespace, tmp: Path, cleanup: contextlib.ExitStack) -> tuple[dict[str, Any], int]:
    sim, app = services(tmp)
    for service in (sim, app):
        service.start()
        cleanup.callback(service.stop)
        service.wait_ready()
    log(f"simulator on :{sim.port}, app on :{app.port} (default budgets and policies)")
    turns = Turns(sim, app)
    cleanup.callback(turns.close)
    seconds: dict[str, list[float]] = {}
    for run_number in range(args.runs):
        for name, (route, take, check) in cases(turns).items():
            if route is not None:
                turns.sim.delete("/_sim/calls")  # counts from zero: the 499 is this turn's
                turns.hang(route)
            started = time.monotonic()
            response = take()
            elapsed = time.monotonic() - started
            check(response)
            if route is not None and not turns.hung_up_on(route):
                raise BenchError(f"{name}: the app never hung up on the hung call")
            seconds.setdefault(name, []).append(elapsed)
            log(f"run {run_number + 1}, {name}: {elapsed:.2f} s")
    summary = {
        name: {"median_s": round(statistics.median(values), 2), "max_s": round(max(values), 2)}
        for name, values in seconds.items()
    }
    passed = all(summary[name]["max_s"] < target for name, target in TARGETS_S.items())
    print(f"\n{'case':<20}{'median':>10}{'longest':>10}   target")
    for name, spread in summary.items():
        target = TARGETS_S.get(name)
        verdict = "" if target is None else f"< {target:g} s {'PASS' if spread['max_s'] < target else 'FAIL'}"
        print(f"{name:<20}{spread['median_s']:>9.2f}s{spread['max_s']:>9.2f}s   {verdict}")
    report = {"machine": machine(), "runs": args.runs, "summary": summary, "seconds": seconds}
    return report, 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="turns per case (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the servers' logs")
    args = parser.parse_args(argv)
    return run_benchmark(
        "turn_budget_bench",
        lambda tmp, cleanup: run(args, tmp, cleanup),
        json_path=args.json,
        keep_tmp=args.keep_tmp,
        errors=(httpx.HTTPError, KeyError, ValueError),
    )


if __name__ == "__main__":
    sys.exit(main())
