"""The images and the compose stack, checked statically and on a real Docker engine.

The static checks (hadolint, `docker compose config`, the compose file's contract) run
everywhere. The rest needs an engine: `make test-containers` runs this module under
scripts/container_engine.py, which provides a private one and a locally made base image
(CONTAINER_ENGINE, CONTAINER_BASE_IMAGE); anywhere else those tests skip, saying why. They
build both images, bring the default stack up under a project name of their own on a free
loopback port, and always take it down with its volume; the same for the scaled stack
(compose.scaled.yml with tests/containers/compose.scaled-local.yml: two app replicas,
local Redis and PostgreSQL, no Qdrant server, memory off), which ends by killing a
replica. Figures they measure are printed as `measured:` lines
(docs/deployment.md#running-the-container-tests).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app_support import new_port
from tests.processes import PROJECT_ROOT

VENV_BIN = Path(sys.executable).parent
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
PROVIDERS_FILE = PROJECT_ROOT / "compose.providers.yml"
DOCKERFILES = {"edge": PROJECT_ROOT / "Dockerfile.edge", "app": PROJECT_ROOT / "Dockerfile.app"}
SIZE_GOALS_MB = {"edge": 200, "app": 600}
NON_ROOT = "10001"
TEST_TAG = "containers-test"
# The shortest drain of the stack (EDGE_DRAIN_TIMEOUT): an idle stack stops well within it.
DRAIN_S = 20.0
UP_TIMEOUT_S = 180

# The first engine test also builds both images (minutes on a cold cache).
pytestmark = pytest.mark.timeout(900)

ENGINE = os.environ.get("CONTAINER_ENGINE")
needs_engine = pytest.mark.skipif(
    not ENGINE,
    reason=os.environ.get("CONTAINER_ENGINE_UNAVAILABLE")
    or "needs a Docker engine: `make test-containers` runs these tests with a private one",
)


def measured(figure: str) -> None:
    print(f"measured: {figure}", flush=True)


def run(
    *command: str | Path, env: dict[str, str] | None = None, timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        cwd=PROJECT_ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def compose_config(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose model as Compose itself resolves it (interpolated, merged, defaulted)."""
    arguments = [argument for file in files for argument in ("-f", str(file))]
    completed = run(VENV_BIN / "docker-compose", *arguments, "config", "--format", "json", env=env)
    assert completed.returncode == 0, completed.stderr
    document: dict[str, Any] = json.loads(completed.stdout)
    return document


def clean_environment(**values: str) -> dict[str, str]:
    """This process's environment without a stray setting the compose files read."""
    read = ("IMAGE_TAG", "EDGE_PUBLISHED_PORT", "GROQ_API_KEY", "ELEVENLABS_API_KEY", "ENVIRONMENT", "COMPOSE_")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(read)}, **values}


# -- static: everywhere ------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_is_hadolint_clean(image: str) -> None:
    completed = run(VENV_BIN / "hadolint", "--failure-threshold", "warning", DOCKERFILES[image])
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_the_local_service_images_are_hadolint_and_shellcheck_clean() -> None:
    for dockerfile in LOCAL_SERVICE_IMAGES.values():
        completed = run(VENV_BIN / "hadolint", "--failure-threshold", "warning", dockerfile)
        assert completed.returncode == 0, completed.stdout + completed.stderr
    checked = run(VENV_BIN / "shellcheck", PROJECT_ROOT / "tests" / "containers" / "postgres-entrypoint.sh")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_files_are_valid() -> None:
    for files in ((COMPOSE_FILE,), (COMPOSE_FILE, PROVIDERS_FILE)):
        arguments = [argument for file in files for argument in ("-f", str(file))]
        env = clean_environment(GROQ_API_KEY="key", ELEVENLABS_API_KEY="key")
        completed = run(VENV_BIN / "docker-compose", *arguments, "config", "--quiet", env=env)
        assert completed.returncode == 0, completed.stderr
        for file in files:
            schema = run(VENV_BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", file)
            assert schema.returncode == 0, schema.stdout + schema.stderr


def test_the_default_stack_publishes_only_the_edge_on_loopback_and_bounds_every_service() -> None:
    config = compose_config(COMPOSE_FILE, env=clean_environment())
    services = config["services"]
    assert sorted(services) == ["app", "edge", "sim"]
    assert services["edge"]["ports"] == [
        {"mode": "ingress", "host_ip": "127.0.0.1", "target": 8080, "published": "8080", "protocol": "tcp"}
    ]
    drains = {"edge": DRAIN_S, "app": 65.0, "sim": 5.0}  # EDGE_/APP_DRAIN_TIMEOUT, sim's own
    for name, service in services.items():
        if name != "edge":
            assert "ports" not in service, name
            assert list(service["networks"]) == ["internal"], name
        assert service["image"].endswith(":0.1.0"), name  # our own images, by IMAGE_TAG
        assert service["init"] is True, name
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0, name
        assert 0 < int(limits["memory"]) <= 1024**3, name
        assert service["logging"]["driver"] == "json-file", name
        assert set(service["logging"]["options"]) == {"max-size", "max-file"}, name
        assert {"interval", "timeout", "retries"} <= set(service["healthcheck"]), name
        grace_s = parse_duration(service["stop_grace_period"])
        assert grace_s > drains[name], name
    for name, drain_variable in (("edge", "EDGE_DRAIN_TIMEOUT"), ("app", "APP_DRAIN_TIMEOUT")):
        assert float(services[name]["environment"][drain_variable]) == drains[name]
    assert services["edge"]["depends_on"]["app"]["condition"] == "service_healthy"
    assert services["app"]["depends_on"]["sim"]["condition"] == "service_healthy"
    assert services["app"]["volumes"] == [
        {"type": "volume", "source": "app-data", "target": "/app/data", "volume": {}},
        # The backups on a volume of their own (docs/data.md#backups).
        {"type": "volume", "source": "app-backups", "target": "/app/backups", "volume": {}},
    ]
    assert config["networks"]["internal"]["internal"] is True
    assert "internal" not in config["networks"]["public"]


def test_the_published_port_and_image_tag_are_variables() -> None:
    config = compose_config(COMPOSE_FILE, env=clean_environment(EDGE_PUBLISHED_PORT="18080", IMAGE_TAG="1.2.3"))
    assert config["services"]["edge"]["ports"][0]["published"] == "18080"
    assert {service["image"] for service in config["services"].values()} == {
        "voice-companion/edge:1.2.3",
        "voice-companion/app:1.2.3",
    }


def test_real_providers_need_both_keys_from_the_environment_and_leave_the_simulator_out() -> None:
    missing = run(
        VENV_BIN / "docker-compose", "-f", COMPOSE_FILE, "-f", PROVIDERS_FILE, "config", "--quiet",
        env=clean_environment(GROQ_API_KEY="key"),
    )  # fmt: skip
    assert missing.returncode != 0
    assert "ELEVENLABS_API_KEY" in missing.stderr

    env = clean_environment(GROQ_API_KEY="groq-key", ELEVENLABS_API_KEY="elevenlabs-key")
    config = compose_config(COMPOSE_FILE, PROVIDERS_FILE, env=env)
    assert sorted(config["services"]) == ["app", "edge"]
    app = config["services"]["app"]
    assert app["environment"]["GROQ_API_KEY"] == "groq-key"
    assert app["environment"]["ELEVENLABS_API_KEY"] == "elevenlabs-key"
    assert app["environment"]["GROQ_BASE_URL"] == "https://api.groq.com/openai/v1"
    assert app["environment"]["ENVIRONMENT"] == "production"
    assert sorted(app["networks"]) == ["egress", "internal"]
    assert "ports" not in app


def parse_duration(value: str) -> float:
    """Compose's normalised duration (`1m15s`, `30s`) in seconds."""
    minutes, _, seconds = value.rpartition("m")
    return float(minutes or 0) * 60 + float(seconds.rstrip("s") or 0)


# -- on an engine ------------------------------------------------------------------------------------------


def docker(
    *arguments: str | Path, env: dict[str, str] | None = None, timeout: float = 120, stdin: str | None = None
) -> str:
    docker_command = shutil.which("docker")
    assert docker_command is not None
    completed = run(docker_command, *arguments, env=env, timeout=timeout, stdin=stdin)
    assert completed.returncode == 0, f"docker {' '.join(map(str, arguments))}:\n{completed.stdout}{completed.stderr}"
    return completed.stdout


@dataclass(frozen=True)
class Images:
    tag: str
    revision: str

    def name(self, image: str) -> str:
        return f"voice-companion/{image}:{self.tag}"


@pytest.fixture(scope="module")
def images() -> Images:
    base = os.environ.get("CONTAINER_BASE_IMAGE")
    revision = run("git", "rev-parse", "HEAD").stdout.strip()
    built = Images(TEST_TAG, revision)
    for image, dockerfile in sorted(DOCKERFILES.items()):
        build_arguments = ["--build-arg", f"REVISION={revision}"]
        if base:
            build_arguments += ["--build-arg", f"BASE_IMAGE={base}"]
        started = time.monotonic()
        docker(
            "build", "--network", "host", "--file", dockerfile, "--tag", built.name(image), *build_arguments, ".",
            timeout=600,
        )  # fmt: skip
        seconds = time.monotonic() - started
        # The image this tag named before is left untagged: removed (the build stages stay, as cache).
        docker("image", "prune", "--force", "--filter", f"label=org.opencontainers.image.title=voice-companion-{image}")
        size_mb = int(docker("image", "inspect", "--format", "{{.Size}}", built.name(image))) / 1e6
        measured(f"{image} image built in {seconds:.0f} s, {size_mb:.0f} MB")
    return built


@needs_engine
@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_is_small_labelled_non_root_and_free_of_build_tools(images: Images, image: str) -> None:
    [inspected] = json.loads(docker("image", "inspect", images.name(image)))
    assert inspected["Size"] / 1e6 <= SIZE_GOALS_MB[image]
    config = inspected["Config"]
    assert config["User"] == f"{NON_ROOT}:{NON_ROOT}"
    assert config["Labels"]["org.opencontainers.image.revision"] == images.revision
    assert config["Labels"]["org.opencontainers.image.title"] == f"voice-companion-{image}"
    assert config["Cmd"] == ["python", "-m", image]
    assert config["Entrypoint"] is None
    assert config["Healthcheck"]["Test"][0] == "CMD"
    probe = (
        "import shutil, sys; print(' '.join(t for t in ('gcc', 'cc', 'g++', 'make', 'ld') if shutil.which(t)));"
        "print(sys.prefix)"
    )
    tools, prefix = docker("run", "--rm", "--network", "none", images.name(image), "python", "-c", probe).split("\n")[
        :2
    ]
    assert tools == ""
    assert prefix == "/opt/venv"
    listing = docker("run", "--rm", "--network", "none", images.name(image), "ls", "/opt/venv/bin", "/app").split()
    assert "pip" not in listing
    assert {"tests", "bench", "docs", ".venv", ".git"}.isdisjoint(listing)


@needs_engine
def test_started_as_root_on_a_root_owned_volume_the_app_takes_it_and_drops_root(images: Images) -> None:
    """Railway mounts a volume owned by root and, with RAILWAY_RUN_UID=0, starts the image as
    root: the app gives /app/data to 10001 (APP_RUN_AS_USER, set by the image) and becomes it."""
    volume = f"voice-root-volume-{os.getpid()}"
    container = f"voice-run-as-root-{os.getpid()}"
    app = images.name("app")
    docker("volume", "create", volume)
    try:
        docker(
            "run", "--rm", "--user", "0", "--network", "none", "--volume", f"{volume}:/app/data", app,
            "sh", "-c", "touch /app/data/left-by-root && chown -R 0:0 /app/data",
        )  # fmt: skip
        docker("run", "--detach", "--name", container, "--user", "0", "--network", "none",
               "--volume", f"{volume}:/app/data", app)  # fmt: skip
        health = "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/api/v1/health', timeout=2)"
        deadline = time.monotonic() + 60
        while run(shutil.which("docker") or "docker", "exec", container, "python", "-c", health).returncode != 0:
            assert time.monotonic() < deadline, docker("logs", container)
            time.sleep(0.5)
        status = docker("exec", container, "cat", "/proc/1/status")
        assert f"Uid:\t{NON_ROOT}\t{NON_ROOT}\t{NON_ROOT}\t{NON_ROOT}" in status, status
        assert f"Gid:\t{NON_ROOT}\t{NON_ROOT}\t{NON_ROOT}\t{NON_ROOT}" in status, status
        owners = docker("exec", container, "sh", "-c", "find /app/data -exec stat -c %u:%g {} +").split()
        assert len(owners) > 2, owners  # the directory, what root left, what the app made
        assert set(owners) == {f"{NON_ROOT}:{NON_ROOT}"}, owners
    finally:
        run(shutil.which("docker") or "docker", "rm", "--force", container)
        run(shutil.which("docker") or "docker", "volume", "rm", "--force", volume)


@needs_engine
def test_the_build_context_holds_only_the_code_and_the_locks(images: Images) -> None:
    """What `.dockerignore` lets through, listed by a build of that context."""
    listing_dockerfile = (
        f"FROM {images.name('edge')}\nCOPY . /tmp/context\n"
        'RUN ["python", "-c", "import os; print(sorted(os.listdir(\'/tmp/context\')), '
        "sorted(os.listdir('/tmp/context/requirements')), "
        "any('__pycache__' in d for _, d, _ in os.walk('/tmp/context')))\"]\n"
    )
    listing = f"voice-companion/context-listing:{TEST_TAG}"
    try:
        output = docker(
            "build", "--no-cache", "--network", "none", "--tag", listing, "--file", "-", ".", stdin=listing_dockerfile
        )  # fmt: skip
    finally:
        run(shutil.which("docker") or "docker", "image", "rm", "--force", listing)
    locks = "['app.lock', 'edge.lock', 'model.lock']"
    assert f"['app', 'common', 'config', 'edge', 'requirements', 'sim'] {locks} False" in output


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    url: str
    files: tuple[Path, ...] = (COMPOSE_FILE,)

    def compose(self, *arguments: str, timeout: float = UP_TIMEOUT_S) -> str:
        files = [argument for file in self.files for argument in ("-f", str(file))]
        return docker("compose", "--project-name", self.project, *files, *arguments, env=self.env, timeout=timeout)

    def up(self) -> float:
        """`up --wait`: the seconds until every service is healthy."""
        started = time.monotonic()
        try:
            self.compose("up", "--detach", "--wait")
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{self.compose('logs', '--no-color')}") from None
        return time.monotonic() - started

    def down(self, *arguments: str) -> float:
        started = time.monotonic()
        self.compose("down", *arguments)
        return time.monotonic() - started

    def container(self, service: str) -> dict[str, Any]:
        [container_id] = self.compose("ps", "--quiet", service).split()
        [inspected] = json.loads(docker("inspect", container_id))
        document: dict[str, Any] = inspected
        return document


@pytest.fixture(scope="module")
def stack(images: Images) -> Iterator[Stack]:
    port = new_port()
    running = Stack(
        project=f"voice-test-{secrets.token_hex(4)}",
        env=clean_environment(IMAGE_TAG=images.tag, EDGE_PUBLISHED_PORT=str(port)),
        url=f"http://127.0.0.1:{port}",
    )
    try:
        measured(f"default stack up and healthy in {running.up():.1f} s")
        yield running
    finally:
        running.down("--volumes", "--timeout", "30")


@needs_engine
def test_the_smoke_test_passes_through_the_published_edge(stack: Stack) -> None:
    completed = run(sys.executable, PROJECT_ROOT / "scripts" / "smoke.py", stack.url, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert len(completed.stdout.splitlines()) == 8, completed.stdout


# Sessions of turns at once, straight to the app on the internal network (the edge's rate
# limit would count them all as one client): each turn recalls, replies, speaks and stores
# a fact, embedding two sentences.
LOAD_SCRIPT = """
import concurrent.futures, json, urllib.request
def post(path, body=None):
    request = urllib.request.Request('http://app:8000' + path, data=json.dumps(body or {}).encode(),
                                     headers={'content-type': 'application/json'}, method='POST')
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.load(answer)
def person(number):
    session = post('/api/v1/sessions')['session_id']
    for turn in range(6):
        post(f'/api/v1/sessions/{session}/turns', {'text': f'My friend number {turn} lives in town {number}.'})
    return 6
with concurrent.futures.ThreadPoolExecutor(12) as pool:
    print(sum(pool.map(person, range(12))))
"""


@needs_engine
def test_the_app_stays_within_its_memory_limit_under_load(stack: Stack) -> None:
    """The sentence model loaded, 72 turns of 12 sessions at once: the app container's peak
    memory (its cgroup's, page cache included) stays well within its limit."""
    limit = stack.container("app")["HostConfig"]["Memory"]
    started = time.monotonic()
    turns = stack.compose("exec", "-T", "edge", "python", "-c", LOAD_SCRIPT, timeout=600).strip()
    seconds = time.monotonic() - started
    assert turns == "72"
    # cgroup v2's files, else v1's (this machine's kernel mounts v1 for Docker).
    read = "cat /sys/fs/cgroup/memory.{0} 2>/dev/null || cat /sys/fs/cgroup/memory/memory.{1}"
    peak = int(stack.compose("exec", "-T", "app", "sh", "-c", read.format("peak", "max_usage_in_bytes")))
    current = int(stack.compose("exec", "-T", "app", "sh", "-c", read.format("current", "usage_in_bytes")))
    measured(
        f"app under load: 72 turns of 12 sessions at once in {seconds:.1f} s, memory peak {peak / 2**20:.0f} MiB, "
        f"now {current / 2**20:.0f} MiB, limit {limit / 2**20:.0f} MiB"
    )
    assert 0 < peak < 0.8 * limit  # below ContainerMemoryHigh's 80 %


@needs_engine
@pytest.mark.parametrize("service", ["edge", "app", "sim"])
def test_every_process_runs_as_the_non_root_user(stack: Stack, service: str) -> None:
    assert stack.compose("exec", "-T", service, "id", "-u").strip() == NON_ROOT
    # PID 1 is Docker's init (init: true), which passes SIGTERM on to Python.
    command_line = stack.compose("exec", "-T", service, "cat", "/proc/1/cmdline").split("\0")
    assert command_line[0].endswith("docker-init"), command_line


@needs_engine
@pytest.mark.parametrize("service", ["app", "sim"])
def test_the_internal_services_are_not_reachable_from_the_host(stack: Stack, service: str) -> None:
    container = stack.container(service)
    assert not any(container["NetworkSettings"]["Ports"].values()), container["NetworkSettings"]["Ports"]
    addresses = [network["IPAddress"] for network in container["NetworkSettings"]["Networks"].values()]
    assert addresses
    port, path = ("8000", "/api/v1/health") if service == "app" else ("9100", "/_sim/health")
    for address in addresses:
        try:
            # Anything may answer an address the host has no route to (an egress proxy):
            # never the service itself.
            answer = httpx.get(f"http://{address}:{port}{path}", timeout=3, trust_env=False)
            assert answer.status_code != 200 or '"status":"' not in answer.text, answer.text
        except httpx.HTTPError:
            pass
    # The same request from the edge, on the internal network, is answered: the probe works.
    from_edge = stack.compose(
        "exec", "-T", "edge", "python", "-c",
        f"import urllib.request as u; print(u.urlopen('http://{service}:{port}{path}', timeout=3).status)",
    )  # fmt: skip
    assert from_edge.strip() == "200"


@needs_engine
def test_data_survives_down_and_up_and_down_is_within_the_drain_time(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, trust_env=False, timeout=30) as client:
        session = client.post("/api/v1/sessions").json()["session_id"]
        turn = client.post(f"/api/v1/sessions/{session}/turns", json={"text": "Remember: my cat is Tom."})
        assert turn.status_code == 200, turn.text

    down_s = stack.down()
    measured(f"default stack down in {down_s:.1f} s")
    assert down_s < DRAIN_S
    measured(f"default stack up again, healthy in {stack.up():.1f} s")

    with httpx.Client(base_url=stack.url, trust_env=False, timeout=30) as client:
        kept = client.get(f"/api/v1/sessions/{session}")
        assert kept.status_code == 200, kept.text
        assert kept.json()["messages"][0]["text"] == "Remember: my cat is Tom."
        assert client.delete(f"/api/v1/sessions/{session}").status_code == 204


@needs_engine
def test_stop_reaches_every_process_which_exits_cleanly(stack: Stack) -> None:
    """SIGTERM gets to Python, which drains and exits 0: not killed at the grace period (137)."""
    started = time.monotonic()
    stack.compose("stop")
    stop_s = time.monotonic() - started
    measured(f"default stack stopped in {stop_s:.1f} s")
    for service in ("edge", "app", "sim"):
        [container_id] = stack.compose("ps", "--all", "--quiet", service).split()
        assert docker("inspect", "--format", "{{.State.ExitCode}}", container_id).strip() == "0", service
    assert stop_s < DRAIN_S


@needs_engine
def test_with_real_provider_keys_the_stack_comes_up_without_the_simulator(images: Images) -> None:
    port = new_port()
    providers = Stack(
        project=f"voice-test-{secrets.token_hex(4)}",
        env=clean_environment(
            IMAGE_TAG=images.tag, EDGE_PUBLISHED_PORT=str(port), GROQ_API_KEY="unused", ELEVENLABS_API_KEY="unused"
        ),
        url=f"http://127.0.0.1:{port}",
        files=(COMPOSE_FILE, PROVIDERS_FILE),
    )
    try:
        measured(f"providers stack up and healthy in {providers.up():.1f} s")
        assert sorted(providers.compose("ps", "--services").split()) == ["app", "edge"]
        ready = httpx.get(f"{providers.url}/api/v1/ready", trust_env=False, timeout=10)
        assert ready.status_code == 200, ready.text
    finally:
        providers.down("--volumes", "--timeout", "30")


# -- the scaled stack --------------------------------------------------------------------------------------

SCALED_FILE = PROJECT_ROOT / "compose.scaled.yml"
# Redis and PostgreSQL from Debian's packages on the local base, no Qdrant server, memory off.
SCALED_LOCAL_FILE = PROJECT_ROOT / "tests" / "containers" / "compose.scaled-local.yml"
LOCAL_SERVICE_IMAGES = {
    "redis": PROJECT_ROOT / "tests" / "containers" / "Dockerfile.redis",
    "postgres": PROJECT_ROOT / "tests" / "containers" / "Dockerfile.postgres",
}
# Docker's address pools: the public network's gateway, which every client arrives from, is
# trusted, so each test's X-Forwarded-For is its client (and its own rate-limit bucket).
DOCKER_NETWORKS = "172.16.0.0/12,192.168.0.0/16"
# A model reply this slow keeps turns in flight long enough to overlap and to be cut.
SLOW_REPLY_MS = 1000


def scaled_environment(**values: str) -> dict[str, str]:
    return clean_environment(POSTGRES_PASSWORD=secrets.token_hex(16), **values)


def test_the_scaled_stack_adds_the_shared_stores_and_a_second_replica() -> None:
    config = compose_config(COMPOSE_FILE, SCALED_FILE, env=scaled_environment())
    services = config["services"]
    assert sorted(services) == ["app", "edge", "postgres", "qdrant", "redis", "sim"]
    assert services["app"]["deploy"]["replicas"] == 2
    app = services["app"]["environment"]
    assert app["APP_REPLICAS"] == "2"
    assert app["APP_DATABASE_URL"].startswith("postgresql://voice:")
    assert app["APP_DATABASE_URL"].endswith("@postgres:5432/voice")
    assert app["APP_QDRANT_URL"] == "http://qdrant:6333"
    assert services["edge"]["environment"]["EDGE_RATE_LIMIT_STORAGE_URL"] == "redis://redis:6379/0"
    # Each replica a data directory of its own: not the default stack's shared volume. The
    # backups' volume stays, unused: the scaled stack leaves backups to PostgreSQL's own.
    assert app["APP_BACKUP_INTERVAL_HOURS"] == "0"
    assert sorted(services["app"]["volumes"], key=lambda volume: volume["target"]) == [
        {"type": "volume", "source": "app-backups", "target": "/app/backups", "volume": {}},
        {"type": "volume", "target": "/app/data"},
    ]
    for name, store in (("redis", "/data"), ("postgres", "/var/lib/postgresql/data"), ("qdrant", "/qdrant/storage")):
        service = services[name]
        image, _, tag = service["image"].rpartition(":")
        assert image in ("redis", "postgres", "qdrant/qdrant"), name
        assert tag[:1].isdigit() or tag[:2] == "v1", name  # a version, never latest
        assert list(service["networks"]) == ["internal"], name
        assert "ports" not in service, name
        assert service["volumes"] == [{"type": "volume", "source": f"{name}-data", "target": store, "volume": {}}], name
        assert service["init"] is True, name
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0, name
        assert int(limits["memory"]) > 0, name
        assert service["healthcheck"]["test"][0] == "CMD", name
    assert services["edge"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["app"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["app"]["depends_on"]["qdrant"]["condition"] == "service_healthy"


def test_the_scaled_stack_needs_the_database_password_from_the_environment() -> None:
    missing = run(
        VENV_BIN / "docker-compose", "-f", COMPOSE_FILE, "-f", SCALED_FILE, "config", "--quiet",
        env=clean_environment(),
    )  # fmt: skip
    assert missing.returncode != 0
    assert "POSTGRES_PASSWORD" in missing.stderr
    for file in (SCALED_FILE, SCALED_LOCAL_FILE):
        schema = run(VENV_BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", file)
        assert schema.returncode == 0, schema.stdout + schema.stderr


def test_the_local_override_runs_without_qdrant_and_with_memory_off() -> None:
    env = scaled_environment(IMAGE_TAG=TEST_TAG)
    config = compose_config(COMPOSE_FILE, SCALED_FILE, SCALED_LOCAL_FILE, env=env)
    assert sorted(config["services"]) == ["app", "edge", "postgres", "redis", "sim"]
    assert config["services"]["app"]["environment"]["APP_FEATURE_MEMORY"] == "false"
    assert config["services"]["redis"]["image"] == f"voice-companion/test-redis:{TEST_TAG}"
    assert config["services"]["postgres"]["image"] == f"voice-companion/test-postgres:{TEST_TAG}"


@dataclass
class ScaledStack(Stack):
    def replicas(self) -> list[str]:
        """The app replicas' container ids, in the order Compose lists them."""
        return self.compose("ps", "--quiet", "app").split()

    def replica_of(self, request_ids: list[str]) -> dict[str, str]:
        """Which replica served each request: its outbound calls' log lines carry its id."""
        served: dict[str, str] = {}
        for replica in self.replicas():
            log = run(shutil.which("docker") or "docker", "logs", replica, env=self.env).stdout
            for request_id in request_ids:
                if f'"request_id":"{request_id}"' in log:
                    served[request_id] = replica
        return served

    def slow_replies(self, milliseconds: int) -> None:
        """The simulator's model replies take this long (its `/_sim/latency`, from the edge)."""
        update = json.dumps({"chat": milliseconds})
        self.compose(
            "exec", "-T", "edge", "python", "-c",
            "import urllib.request as u; u.urlopen(u.Request('http://sim:9100/_sim/latency', "
            f"data={update!r}.encode(), method='PUT', headers={{'Content-Type': 'application/json'}}), timeout=5)",
        )  # fmt: skip


@pytest.fixture(scope="module")
def scaled_stack(images: Images) -> Iterator[ScaledStack]:
    base = os.environ.get("CONTAINER_BASE_IMAGE")
    for name, dockerfile in sorted(LOCAL_SERVICE_IMAGES.items()):
        started = time.monotonic()
        base_argument = ["--build-arg", f"BASE_IMAGE={base}"] if base else []
        docker(
            "build", "--network", "host", "--file", dockerfile, "--tag", f"voice-companion/test-{name}:{images.tag}",
            *base_argument, dockerfile.parent, timeout=600,
        )  # fmt: skip
        measured(f"local {name} image built in {time.monotonic() - started:.0f} s")
    port = new_port()
    running = ScaledStack(
        project=f"voice-test-{secrets.token_hex(4)}",
        env=scaled_environment(
            IMAGE_TAG=images.tag, EDGE_PUBLISHED_PORT=str(port), EDGE_TRUSTED_PROXIES=DOCKER_NETWORKS
        ),
        url=f"http://127.0.0.1:{port}",
        files=(COMPOSE_FILE, SCALED_FILE, SCALED_LOCAL_FILE),
    )
    try:
        measured(f"scaled stack up and healthy in {running.up():.1f} s")
        yield running
    finally:
        running.down("--volumes", "--timeout", "30")


def client_address() -> str:
    """A client of its own (X-Forwarded-For, believed from the trusted gateway)."""
    return f"198.18.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"


def scaled_client(stack: Stack, address: str | None = None) -> httpx.Client:
    return httpx.Client(
        base_url=stack.url,
        trust_env=False,
        timeout=90,
        headers={"X-Forwarded-For": address or client_address()},
    )


@needs_engine
def test_the_scaled_stack_runs_two_replicas_and_passes_the_smoke_test(scaled_stack: ScaledStack) -> None:
    assert len(scaled_stack.replicas()) == 2
    assert sorted(scaled_stack.compose("ps", "--services").split()) == ["app", "edge", "postgres", "redis", "sim"]
    completed = run(sys.executable, PROJECT_ROOT / "scripts" / "smoke.py", scaled_stack.url, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr


@needs_engine
def test_turns_are_spread_over_both_replicas_and_one_shared_rate_limit_counts_them(
    scaled_stack: ScaledStack,
) -> None:
    """A client's ten turns a minute (config/edge-policy.toml) are counted in Redis whichever
    replica serves them: the eleventh is refused."""
    with scaled_client(scaled_stack) as client:
        session = client.post("/api/v1/sessions").json()["session_id"]
        request_ids = []
        for number in range(10):
            turn = client.post(f"/api/v1/sessions/{session}/turns", json={"text": f"Turn {number}."})
            assert turn.status_code == 200, turn.text
            request_ids.append(turn.headers["x-request-id"])
        refused = client.post(f"/api/v1/sessions/{session}/turns", json={"text": "One too many."})
        assert refused.status_code == 429, refused.text
        assert client.delete(f"/api/v1/sessions/{session}").status_code == 204
    served = scaled_stack.replica_of(request_ids)
    assert sorted(served) == sorted(request_ids)
    counts = {replica: list(served.values()).count(replica) for replica in scaled_stack.replicas()}
    measured(f"10 turns of one session served {sorted(counts.values())} by the two replicas")
    assert min(counts.values()) >= 1, counts
    counters = scaled_stack.compose("exec", "-T", "redis", "redis-cli", "--scan", "--pattern", "edge*").split()
    assert counters, "no rate-limit counter in Redis"


@needs_engine
def test_two_concurrent_turns_of_one_session_on_two_replicas_are_serialised(scaled_stack: ScaledStack) -> None:
    scaled_stack.slow_replies(SLOW_REPLY_MS)
    try:
        with scaled_client(scaled_stack) as client:
            session = client.post("/api/v1/sessions").json()["session_id"]

            def turn(text: str) -> httpx.Response:
                return client.post(f"/api/v1/sessions/{session}/turns", json={"text": text})

            started = time.monotonic()
            with ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(turn, ["First: my cat is Tom.", "Second: my dog is Rex."]))
            elapsed = time.monotonic() - started
            for answer in answers:
                assert answer.status_code == 200, answer.text
            served = scaled_stack.replica_of([answer.headers["x-request-id"] for answer in answers])
            assert len(set(served.values())) == 2, "both turns were served by one replica"
            # One after the other: together they took two slow replies at least.
            measured(f"two concurrent turns of one session on two replicas took {elapsed:.1f} s")
            assert elapsed >= 2 * SLOW_REPLY_MS / 1000
            messages = client.get(f"/api/v1/sessions/{session}").json()["messages"]
            assert client.delete(f"/api/v1/sessions/{session}").status_code == 204
    finally:
        scaled_stack.slow_replies(0)
    # Both turns, whole, one after the other: each text followed by its own reply.
    assert [message["role"] for message in messages] == ["user", "assistant", "user", "assistant"]
    reply_to = {answer.json()["transcript"]: answer.json()["reply"] for answer in answers}
    assert sorted(reply_to) == ["First: my cat is Tom.", "Second: my dog is Rex."]
    for said, replied in (messages[0:2], messages[2:4]):
        assert replied["text"] == reply_to[said["text"]]


@dataclass(frozen=True)
class Outcome:
    kind: str
    started: float  # seconds since the replica was killed (negative: before)
    ended: float
    status: int | str  # the status, or the exception's name


KILL_AFTER_S = 4.0
STREAM_AFTER_KILL_S = 8.0


@needs_engine
def test_a_replica_killed_during_turns_and_gets_fails_no_get(scaled_stack: ScaledStack) -> None:
    """Last of the scaled tests: it kills a replica. Turn workers post turns to sessions of
    their own, GET workers read sessions and reply audio, all through the edge, every request
    from a client address of its own; one replica gets SIGKILL while all of them run."""
    sessions: list[tuple[str, str]] = []  # (session path, reply audio url)
    for number in range(3):
        with scaled_client(scaled_stack) as client:
            session = client.post("/api/v1/sessions").json()["session_id"]
            turn = client.post(f"/api/v1/sessions/{session}/turns", json={"text": f"I am worker {number}."})
            assert turn.status_code == 200, turn.text
            sessions.append((f"/api/v1/sessions/{session}", turn.json()["audio_url"]))
    scaled_stack.slow_replies(SLOW_REPLY_MS)
    victim = scaled_stack.replicas()[1]
    killed_at = time.monotonic() + KILL_AFTER_S
    stop_at = killed_at + STREAM_AFTER_KILL_S
    outcomes: list[Outcome] = []

    def record(kind: str, request: Callable[[httpx.Client], httpx.Response]) -> None:
        started = time.monotonic()
        try:
            with scaled_client(scaled_stack) as client:
                status: int | str = request(client).status_code
        except httpx.HTTPError as error:
            status = type(error).__name__
        outcomes.append(Outcome(kind, started - killed_at, time.monotonic() - killed_at, status))

    def turns(worker: int) -> None:
        path = sessions[worker][0]
        while time.monotonic() < stop_at:
            record("POST turn", lambda client: client.post(f"{path}/turns", json={"text": "Still here."}))

    def gets(worker: int) -> None:
        while time.monotonic() < stop_at:
            for path, audio_url in sessions:
                record("GET session", partial(httpx.Client.get, url=path))
                record("GET audio", partial(httpx.Client.get, url=audio_url))

    try:
        with ThreadPoolExecutor(6) as pool:
            running = [pool.submit(turns, worker) for worker in range(3)]
            running += [pool.submit(gets, worker) for worker in range(3)]
            time.sleep(max(0.0, killed_at - time.monotonic()))
            docker("kill", victim)
            for future in running:
                future.result()
    finally:
        scaled_stack.slow_replies(0)

    def count(kind: str, when: Callable[[Outcome], bool] = lambda outcome: True) -> dict[str, int]:
        counted: dict[str, int] = {}
        for outcome in outcomes:
            if outcome.kind == kind and when(outcome):
                counted[str(outcome.status)] = counted.get(str(outcome.status), 0) + 1
        return counted

    in_flight = count("POST turn", lambda outcome: outcome.started < 0 < outcome.ended)
    after = count("POST turn", lambda outcome: outcome.started >= 0)
    gets_counted = {kind: count(kind) for kind in ("GET session", "GET audio")}
    measured(
        f"replica killed during {len(outcomes)} requests: GETs {gets_counted}; "
        f"turns in flight at the kill {in_flight}, started after it {after}, "
        f"all turns {count('POST turn')}"
    )
    for kind, statuses in gets_counted.items():
        assert statuses.keys() == {"200"}, (kind, statuses)
    assert sum(after.values()) > 0
    assert after.keys() == {"200"}, after
    restarted = docker("inspect", "--format", "{{.State.Running}} {{.RestartCount}}", victim).strip()
    measured(f"killed replica afterwards (running, restarts): {restarted}")
    down_s = scaled_stack.down("--volumes")
    measured(f"scaled stack down in {down_s:.1f} s")
    assert down_s < DRAIN_S
