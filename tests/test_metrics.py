"""Prometheus metrics (docs/metrics.md): each process of a stack started like `make run`
serves `/metrics` on its own port, labelled by route templates, with no capability id in
any series; an edge with several workers is scraped once for all of them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import ContainerMemoryCollector
from common.redaction import CAPABILITY_LIKE
from tests.app_support import ApiClient, Simulators, app_settings, new_port, running_app
from tests.processes import children_of, edge_process
from tests.servers import serve, start_upstream, wait_until
from tests.sim_support import wav_file
from tests.telemetry_support import OtlpCollector
from tests.test_run_stack import Stack, started_stack
from tests.wire import WireClient, WireResponse

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[str, Samples]:
    response = httpx.get(f"{url}/metrics", timeout=5, trust_env=False)
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    found = [v for (sample, have), v in samples.items() if sample == name and wanted <= have]
    assert found, f"no {name} with {labels}: {sorted(key for key, _ in samples if key.startswith(name[:12]))}"
    return sum(found)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, str]]]:
    ports = {name: str(new_port()) for name in ("EDGE_METRICS_PORT", "APP_METRICS_PORT", "SIM_METRICS_PORT")}
    with started_stack(tmp_path_factory.mktemp("metrics-stack"), **ports) as running:
        yield running, {name.split("_")[0].lower(): f"http://127.0.0.1:{port}" for name, port in ports.items()}


def test_each_process_is_scraped_on_its_own_port_by_route_template_with_no_ids(
    stack: tuple[Stack, dict[str, str]],
) -> None:
    running, metrics = stack
    with httpx.Client(base_url=running.edge_url, timeout=30, trust_env=False) as client:
        session_id = client.post("/api/v1/sessions").json()["session_id"]
        turn = client.post(f"/api/v1/sessions/{session_id}/turns", json={"text": "My name is Ada."})
        assert turn.status_code == 200, turn.text
        files = {"audio": ("turn.wav", wav_file(2.0), "audio/wav")}
        voice = client.post(f"/api/v1/sessions/{session_id}/turns", files=files)
        assert voice.status_code == 200, voice.text
        timing = dict(part.strip().split(";dur=") for part in voice.headers["server-timing"].split(","))
        assert {"transcribe", "recall", "reply", "speak", "total"} <= set(timing), timing
        assert float(timing["total"]) >= float(timing["reply"]) > 0
        assert client.get(f"/api/v1/sessions/{session_id}").status_code == 200
        assert client.get(f"/api/v1/sessions/{'x' * 32}").status_code == 404
        # Not on the public port: the edge forwards /metrics like any path, and the app has none.
        assert client.get("/metrics").status_code == 404
    # A head the server itself refuses, before any application sees it.
    assert exchange(int(running.edge_url.rsplit(":", 1)[1]), b"NOT HTTP AT ALL\r\n\r\n").status == 400

    # The same figures in the edge's access line of the turn.
    access = [line for line in running.output().splitlines() if '"edge.access"' in line and "/turns" in line]
    assert any(f"total;dur={timing['total']}" in line for line in access), access

    edge_text, edge = scrape(metrics["edge"])
    duration = "http_server_request_duration_seconds_count"
    turns_route = {"http_request_method": "POST", "http_response_status_code": "200"}
    assert value(edge, duration, http_route="/api/v1/sessions/*/turns", **turns_route) == 2
    assert value(edge, duration, http_route="/api/v1/sessions/*/**", http_response_status_code="404") == 1
    assert value(edge, "edge_rate_limit_decisions_total", rule="voice-turns", outcome="allowed") == 2
    assert not [key for key in edge if key[0] == "edge_errors_total"], "the edge's layers answered no error"
    assert value(edge, "edge_server_refusals_total", code="bad_request") == 1
    assert value(edge, "process_resident_memory_bytes") > 10_000_000

    app_text, app = scrape(metrics["app"])
    route = "/api/v1/sessions/{session_id}/turns"
    assert value(app, duration, http_route=route, **turns_route) == 2
    assert value(app, duration, http_route="/api/v1/sessions/{session_id}", http_response_status_code="404") == 1
    assert value(app, "app_turns_total", kind="text", outcome="ok") == 1
    assert value(app, "app_turns_total", kind="voice", outcome="ok") == 1
    assert value(app, "app_turn_duration_seconds_count", kind="text") == 1
    for stage in ("transcribe", "recall", "reply", "speak", "remember"):
        assert value(app, "app_turn_stage_duration_seconds_count", stage=stage) == 2, stage
    # What the providers bill, for the quota panels: the simulator reports usage as Groq does.
    assert value(app, "app_groq_tokens_total", direction="input") > 0
    assert value(app, "app_groq_tokens_total", direction="output") > 0
    assert 1.9 < value(app, "app_groq_audio_seconds_total") < 2.1
    assert value(app, "app_elevenlabs_characters_total") == sum(len(t.json()["reply"]) for t in (turn, voice))
    assert value(app, "app_provider_responses_total", provider="groq", status="200") >= 3
    assert value(app, "app_outbound_calls_total", provider="elevenlabs", outcome="success") == 2
    assert value(app, "app_sessions_started_total") >= 1
    assert value(app, "app_memories_written_total") >= 1
    assert value(app, "app_breaker_state", provider="groq", state="closed") == 1
    assert value(app, "app_breaker_state", provider="groq", state="open") == 0
    assert wait_until(lambda: value(scrape(metrics["app"])[1], "readiness_status") == 1, timeout=15)

    sim_text, sim = scrape(metrics["sim"])
    assert value(sim, duration, http_route="/openai/v1/chat/completions", http_response_status_code="200") >= 1

    for text, samples in ((edge_text, edge), (app_text, app), (sim_text, sim)):
        assert session_id not in text
        assert "Ada" not in text
        labels = {label for _, have in samples for _, label in have}
        assert not [label for label in labels if CAPABILITY_LIKE.search(label)]


def test_one_scrape_of_an_edge_with_two_workers_counts_every_request(tmp_path: Path) -> None:
    """Each request lands on whichever worker accepts it; the supervisor's scrape adds the
    workers' files up, so the total is exact whatever the split."""
    upstream, _ = start_upstream()
    edge_port, metrics_port = new_port(), new_port()
    env = {
        "EDGE_PORT": str(edge_port),
        "EDGE_WORKERS": "2",
        "EDGE_METRICS_PORT": str(metrics_port),
        "EDGE_UPSTREAM_URL": upstream.url,
    }
    try:
        with edge_process(tmp_path / "logs", edge_port, env) as edge:
            requests = 40
            for _ in range(requests):
                # A new connection each time, so that both workers get some.
                assert httpx.get(f"{edge.url}/", timeout=5, trust_env=False).status_code == 200
            _, samples = scrape(f"http://127.0.0.1:{metrics_port}")
            counted = value(samples, "http_server_request_duration_seconds_count", http_route="other")
            assert counted == requests
            # Refusals by the size-limit layer and by the server itself, in whichever worker.
            head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
            assert exchange(edge_port, head).status == 431
            assert exchange(edge_port, b"NOT HTTP AT ALL\r\n\r\n").status == 400
            _, samples = scrape(f"http://127.0.0.1:{metrics_port}")
            assert value(samples, "edge_errors_total", code="headers_too_large") == 1
            assert value(samples, "edge_server_refusals_total", code="bad_request") == 1
            workers = children_of(edge.process.pid)
            assert len(workers) >= 2, workers
            assert edge.stop() == 0, edge.output()
    finally:
        upstream.stop()


def test_container_memory_is_the_cgroups_working_set_against_its_limit(tmp_path: Path) -> None:
    group = tmp_path / "cgroup" / "system.slice" / "app.scope"
    group.mkdir(parents=True)
    (group / "memory.current").write_text("300000000\n")
    (group / "memory.stat").write_text("anon 200000000\ninactive_file 100000000\nactive_file 0\n")
    (group / "memory.max").write_text("536870912\n")
    membership = tmp_path / "self-cgroup"
    membership.write_text("0::/system.slice/app.scope\n")
    found = {m.name: m.samples[0].value for m in ContainerMemoryCollector(tmp_path / "cgroup", membership).collect()}
    assert found == {"container_memory_working_set_bytes": 200000000, "container_memory_limit_bytes": 536870912}

    (group / "memory.max").write_text("max\n")  # no limit: no limit series, no ratio to alert on
    names = {m.name for m in ContainerMemoryCollector(tmp_path / "cgroup", membership).collect()}
    assert names == {"container_memory_working_set_bytes"}

    membership.write_text("12:memory:/docker/abc\n")  # cgroup v1: nothing rather than the host's figures
    assert list(ContainerMemoryCollector(tmp_path / "cgroup", membership).collect()) == []


def test_a_request_inside_an_exported_trace_carries_its_trace_id_as_an_exemplar(
    sims: Simulators, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prometheus asks for OpenMetrics when it stores exemplars; there, the app's request
    durations link to the trace the collector received (the dashboard's exemplars)."""
    sink = OtlpCollector()
    collector = serve(sink, log_config=None)
    metrics_port = new_port()
    # The SDK's exporter reads its endpoint from the environment, as `python -m app` would.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{collector.url}/v1/traces")
    settings = app_settings(sims, tmp_path / "data", metrics_port=metrics_port)
    try:
        with running_app(settings) as app, ApiClient(app.url) as api:
            session_id = api.create_session()
            api.say(session_id, "Hello!")
            answer = httpx.get(
                f"http://127.0.0.1:{metrics_port}/metrics",
                headers={"accept": "application/openmetrics-text; version=1.0.0"},
                timeout=5,
                trust_env=False,
            )
        # Stopped: the app has flushed its spans.
        assert answer.headers["content-type"].startswith("application/openmetrics-text"), answer.headers
        turn_buckets = [
            line
            for line in answer.text.splitlines()
            if line.startswith("http_server_request_duration_seconds_bucket") and "turns" in line and " # " in line
        ]
        assert turn_buckets, answer.text[:3000]
        trace_id = re.search(r'trace_id="([0-9a-f]{32})"', turn_buckets[0])
        assert trace_id is not None, turn_buckets
        assert trace_id.group(1) in {span.trace_id for span in sink.spans()}, "the exemplar's trace was not exported"
    finally:
        collector.stop()


def exchange(port: int, request: bytes) -> WireResponse:
    """`request`'s bytes as they are, on a connection of their own; the answer."""
    with WireClient(port) as wire:
        wire.send(request)
        return wire.read_response()


def test_a_drain_counts_the_requests_it_found_and_those_it_answered(tmp_path: Path) -> None:
    upstream, _ = start_upstream()
    edge_port, metrics_port = new_port(), new_port()
    env = {
        "EDGE_PORT": str(edge_port),
        "EDGE_METRICS_PORT": str(metrics_port),
        "EDGE_UPSTREAM_URL": upstream.url,
        "EDGE_DRAIN_TIMEOUT": "3",
    }
    try:
        with edge_process(tmp_path / "logs", edge_port, env) as edge, ThreadPoolExecutor(2) as pool:
            quick = pool.submit(httpx.get, f"{edge.url}/slow?delay=1", timeout=10, trust_env=False)
            cut = pool.submit(httpx.get, f"{edge.url}/slow?delay=6", timeout=10, trust_env=False)
            time.sleep(0.3)
            edge.terminate()
            assert quick.result().status_code == 200  # finished within the drain
            _, samples = scrape(f"http://127.0.0.1:{metrics_port}")  # still served: the drain goes on
            assert value(samples, "edge_drain_requests_total", outcome="in_flight") == 2
            assert value(samples, "edge_drain_requests_total", outcome="completed") == 1
            answer = cut.result()
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "shutting_down"
            assert edge.wait(30) == 0, edge.output()
    finally:
        upstream.stop()
