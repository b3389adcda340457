"""What a person says stays out of the operators' view: a whole stack started like `make
run`, at its default log level, exporting spans to a collector and serving `/metrics`, is
searched for the words of its turns, the transcript, the reply and every capability id
(docs/metrics.md, docs/error-tracking.md). The simulator's own lines are left out: it
stands in for the providers, whose logs are not ours."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.app_support import new_port
from tests.servers import ServerThread, serve
from tests.sim_support import wav_file
from tests.telemetry_support import OtlpCollector
from tests.test_run_stack import Stack, started_stack

SAID = "My secret garden has blue tulips near the old well."
PROCESSES = ("edge", "app")


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[ServerThread, OtlpCollector]]:
    sink = OtlpCollector()
    server = serve(sink, log_config=None)
    yield server, sink
    server.stop()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, collector: tuple[ServerThread, OtlpCollector]
) -> Iterator[tuple[Stack, dict[str, int]]]:
    server, _ = collector
    ports = {process: new_port() for process in PROCESSES}
    with started_stack(
        tmp_path_factory.mktemp("privacy-stack"),
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{server.url}/v1/traces",
        OTEL_BSP_SCHEDULE_DELAY="100",
        EDGE_METRICS_PORT=str(ports["edge"]),
        APP_METRICS_PORT=str(ports["app"]),
    ) as running:
        yield running, ports


def test_no_words_of_a_conversation_reach_a_log_line_a_span_or_a_metric(
    stack: tuple[Stack, dict[str, int]], collector: tuple[ServerThread, OtlpCollector]
) -> None:
    running, ports = stack
    _, sink = collector
    with httpx.Client(base_url=running.edge_url, timeout=30, trust_env=False) as client:
        session_id = client.post("/api/v1/sessions").json()["session_id"]
        text = client.post(f"/api/v1/sessions/{session_id}/turns", json={"text": SAID})
        assert text.status_code == 200, text.text
        files = {"audio": ("turn.wav", wav_file(1.5), "audio/wav")}
        voice = client.post(f"/api/v1/sessions/{session_id}/turns", files=files)
        assert voice.status_code == 200, voice.text
        audio_url = voice.json()["audio_url"]
        assert client.get(audio_url).status_code == 200
        assert client.delete(f"/api/v1/sessions/{session_id}").status_code == 204
    scraped = [
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5, trust_env=False).text for port in ports.values()
    ]
    spans = sink.wait_for(lambda: [span for span in sink.spans() if "DELETE" in span.span.name], timeout=10)
    assert spans, "no spans exported"

    secrets_said = {
        "the words typed": SAID,
        "a fragment of them": "blue tulips",
        "the transcript": voice.json()["transcript"],
        "a reply": text.json()["reply"],
        "the other reply": voice.json()["reply"],
        "the session id": session_id,
        "the audio id": audio_url.rsplit("/", 1)[1],
    }
    lines = [json.loads(line) for line in running.output().splitlines() if line.startswith("{")]
    ours = [line for line in lines if not str(line.get("logger", "")).startswith("sim")]
    assert any(line.get("logger") == "edge.access" for line in ours), "no access lines: nothing was searched"
    assert {line["level"] for line in ours} <= {"info", "warning", "error"}, "the default level is info"
    places = {
        "log lines": "\n".join(json.dumps(line) for line in ours),
        "spans": "\n".join(str(export) for export in sink.exports),
        "metrics": "\n".join(scraped),
    }
    for place, text_of_it in places.items():
        for what, secret in secrets_said.items():
            assert secret not in text_of_it, f"{what} in the {place}"
