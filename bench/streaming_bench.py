"""The streaming turn against the JSON turn: time to first audio (docs/benchmarks.md,
"Streaming turns: time to first audio").

1. starts two provider simulators (`python -m sim`, one answering as Groq, one as
   ElevenLabs) with `SIM_PROFILE=realistic` (the providers' own times,
   docs/simulator.md#latency-profiles; no `SIM_REALISTIC_*` override), the tone engine and
   silent MP3s (the same audio on every machine, no encoder's CPU), the app (`python -m app`,
   its defaults: embedded stores in its own temporary `APP_DATA_DIR`, memory on with the
   default embedder) and the edge in front of it (`python -m edge`: the shipped policy file
   without its rate limits, `EDGE_RATE_LIMIT_DEFAULT=off`), all on loopback, all stopped at
   the end (also on Ctrl-C and SIGTERM). The per-client caps of the edge
   (`EDGE_MAX_EXCHANGES_PER_CLIENT`, 16) and the ElevenLabs plan's concurrency (3: the
   simulator's `SIM_ELEVENLABS_MAX_CONCURRENT` and the app's own bulkhead,
   `APP_OUTBOUND_ELEVENLABS__MAX_CONCURRENCY`) are raised to `--speech-concurrency`: every
   session here comes from one address, and the plan's limit is not what is measured;
2. takes turns through the edge in `--rounds` rounds, each a block of 1 session and a block
   of 20 concurrent ones (`--levels`; the order alternating by round). Each session, a new
   one per block, the block's starting spread over 1 s, is a client of its own (a thread,
   keep-alive `http.client`) doing its turns back to back `--pause-ms` apart (a person
   listening): `--pairs` pairs of text turns and pairs of voice turns (a 3-second WAV), each
   pair one streaming turn (`Accept: text/event-stream`) and one JSON turn of the same
   input, which comes first
   alternating by round, session and pair, after an untimed opening turn with a fact (so
   that every measured turn's recall has a memory to search). One untimed round of one pair
   first;
3. measures per turn the time from the request's start to the first audio: for the streaming
   turn the arrival of the first `audio` event (a whole sentence's MP3, decodable on its
   own); for the JSON turn the first byte of the audio body fetched from `audio_url` right
   after the JSON answer. Its **overhead** is that time minus the provider times on its
   critical path, computed from the simulator's profile figures for the app's default
   models (sim/latency.py) and what the turn actually said:
   - streaming: transcription (voice: the fixed overhead + 3 s / the speed factor) + time to
     first token + the first sentence's tokens (below) / tokens per second + time to first
     audio byte + the first sentence's synthesis (its audio
     seconds, frames * 1152 / sample rate of the MP3 received, / the synthesis speed): the
     app sends a sentence's audio once it has it whole;
   - JSON: transcription + time to first token + the whole reply's tokens / tokens per second
     + time to first byte + the whole reply's synthesis (both calls unstreamed);
   the first sentence is found by the app's own splitter (app/workflow/sentences.py) fed the
   `reply` deltas as they came, and its tokens counted up to the piece that completed it
   (the splitter waits for the character after the sentence's whitespace; within one token
   of ceil(chars / 4)). The simulator sends a stream's first audio chunk (up to 4 KiB of
   whole frames) at the TTFB and the rest as synthesised, so that chunk's audio is not
   counted as synthesis time. For streaming turns the overhead is also split at the
   `transcript` event and the first `reply` delta (each part minus its provider time);
4. for where the time goes: each turn's time outside the app's graph run (answered minus
   its `timings_ms.total`: the edge, HTTP, session reads, the wait for the session's
   previous work after its answer), each process's CPU per turn (`/proc/<pid>/stat`) and the
   app's mean time per stage (its `app_turn_stage_duration_seconds` on `APP_METRICS_PORT`),
   per level; `--app-setting APP_NAME=VALUE` changes an app setting and `--profile-app PATH`
   runs the app under cProfile, both for diagnosis only;
5. prints p50/p95 per level, kind and mode, the streaming/JSON ratio of the p50s (and what
   it would be with no overhead: the provider times' ratio), the overheads and their parts,
   and PASS/FAIL against the goals: streaming p50 <= 0.5 x JSON p50 (text and voice, each
   level); streaming overhead p50 <= 100 ms at 1 session; streaming overhead p95 at 20
   sessions <= 1.5 x its p95 at 1 session. `--json PATH` also writes every turn.

Exit status: 0, 1 when a goal is missed, 2 when the benchmark could not run, 130 when
interrupted. Run: `.venv/bin/python bench/streaming_bench.py [--rounds 12 --json PATH]`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import math
import os
import resource
import secrets
import statistics
import sys
import time
import tomllib
import wave
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families

from app.settings import AppSettings
from app.workflow.sentences import Sentences
from bench.support import ROOT, BenchError, Service, clean_env, free_port, log, machine, percentile, run_benchmark
from edge.policy import load_policy
from sim.elevenlabs import STREAM_CHUNK_BYTES
from sim.latency import CHAT_FIGURES, SPEECH_FIGURES, TRANSCRIPTION_SPEED_FACTORS
from sim.mp3 import frame_chunks
from sim.settings import SimSettings

DEFAULTS = {name: spec.default for name, spec in AppSettings.model_fields.items()}
SHIPPED_POLICY = ROOT / "config" / "edge-policy.toml"
API = "/api/v1"
RECORDING_SECONDS = 3.0
STAGGER_S = 1.0  # a block's sessions start spread over about one turn
CHARACTERS_PER_TOKEN = 4  # as the simulator counts a reply's tokens (sim/groq.py)
STREAMING, JSON_TURN = "streaming", "JSON"
MODES = (STREAMING, JSON_TURN)
KINDS = ("text", "voice")
# The goals (issue 15, item 6).
RATIO_GOAL = 0.5  # streaming p50 / JSON p50
OVERHEAD_P50_GOAL_MS = 100.0  # streaming overhead p50 at one session
P95_GROWTH_GOAL = 1.5  # streaming overhead p95 at the highest level / at one session
# Text turns, one a pair: statements about the speaker and questions, each answered in two
# sentences by the simulator (sim/replies.py), the first of different lengths.
OPENING = "My name is Sam and I live in Porto"
TEXT_SCRIPT = (
    "I love hiking with my dog on Sunday mornings",
    "What do you think about the weather?",
    "My sister lives in Lisbon and teaches music",
    "How are you today?",
    "I'm a nurse at the city hospital",
    "Who are you?",
)


@dataclass(frozen=True)
class Figures:
    """The simulator's realistic profile for the app's default models, in seconds."""

    ttft: float
    tokens_per_second: float
    transcription: float  # of the recording
    ttfb: float
    synthesis_speed: float  # seconds of audio per second

    @classmethod
    def of_defaults(cls) -> Figures:
        ttft_ms, tokens_per_second = CHAT_FIGURES[str(DEFAULTS["chat_model"])]
        ttfb_ms, synthesis_speed = SPEECH_FIGURES[str(DEFAULTS["speech_model"])]
        overhead_ms = SimSettings.model_fields["realistic_transcription_overhead_ms"].default
        factor = TRANSCRIPTION_SPEED_FACTORS[str(DEFAULTS["transcription_model"])]
        return cls(
            ttft_ms / 1000,
            tokens_per_second,
            overhead_ms / 1000 + RECORDING_SECONDS / factor,
            ttfb_ms / 1000,
            synthesis_speed,
        )

    def tokens(self, count: int) -> float:
        """How long after the first token (at the TTFT) the next `count` come."""
        return count / self.tokens_per_second

    def speech(self, audio_seconds: float) -> float:
        return self.ttfb + audio_seconds / self.synthesis_speed

    def streamed_speech(self, audio: bytes) -> float:
        """When a stream of `audio` has all arrived: the simulator sends its first chunk (up
        to STREAM_CHUNK_BYTES of whole frames) at the TTFB, and the last when the audio after
        that first chunk is synthesised too."""
        first = frame_chunks(audio, STREAM_CHUNK_BYTES)[0]
        return self.ttfb + (mp3_seconds(audio) - mp3_seconds(first)) / self.synthesis_speed


def pieces(chars: int) -> int:
    """The stream pieces (one token each, as the simulator sends a reply) `chars` fill."""
    return math.ceil(chars / CHARACTERS_PER_TOKEN)


# -- audio --------------------------------------------------------------------------------------

_MPEG1_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_MPEG2_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_RATES = {0b11: (44100, 48000, 32000), 0b10: (22050, 24000, 16000)}


def mp3_seconds(data: bytes) -> float:
    """The duration of a Layer III stream: its frames, walked header to header, times the
    samples per frame (1152 for MPEG-1, 576 for MPEG-2) over the sample rate."""
    offset = frames = 0
    rate = samples = 0
    while offset + 4 <= len(data):
        b1, b2 = data[offset + 1], data[offset + 2]
        version, layer = (b1 >> 3) & 3, (b1 >> 1) & 3
        if data[offset] != 0xFF or b1 & 0xE0 != 0xE0 or version not in _RATES or layer != 0b01:
            raise BenchError(f"an audio chunk is not an MPEG Layer III stream at byte {offset}")
        mpeg1 = version == 0b11
        kbps = (_MPEG1_KBPS if mpeg1 else _MPEG2_KBPS)[b2 >> 4]
        rate, samples = _RATES[version][(b2 >> 2) & 3], 1152 if mpeg1 else 576
        offset += samples // 8 * kbps * 1000 // rate + ((b2 >> 1) & 1)
        frames += 1
    if not frames or offset != len(data):
        raise BenchError("an audio chunk does not end on a frame boundary")
    return frames * samples / rate


def recording(seed: int) -> bytes:
    """A 16-bit mono 16 kHz WAV of RECORDING_SECONDS, its samples varied by `seed`."""
    rate = 16000
    frames = int(RECORDING_SECONDS * rate)
    pattern = bytes((n * 7 + seed) % 256 for n in range(4096))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((pattern * (frames * 2 // len(pattern) + 1))[: frames * 2])
    return buffer.getvalue()


def multipart(audio: bytes) -> tuple[bytes, str]:
    boundary = secrets.token_hex(16)
    head = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="audio"; filename="speech.wav"\r\n'
        "content-type: audio/wav\r\n\r\n"
    ).encode()
    return head + audio + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# -- the servers --------------------------------------------------------------------------------


def service_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any setting of the caller's for the servers, plus `extra`."""
    return clean_env(("APP_", "SIM_", "GROQ_", "ELEVENLABS_", "OTEL_", "EDGE_", "SENTRY_"), extra)


def sim_service(name: str, tmp: Path, speech_concurrency: int) -> Service:
    port = free_port()
    env = service_env(
        {
            "SIM_HOST": "127.0.0.1",
            "SIM_PORT": str(port),
            "SIM_LOG_LEVEL": "warning",
            "SIM_PROFILE": "realistic",
            "SIM_GROQ_REQUESTS_PER_MINUTE": str(10**9),
            "SIM_GROQ_TOKENS_PER_MINUTE": str(10**12),
            "SIM_ELEVENLABS_MAX_CONCURRENT": str(speech_concurrency),
            "SIM_SPEECH_ENGINE": "tone",
            "SIM_MP3_ENCODER": "silent",
        }
    )
    return Service(name, [sys.executable, "-m", "sim"], port, tmp / f"{name}.log", env, "/_sim/health")


def app_service(
    tmp: Path,
    groq: Service,
    elevenlabs: Service,
    speech_concurrency: int,
    metrics_port: int,
    settings: dict[str, str],
    profile: Path | None,
) -> Service:
    port = free_port()
    env = service_env(
        {
            **settings,
            "ENVIRONMENT": "development",
            "APP_HOST": "127.0.0.1",
            "APP_PORT": str(port),
            "APP_DATA_DIR": str(tmp / "app-data"),
            "APP_LOG_LEVEL": "warning",
            "APP_METRICS_PORT": str(metrics_port),
            "APP_OUTBOUND_ELEVENLABS__MAX_CONCURRENCY": str(speech_concurrency),
            "GROQ_BASE_URL": f"http://127.0.0.1:{groq.port}/openai/v1",
            "ELEVENLABS_BASE_URL": f"http://127.0.0.1:{elevenlabs.port}",
            "GROQ_API_KEY": "bench",
            "ELEVENLABS_API_KEY": "bench",
        }
    )
    # cProfile writes its file when the app exits on the SIGTERM of the clean-up.
    profiled = [] if profile is None else ["-m", "cProfile", "-o", str(profile.resolve())]
    return Service("app", [sys.executable, *profiled, "-m", "app"], port, tmp / "app.log", env, f"{API}/ready")


def unlimited_policy(tmp: Path) -> Path:
    """The shipped policy file without its `rate_limit` lines (its body limits and redaction
    stay), checked to have none left."""
    lines = SHIPPED_POLICY.read_text().splitlines()
    path = tmp / "edge-policy.toml"
    path.write_text("\n".join(line for line in lines if not line.strip().startswith("rate_limit")) + "\n")
    tomllib.loads(path.read_text())
    if any(rule.rate_limit is not None for rule in load_policy(path).routes):
        raise BenchError(f"{path}: a rate limit is left")
    return path


def edge_service(tmp: Path, app: Service, caps: int) -> Service:
    port = free_port()
    env = service_env(
        {
            "ENVIRONMENT": "development",
            "EDGE_UPSTREAM_URL": app.url,
            "EDGE_HOST": "127.0.0.1",
            "EDGE_PORT": str(port),
            "EDGE_POLICY_FILE": str(unlimited_policy(tmp)),
            "EDGE_RATE_LIMIT_DEFAULT": "off",
            "EDGE_LOG_LEVEL": "warning",
            # Every session here comes from 127.0.0.1: one client to the edge.
            "EDGE_MAX_CONNECTIONS_PER_CLIENT": str(caps),
            "EDGE_MAX_EXCHANGES_PER_CLIENT": str(caps),
        }
    )
    return Service("edge", [sys.executable, "-m", "edge"], port, tmp / "edge.log", env, f"{API}/ready")


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


STAGE_SERIES = "app_turn_stage_duration_seconds"


def stage_totals(metrics_port: int) -> dict[str, tuple[float, float]]:
    """(seconds, count) per stage of the app's turns so far, from its own histogram."""
    connection = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != STAGE_SERIES:
            continue
        for sample in family.samples:
            if sample.name == f"{STAGE_SERIES}_sum":
                sums[sample.labels["stage"]] = sample.value
            elif sample.name == f"{STAGE_SERIES}_count":
                counts[sample.labels["stage"]] = sample.value
    return {stage: (sums[stage], counts.get(stage, 0.0)) for stage in sums}


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- turns --------------------------------------------------------------------------------------


@dataclass
class Turn:
    level: int
    round: int
    session: int
    position: int  # among the session's measured turns; 0 follows the opening turn
    kind: str
    mode: str
    first_audio_ms: float  # request start -> first audio event (streaming) / first audio byte (JSON)
    provider_ms: float  # the provider times on that path, from the profile's figures
    transcript_ms: float | None  # streaming: request start -> the transcript event
    first_delta_ms: float | None  # streaming: -> the first reply delta
    done_ms: float  # streaming: -> the done event; JSON: -> the JSON answer
    # done_ms minus the app's own timings_ms.total (its graph run): the edge, HTTP, session
    # reads and the wait for the session's previous turn's work after its answer.
    outside_graph_ms: float
    recall_ms: float  # the app's timings_ms.recall: the query's embedding and the search
    spoken_chars: int  # the text whose audio is the first audio: the first sentence, or the reply
    spoken_audio_s: float  # its audio's duration
    reply_chars: int
    sentences: int

    @property
    def overhead_ms(self) -> float:
        return self.first_audio_ms - self.provider_ms


class Client:
    """One session's client: keep-alive `http.client` to the edge."""

    def __init__(self, port: int, figures: Figures) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.figures = figures

    def close(self) -> None:
        self.connection.close()

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> http.client.HTTPResponse:
        self.connection.request(method, path, body=body, headers=headers)
        return self.connection.getresponse()

    def create_session(self) -> str:
        response = self.send("POST", f"{API}/sessions", b"{}", {"content-type": "application/json"})
        body = response.read()
        if response.status != 201:
            raise BenchError(f"creating a session answered {response.status}: {body[:200]!r}")
        return str(json.loads(body)["session_id"])

    def streaming(self, session_id: str, body: bytes, content_type: str, voice: bool) -> dict[str, Any]:
        headers = {"content-type": content_type, "accept": "text/event-stream"}
        started = time.perf_counter()
        response = self.send("POST", f"{API}/sessions/{session_id}/turns", body, headers)
        if response.status != 200 or not response.getheader("content-type", "").startswith("text/event-stream"):
            raise BenchError(f"a streaming turn answered {response.status}: {response.read()[:300]!r}")
        at: dict[str, float] = {}
        splitter, sentences = Sentences(), []
        received = 0  # the reply's characters so far
        first_complete: int | None = None  # the piece after which the first sentence was complete
        first_audio = b""
        audio_events = 0
        done: dict[str, Any] | None = None
        name = ""
        while line := response.readline():
            now = time.perf_counter()
            if line.startswith(b"event: "):
                name = line[7:].strip().decode()
                continue
            if not line.startswith(b"data: "):
                continue
            at.setdefault(name, now)
            if name == "reply":
                delta = json.loads(line[6:])["delta"]
                received += len(delta)
                sentences += splitter.push(delta)
                if sentences and first_complete is None:
                    first_complete = pieces(received) - 1
            elif name == "audio":
                audio_events += 1
                if audio_events == 1:
                    first_audio = base64.b64decode(json.loads(line[6:])["data"])
            elif name == "done":
                done = json.loads(line[6:])
            elif name == "error":
                raise BenchError(f"a streaming turn ended with an error event: {json.loads(line[6:])['error']['code']}")
        if first_complete is None:
            # The first sentence is the whole reply: complete with the stream's last event,
            # one token time after its last piece.
            first_complete = pieces(received)
        sentences += splitter.end()
        if done is None or done["degraded"] or not first_audio:
            raise BenchError(f"a streaming turn without done, degraded or without audio: {done and done['degraded']}")
        if len(sentences) != audio_events:
            raise BenchError(f"{len(sentences)} sentences found in the reply, {audio_events} audio events")
        provider = (self.figures.transcription if voice else 0.0) + self.figures.ttft
        provider += self.figures.tokens(first_complete) + self.figures.streamed_speech(first_audio)
        return {
            "first_audio_ms": (at["audio"] - started) * 1000,
            "provider_ms": provider * 1000,
            "transcript_ms": (at["transcript"] - started) * 1000,
            "first_delta_ms": (at["reply"] - started) * 1000,
            "done_ms": (at["done"] - started) * 1000,
            "outside_graph_ms": (at["done"] - started) * 1000 - float(done["timings_ms"]["total"]),
            "recall_ms": float(done["timings_ms"].get("recall", 0.0)),
            "spoken_chars": len(sentences[0]),
            "spoken_audio_s": mp3_seconds(first_audio),
            "reply_chars": len(done["reply"]),
            "sentences": len(sentences),
        }

    def json_turn(self, session_id: str, body: bytes, content_type: str, voice: bool) -> dict[str, Any]:
        started = time.perf_counter()
        response = self.send("POST", f"{API}/sessions/{session_id}/turns", body, {"content-type": content_type})
        answer = response.read()
        answered = time.perf_counter()
        if response.status != 200:
            raise BenchError(f"a JSON turn answered {response.status}: {answer[:300]!r}")
        result = json.loads(answer)
        if result["degraded"] or not result["audio_url"]:
            raise BenchError(f"a degraded JSON turn: {result['degraded']}")
        audio = self.send("GET", urlsplit(result["audio_url"]).path, None, {})
        first = audio.read(1)
        first_byte = time.perf_counter()
        data = first + audio.read()
        if audio.status != 200 or not data:
            raise BenchError(f"the reply audio answered {audio.status}")
        audio_s = mp3_seconds(data)
        reply = str(result["reply"])
        provider = (self.figures.transcription if voice else 0.0) + self.figures.ttft
        # Unstreamed, the reply comes when its last token would have: TTFT + its tokens / speed.
        provider += self.figures.tokens(pieces(len(reply))) + self.figures.speech(audio_s)
        return {
            "first_audio_ms": (first_byte - started) * 1000,
            "provider_ms": provider * 1000,
            "transcript_ms": None,
            "first_delta_ms": None,
            "done_ms": (answered - started) * 1000,
            "outside_graph_ms": (answered - started) * 1000 - float(result["timings_ms"]["total"]),
            "recall_ms": float(result["timings_ms"].get("recall", 0.0)),
            "spoken_chars": len(reply),
            "spoken_audio_s": audio_s,
            "reply_chars": len(reply),
            "sentences": 0,
        }


@dataclass(frozen=True)
class Plan:
    level: int
    round: int
    pairs: int
    pause_s: float
    timed: bool


def run_session(port: int, figures: Figures, plan: Plan, number: int) -> list[Turn]:
    """One session's turns: `plan.pairs` pairs of each kind, `plan.pause_s` apart, the
    first after a stagger: a block's sessions start spread over STAGGER_S, as people
    arriving one by one would, not in one burst."""
    client = Client(port, figures)
    turns: list[Turn] = []
    try:
        time.sleep(STAGGER_S * number / plan.level)
        session_id = client.create_session()
        # An untimed first turn whose fact the app remembers: every measured turn's recall
        # then embeds its query and searches (on a session with no memory it does neither).
        client.json_turn(session_id, json.dumps({"text": OPENING}).encode(), "application/json", False)
        for pair in range(plan.pairs):
            for kind in KINDS if pair % 2 == 0 else KINDS[::-1]:
                voice = kind == "voice"
                if voice:
                    body, content_type = multipart(recording(plan.round * 131 + number * 7 + pair))
                else:
                    text = TEXT_SCRIPT[(plan.round + number + pair) % len(TEXT_SCRIPT)]
                    body, content_type = json.dumps({"text": text}).encode(), "application/json"
                # Not the script's parity: which mode goes first is independent of the message.
                modes = MODES if (plan.round // 2 + number + pair) % 2 == 0 else MODES[::-1]
                for mode in modes:
                    time.sleep(plan.pause_s)
                    take = client.streaming if mode == STREAMING else client.json_turn
                    measured = take(session_id, body, content_type, voice)
                    turns.append(Turn(plan.level, plan.round, number, len(turns), kind, mode, **measured))
    finally:
        client.close()
    return turns if plan.timed else []


@dataclass
class Usage:
    """Wall and CPU seconds spent in a level's blocks, by process."""

    wall_s: float = 0.0
    turns: int = 0  # taken, the untimed opening turns included: the CPU is theirs too
    cpu_s: dict[str, float] = field(default_factory=dict)
    stages: dict[str, tuple[float, float]] = field(default_factory=dict)  # (seconds, count) per stage

    def add(self, wall_s: float, turns: int, cpu_s: dict[str, float], stages: dict[str, tuple[float, float]]) -> None:
        self.wall_s += wall_s
        self.turns += turns
        self.cpu_s = {name: self.cpu_s.get(name, 0.0) + value for name, value in cpu_s.items()}
        for stage, (seconds, count) in stages.items():
            had = self.stages.get(stage, (0.0, 0.0))
            self.stages[stage] = (had[0] + seconds, had[1] + count)


def run_block(
    port: int, metrics_port: int, figures: Figures, plan: Plan, services: list[Service], usage: dict[int, Usage]
) -> list[Turn]:
    """A block's sessions at once; its wall time, each process's CPU and the app's stage
    times added to `usage` (the work after the last answers included: the app is idle again
    before the next block, which waits for the turns' ends and the pauses)."""

    def cpu() -> dict[str, float]:
        return {**{s.name: cpu_seconds(s.pid) for s in services}, "bench client": own_cpu_seconds()}

    before, stages_before, began = cpu(), stage_totals(metrics_port), time.perf_counter()
    with ThreadPoolExecutor(max_workers=plan.level) as pool:
        futures = [pool.submit(run_session, port, figures, plan, number) for number in range(plan.level)]
        turns = [turn for future in futures for turn in future.result()]
    wall = time.perf_counter() - began
    time.sleep(plan.pause_s)  # the last turns' work after the answer, as between a session's turns
    after, stages_after = cpu(), stage_totals(metrics_port)
    if plan.timed:
        stages = {
            stage: (seconds - stages_before.get(stage, (0.0, 0.0))[0], count - stages_before.get(stage, (0.0, 0.0))[1])
            for stage, (seconds, count) in stages_after.items()
        }
        used = {name: after[name] - before[name] for name in after}
        usage[plan.level].add(wall, len(turns) + plan.level, used, stages)
    return turns


# -- the report ---------------------------------------------------------------------------------


def spread(values: Iterable[float]) -> dict[str, float]:
    data = list(values)
    return {
        "p50": round(statistics.median(data), 1),
        "p95": round(percentile(data, 0.95), 1),
        "min": round(min(data), 1),
        "max": round(max(data), 1),
        "n": len(data),
    }


# The streaming turn's first audio split at its events: (label, time of the part, its provider time).
Part = tuple[str, Callable[[Turn, Figures], float], Callable[[Turn, Figures], float]]
PARTS: tuple[Part, ...] = (
    (
        "to the transcript event (voice: incl. transcription)",
        lambda t, f: t.transcript_ms or 0.0,
        lambda t, f: f.transcription * 1000 if t.kind == "voice" else 0.0,
    ),
    (
        "transcript -> first reply delta (recall, TTFT)",
        lambda t, f: (t.first_delta_ms or 0.0) - (t.transcript_ms or 0.0),
        lambda t, f: f.ttft * 1000,
    ),
    (
        "first delta -> first audio (tokens, TTFB, synthesis)",
        lambda t, f: t.first_audio_ms - (t.first_delta_ms or 0.0),
        lambda t, f: (t.provider_ms / 1000 - f.ttft - (f.transcription if t.kind == "voice" else 0.0)) * 1000,
    ),
)


def summarise(turns: list[Turn], figures: Figures, usage: dict[int, Usage]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for level in sorted({t.level for t in turns}):
        for kind in KINDS:
            for mode in MODES:
                chosen = [t for t in turns if (t.level, t.kind, t.mode) == (level, kind, mode)]
                cell: dict[str, Any] = {
                    "first_audio_ms": spread(t.first_audio_ms for t in chosen),
                    "provider_ms": spread(t.provider_ms for t in chosen),
                    "overhead_ms": spread(t.overhead_ms for t in chosen),
                    "done_ms": spread(t.done_ms for t in chosen),
                    "outside_graph_ms": spread(t.outside_graph_ms for t in chosen),
                    "recall_ms": spread(t.recall_ms for t in chosen),
                    "spoken_chars": spread(t.spoken_chars for t in chosen),
                    "spoken_audio_s": spread(t.spoken_audio_s for t in chosen),
                }
                if mode == STREAMING:
                    cell["parts_ms"] = {label: spread(part(t, figures) for t in chosen) for label, part, _ in PARTS}
                    cell["parts_overhead_ms"] = {
                        label: spread(part(t, figures) - provider(t, figures) for t in chosen)
                        for label, part, provider in PARTS
                    }
                cells[f"{level} {kind} {mode}"] = cell
    per_level: dict[str, Any] = {}
    for level, used in usage.items():
        count, cpu = used.turns, used.cpu_s
        per_level[str(level)] = {
            "stage_mean_ms": {
                stage: round(seconds * 1000 / calls, 1) for stage, (seconds, calls) in used.stages.items() if calls
            },
            "turns_taken": count,
            "wall_s": round(used.wall_s, 1),
            "cpu_ms_per_turn": {name: round(value * 1000 / count, 1) for name, value in cpu.items()},
            "cpu_busy_share": round(sum(cpu.values()) / (used.wall_s * len(os.sched_getaffinity(0))), 3),
        }
    first_turns = {
        str(level): {
            label: spread(
                t.overhead_ms for t in turns if t.level == level and t.mode == STREAMING and (t.position == 0) == first
            )
            for label, first in (("a session's first measured turn", True), ("the others", False))
        }
        for level in sorted({t.level for t in turns})
    }
    return {"cells": cells, "usage": per_level, "streaming_overhead_by_position_ms": first_turns}


def verdicts(cells: dict[str, Any], levels: list[int]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    low, high = min(levels), max(levels)
    for kind in KINDS:
        for level in levels:
            streamed, plain = cells[f"{level} {kind} {STREAMING}"], cells[f"{level} {kind} {JSON_TURN}"]
            streaming, json_p50 = streamed["first_audio_ms"]["p50"], plain["first_audio_ms"]["p50"]
            ratio = streaming / json_p50
            # What the ratio would be with no overhead at all: the providers' part of it.
            floor = streamed["provider_ms"]["p50"] / plain["provider_ms"]["p50"]
            found.append(
                {
                    "goal": f"{kind}, {level} session(s): streaming p50 <= {RATIO_GOAL} x JSON p50",
                    "value": f"{streaming:.0f} / {json_p50:.0f} ms = {ratio:.2f} (providers alone: {floor:.2f})",
                    "pass": ratio <= RATIO_GOAL,
                }
            )
        overhead = cells[f"{low} {kind} {STREAMING}"]["overhead_ms"]
        found.append(
            {
                "goal": f"{kind}, {low} session(s): streaming overhead p50 <= {OVERHEAD_P50_GOAL_MS:g} ms",
                "value": f"{overhead['p50']:.0f} ms",
                "pass": overhead["p50"] <= OVERHEAD_P50_GOAL_MS,
            }
        )
        if high != low:
            grown = cells[f"{high} {kind} {STREAMING}"]["overhead_ms"]["p95"]
            found.append(
                {
                    "goal": f"{kind}: streaming overhead p95 at {high} sessions <= {P95_GROWTH_GOAL} x at {low}",
                    "value": f"{grown:.0f} / {overhead['p95']:.0f} ms = {grown / overhead['p95']:.2f}",
                    "pass": grown <= P95_GROWTH_GOAL * overhead["p95"],
                }
            )
    return found


def format_report(report: dict[str, Any]) -> str:
    cells, args, figures = report["summary"]["cells"], report["args"], report["figures_ms"]
    out = [
        "",
        f"time to first audio through the edge, simulators at SIM_PROFILE=realistic ({report['models']}); "
        f"{args['rounds']} rounds x {args['pairs']} pair(s) of each kind per session, {args['pause_ms']} ms "
        f"between a session's turns; provider figures (ms): {figures}",
        "",
        "| sessions | turn | mode | first audio p50 / p95 | provider (profile) p50 | overhead p50 / p95 "
        "| first audio of (chars, audio s) p50 | answered (done / JSON) p50 | n |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, cell in cells.items():
        level, kind, mode = key.split(" ")
        first, overhead = cell["first_audio_ms"], cell["overhead_ms"]
        out.append(
            f"| {level} | {kind} | {mode} | {first['p50']:.0f} / {first['p95']:.0f} | "
            f"{cell['provider_ms']['p50']:.0f} | {overhead['p50']:.0f} / {overhead['p95']:.0f} | "
            f"{cell['spoken_chars']['p50']:.0f}, {cell['spoken_audio_s']['p50']:.2f} | "
            f"{cell['done_ms']['p50']:.0f} | {first['n']} |"
        )
    out += [
        "",
        "the streaming turn's first audio by part, its overhead (part minus its provider time) p50 / p95, ms:",
        "",
        "| sessions | turn | " + " | ".join(label for label, _, _ in PARTS) + " |",
        "|---:|---|" + "---:|" * len(PARTS),
    ]
    for key, cell in cells.items():
        level, kind, mode = key.split(" ")
        if mode != STREAMING:
            continue
        parts = (f"{value['p50']:.0f} / {value['p95']:.0f}" for value in cell["parts_overhead_ms"].values())
        out.append(f"| {level} | {kind} | " + " | ".join(parts) + " |")
    out += [
        "",
        "outside the app's graph run (answered minus timings_ms.total: edge, HTTP, session reads, the wait for the "
        "session's previous work after its answer), and the app's recall (timings_ms), p50 / p95, ms:",
        "",
        "| sessions | turn | "
        + " | ".join(f"outside, {mode}" for mode in MODES)
        + " | "
        + " | ".join(f"recall, {mode}" for mode in MODES)
        + " |",
        "|---:|---|" + "---:|" * 2 * len(MODES),
    ]
    for level in report["args"]["levels"]:
        for kind in KINDS:
            values = [
                cells[f"{level} {kind} {mode}"][key] for key in ("outside_graph_ms", "recall_ms") for mode in MODES
            ]
            out.append(f"| {level} | {kind} | " + " | ".join(f"{v['p50']:.0f} / {v['p95']:.0f}" for v in values) + " |")
    out.append("")
    for level, by_position in report["summary"]["streaming_overhead_by_position_ms"].items():
        described = ", ".join(f"{label} {v['p50']:.0f} / {v['p95']:.0f}" for label, v in by_position.items())
        out.append(f"streaming overhead p50 / p95 at {level} session(s), ms: {described}")
    usage = report["summary"]["usage"]
    stages = sorted({stage for used in usage.values() for stage in used["stage_mean_ms"]})
    out += [
        "",
        "| sessions | wall s | CPU busy (all cores) | CPU ms per turn by process | "
        + " | ".join(f"{stage} mean ms" for stage in stages)
        + " |",
        "|---:|---:|---:|---|" + "---:|" * len(stages),
    ]
    for level, used in usage.items():
        per_turn = ", ".join(f"{name} {value:.0f}" for name, value in used["cpu_ms_per_turn"].items())
        means = " | ".join(f"{used['stage_mean_ms'].get(stage, 0.0):.0f}" for stage in stages)
        out.append(f"| {level} | {used['wall_s']:.0f} | {used['cpu_busy_share']:.0%} | {per_turn} | {means} |")
    out.append("")
    for verdict in report["verdicts"]:
        out.append(f"{'PASS' if verdict['pass'] else 'FAIL'}  {verdict['goal']}: {verdict['value']}")
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------


def setting(value: str) -> tuple[str, str]:
    name, _, setting_value = value.partition("=")
    if not name.startswith("APP_") or not _:
        raise argparse.ArgumentTypeError(f"{value!r} is not APP_NAME=VALUE")
    return name, setting_value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time to first audio: the streaming turn against the JSON turn.")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds, each a block per level (12)")
    parser.add_argument("--pairs", type=int, default=2, help="pairs of each kind per session and block (2)")
    parser.add_argument(
        "--levels",
        type=lambda value: sorted({int(part) for part in value.split(",")}),
        default=[1, 20],
        help="concurrent sessions per block, comma-separated (1,20)",
    )
    parser.add_argument("--pause-ms", type=int, default=300, help="between a session's turns (300)")
    parser.add_argument(
        "--speech-concurrency",
        type=int,
        default=64,
        help="ElevenLabs calls in flight allowed by the simulator and the app's bulkhead, and the edge's "
        "per-client caps (64; the plan's is 3)",
    )
    parser.add_argument(
        "--app-setting",
        type=setting,
        action="append",
        default=[],
        metavar="APP_NAME=VALUE",
        help="an app setting to change, for diagnosis (repeatable; the goals are judged on the defaults)",
    )
    parser.add_argument(
        "--profile-app",
        type=Path,
        metavar="PATH",
        help="run the app under cProfile (its main thread), the profile written to PATH at the end; for diagnosis: "
        "it slows the app",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results, every turn, as JSON")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (data dir, server logs)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.pairs <= 3 or args.pause_ms < 0 or min(args.levels) < 1:
        parser.error("--rounds >= 1, --pairs 1-3 (a session stays below the summary threshold), --pause-ms >= 0")
    if args.speech_concurrency < max(args.levels):
        parser.error("--speech-concurrency below the highest level would measure the plan's limit")
    return args


def run(args: argparse.Namespace, tmp: Path, cleanup: contextlib.ExitStack) -> tuple[dict[str, Any], int]:
    figures = Figures.of_defaults()
    groq = sim_service("sim-groq", tmp, args.speech_concurrency)
    elevenlabs = sim_service("sim-elevenlabs", tmp, args.speech_concurrency)
    metrics_port = free_port()
    app = app_service(
        tmp, groq, elevenlabs, args.speech_concurrency, metrics_port, dict(args.app_setting), args.profile_app
    )
    edge = edge_service(tmp, app, args.speech_concurrency)
    services = [groq, elevenlabs, app, edge]
    for service in services:
        cleanup.callback(service.stop)
        service.start()
        service.wait_ready(120 if service is app else 60)
    log("servers: " + ", ".join(f"{s.name} on :{s.port}" for s in services))
    usage = {level: Usage() for level in args.levels}
    pause_s = args.pause_ms / 1000
    for level in args.levels:
        run_block(edge.port, metrics_port, figures, Plan(level, -1, 1, pause_s, timed=False), services, usage)
    log("warm-up done; measuring")
    load_before = os.getloadavg()
    began = time.monotonic()
    turns: list[Turn] = []
    for number in range(args.rounds):
        for level in args.levels if number % 2 == 0 else args.levels[::-1]:
            plan = Plan(level, number, args.pairs, pause_s, timed=True)
            taken = run_block(edge.port, metrics_port, figures, plan, services, usage)
            turns += taken
            streamed = [t.first_audio_ms for t in taken if t.mode == STREAMING]
            plain = [t.first_audio_ms for t in taken if t.mode == JSON_TURN]
            log(
                f"round {number + 1}/{args.rounds}, {level:>2} session(s): first audio p50 streaming "
                f"{statistics.median(streamed):.0f} ms, JSON {statistics.median(plain):.0f} ms"
            )
    for service in services:
        if service.proc is None or service.proc.poll() is not None:
            raise BenchError(f"{service.name} exited during the run:\n{service.log_tail()}")
    summary = summarise(turns, figures, usage)
    report: dict[str, Any] = {
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "machine": machine(),
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "measured_seconds": round(time.monotonic() - began, 1),
        "models": f"{DEFAULTS['chat_model']}, {DEFAULTS['transcription_model']}, {DEFAULTS['speech_model']}",
        "figures_ms": {
            "TTFT": round(figures.ttft * 1000, 1),
            "tokens/s": figures.tokens_per_second,
            "transcription (3 s)": round(figures.transcription * 1000, 1),
            "TTFB": round(figures.ttfb * 1000, 1),
            "synthesis x": figures.synthesis_speed,
        },
        "summary": summary,
        "verdicts": verdicts(summary["cells"], args.levels),
        "turns": [{**asdict(turn), "overhead_ms": round(turn.overhead_ms, 2)} for turn in turns],
    }
    print(format_report(report), flush=True)
    before, after = report["load_average_before"], report["load_average_after"]
    print(f"measured in {report['measured_seconds']:.0f} s; load average {before[0]:.2f} before, {after[0]:.2f} after")
    return report, 0 if all(verdict["pass"] for verdict in report["verdicts"]) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        "streaming_bench",
        lambda tmp, cleanup: run(args, tmp, cleanup),
        json_path=args.json,
        keep_tmp=args.keep_tmp,
        errors=(ValueError, KeyError, http.client.HTTPException),
    )


if __name__ == "__main__":
    sys.exit(main())
