"""The deployment files - Railway's config (railway.json, config/railway.app.json), the
GitHub Actions workflows, codecov.yml - checked as their consumers would read them, and
against the mistakes the seed app's deployment made (docs/deployment.md):
actionlint (with shellcheck on every `run:` block) and the vendors' schemas; Railway's
files against the committed subset of Railway's schema; every action, image and installed
tool pinned; one deploy at a time, from a protected environment, rolled back when its smoke
test fails; one coverage gate in `make test`, CI and Codecov; and the health-check paths
served by the real processes, laid out as on Railway (the app on `::`, the edge on `PORT`).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from app.settings import AppSettings
from edge.settings import EdgeSettings
from tests.app_support import (
    API,
    POSTGRES_URL,
    Simulators,
    app_environment,
    new_port,
    start_app_process,
)
from tests.processes import PROJECT_ROOT, START_TIMEOUT, ServiceProcess, edge_process
from tests.rate_limit_support import REDIS_URL

BIN = Path(sys.executable).parent
WORKFLOWS = sorted((PROJECT_ROOT / ".github" / "workflows").glob("*.yml"))
SCRIPTS = sorted((PROJECT_ROOT / ".github" / "scripts").glob("*.sh"))
CI = PROJECT_ROOT / ".github" / "workflows" / "ci.yml"
DEPLOY = PROJECT_ROOT / ".github" / "workflows" / "deploy.yml"
RAILWAY_SCHEMA = PROJECT_ROOT / "config" / "railway.schema.json"
EDGE_RAILWAY = PROJECT_ROOT / "railway.json"
APP_RAILWAY = PROJECT_ROOT / "config" / "railway.app.json"
RAILWAY_FILES = [EDGE_RAILWAY, APP_RAILWAY]
CODECOV = PROJECT_ROOT / "codecov.yml"
COVERAGE_TARGET = 85

PINNED_ACTION = re.compile(r"^[\w.-]+/[\w.-]+(?:/[\w./-]+)?@[0-9a-f]{40}$")
EXACT_VERSION = re.compile(r"^v\d+\.\d+\.\d+$")
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)(?:\s+#\s*(?P<version>\S+))?\s*$")
# A release, never `latest` or a major line (PostgreSQL numbers its releases major.minor).
PINNED_IMAGE = re.compile(r"^[\w./-]+:\d+\.\d+(?:\.\d+)?(?:-[\w.]+)?$")
PIPED_INSTALLER = re.compile(r"\b(?:curl|wget)\b[^|\n]*\|\s*(?:sudo\s+)?(?:ba|z)?sh\b")


def run_tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(arg) for arg in args], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)


def actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    # Without -shellcheck naming the binary, actionlint skips shellcheck silently when it is
    # not on PATH (the virtualenv's bin is not, under `make test`).
    return run_tool(BIN / "actionlint", f"-shellcheck={BIN / 'shellcheck'}", "-pyflakes=", "-oneline", *files)


def load_yaml(path: Path) -> dict[str, Any]:
    loaded: dict[Any, Any] = yaml.safe_load(path.read_text())
    # YAML 1.1 reads a bare `on` key as the boolean true.
    if True in loaded:
        loaded["on"] = loaded.pop(True)
    return loaded


def load_json(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def steps_of(workflow: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for job_name, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield job_name, step


def run_blocks() -> Iterator[tuple[Path, str]]:
    for path in WORKFLOWS:
        for _, step in steps_of(load_yaml(path)):
            if "run" in step:
                yield path, step["run"]
    for script in SCRIPTS:
        yield script, script.read_text()


def pyproject() -> dict[str, Any]:
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def test_there_are_workflows_and_scripts_to_check() -> None:
    assert {path.name for path in WORKFLOWS} == {"ci.yml", "deploy.yml"}
    assert SCRIPTS, "no .github/scripts/*.sh"


# -- the tools' own verdicts ---------------------------------------------------------------------------------


def test_actionlint_finds_nothing_in_the_workflows() -> None:
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout


def test_actionlint_runs_shellcheck_on_run_blocks(tmp_path: Path) -> None:
    # The check above can fail: an unquoted variable in a `run:` block is a finding.
    workflow = tmp_path / "unquoted.yml"
    workflow.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo $HOME\n")
    result = actionlint(workflow)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "SC2086" in result.stdout, result.stdout


def test_the_workflows_scripts_pass_shellcheck() -> None:
    result = run_tool(BIN / "shellcheck", *SCRIPTS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_a_workflow_matches_githubs_schema(workflow: Path) -> None:
    result = run_tool(BIN / "check-jsonschema", "--builtin-schema", "vendor.github-workflows", workflow)
    assert result.returncode == 0, result.stdout + result.stderr


def test_codecov_yml_matches_codecovs_schema() -> None:
    result = run_tool(BIN / "check-jsonschema", "--builtin-schema", "vendor.codecov", CODECOV)
    assert result.returncode == 0, result.stdout + result.stderr


# -- Railway's files -----------------------------------------------------------------------------------------


def test_the_railway_subset_is_a_valid_schema() -> None:
    result = run_tool(BIN / "check-jsonschema", "--check-metaschema", RAILWAY_SCHEMA)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_railway_files_use_only_the_documented_fields() -> None:
    result = run_tool(BIN / "check-jsonschema", "--schemafile", RAILWAY_SCHEMA, *RAILWAY_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


UNREAD_BY_RAILWAY = {
    "start-command": (
        "deploy",
        "startCommand",
        "python -m edge --port $PORT",
    ),  # replaces the exec-form entry, unexpanded
    "misspelt": ("deploy", "healthCheckPath", "/_edge/ready"),  # Railway would ignore it
    "string-seconds": ("deploy", "drainingSeconds", "30"),  # Railway's parser wants a number
    "replicas": ("deploy", "numReplicas", 2),  # not a field of the file: multiRegionConfig is
    "builder": ("build", "builder", "NIXPACKS"),
}


def test_the_railway_subset_refuses_what_railway_would_not_read(tmp_path: Path) -> None:
    files = []
    for name, (section, field, value) in UNREAD_BY_RAILWAY.items():
        config = load_json(EDGE_RAILWAY)
        config[section][field] = value
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(config))
    result = run_tool(BIN / "check-jsonschema", "--schemafile", RAILWAY_SCHEMA, *files)
    assert result.returncode == 1, result.stdout + result.stderr
    accepted = [path.name for path in files if f"{path.name}::" not in result.stdout]
    assert not accepted, result.stdout


@pytest.mark.parametrize("config", RAILWAY_FILES, ids=lambda path: path.name)
def test_railway_builds_the_services_dockerfile_and_watches_what_goes_into_it(config: Path) -> None:
    build = load_json(config)["build"]
    dockerfile = PROJECT_ROOT / build["dockerfilePath"]
    instructions = [
        line.strip() for line in dockerfile.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    # No startCommand: the image's own command runs, in exec form, so Python gets SIGTERM.
    command = [line for line in instructions if line.startswith(("CMD", "ENTRYPOINT"))][-1]
    assert re.match(r"^(CMD|ENTRYPOINT) \[", command), command

    watched = {pattern.lstrip("/") for pattern in build["watchPatterns"]}
    sources = {dockerfile.name, ".dockerignore", str(config.relative_to(PROJECT_ROOT))}
    for line in instructions:
        if line.startswith("COPY ") and "--from=" not in line:
            sources.update(arg.rstrip("/") for arg in line.split()[1:-1] if not arg.startswith("--"))
    unwatched = [source for source in sources if source not in watched and f"{source}/**" not in watched]
    assert not unwatched, f"{config.name}: a change to {unwatched} would not redeploy"


def deploy_configs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The deploy section, then each environment's override of it."""
    return [config["deploy"], *(env["deploy"] for env in config.get("environments", {}).values() if "deploy" in env)]


@pytest.mark.parametrize(
    ("config", "drain_timeout"),
    [
        (EDGE_RAILWAY, EdgeSettings.model_fields["drain_timeout"].default),
        (APP_RAILWAY, AppSettings.model_fields["drain_timeout"].default),
    ],
    ids=["edge", "app"],
)
def test_railway_gives_a_stopping_service_longer_than_its_own_drain(config: Path, drain_timeout: float) -> None:
    for deploy in deploy_configs(load_json(config)):
        if "drainingSeconds" in deploy:
            assert deploy["drainingSeconds"] > drain_timeout


def test_the_app_runs_one_replica_since_its_data_is_on_a_volume() -> None:
    # A Railway service with a volume cannot have replicas, nor two deployments at once.
    for deploy in deploy_configs(load_json(APP_RAILWAY)):
        assert "overlapSeconds" not in deploy
        if "multiRegionConfig" in deploy:
            assert sum(region["numReplicas"] for region in deploy["multiRegionConfig"].values()) == 1


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def wait_for_ipv6(process: ServiceProcess, url: str, timeout: float = START_TIMEOUT) -> None:
    """Polls `url` until it answers 200 (ServiceProcess.wait_until asks over IPv4)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            assert process.process.poll() is None, process.output()
            with contextlib.suppress(httpx.TransportError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.05)
    raise AssertionError(f"{url} not 200 within {timeout} s:\n{process.output()}")


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_the_health_check_paths_are_served_as_on_railway(sims: Simulators, tmp_path: Path) -> None:
    edge_check = load_json(EDGE_RAILWAY)["deploy"]["healthcheckPath"]
    app_check = load_json(APP_RAILWAY)["deploy"]["healthcheckPath"]
    app_port, edge_port = new_port(), new_port()
    app_url = f"http://[::1]:{app_port}"
    # Railway's private network may be IPv6 only: the app binds `::`, the edge reaches it over
    # IPv6 and listens on the PORT Railway gives it.
    app = start_app_process(tmp_path / "app", app_environment(sims, tmp_path / "data", app_port, APP_HOST="::"))
    edge_env = {"PORT": str(edge_port), "EDGE_UPSTREAM_URL": app_url, "EDGE_DRAIN_TIMEOUT": "1"}
    try:
        wait_for_ipv6(app, f"{app_url}{API}/health")
        with (
            edge_process(tmp_path / "edge", edge_port, edge_env) as edge,
            httpx.Client(trust_env=False, timeout=10.0) as client,
        ):
            app_ready = client.get(f"{app_url}{app_check}")
            assert app_ready.status_code == 200, app_ready.text
            assert app_ready.json()["checks"]["database"] == "up"
            edge_ready = client.get(f"{edge.url}{edge_check}")
            assert edge_ready.status_code == 200, edge_ready.text
            assert edge_ready.json()["checks"]["upstream"] == "up"
            # Through the edge as well, and nothing answers 200 for a path that is not there.
            assert client.get(f"{edge.url}{app_check}").status_code == 200
            assert client.get(f"{edge.url}{edge_check}z").status_code == 404
            assert client.get(f"{edge.url}{app_check}z").status_code == 404

            # The edge's check is a readiness check: without its upstream it fails.
            app.stop()
            deadline = time.monotonic() + 15
            while (status := client.get(f"{edge.url}{edge_check}").status_code) == 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert status == 503
    finally:
        app.kill()


# -- pinned versions -----------------------------------------------------------------------------------------


def test_every_action_is_pinned_to_a_commit_named_by_its_version() -> None:
    for path in WORKFLOWS:
        used = [step["uses"] for _, step in steps_of(load_yaml(path)) if "uses" in step]
        lines = [match for line in path.read_text().splitlines() if (match := USES_LINE.match(line))]
        assert [match["ref"] for match in lines] == used, f"{path.name}: a `uses:` this test cannot read"
        for match in lines:
            assert PINNED_ACTION.match(match["ref"]), f"{path.name}: {match['ref']} is not pinned to a commit"
            version = match["version"] or ""
            assert EXACT_VERSION.match(version), (
                f"{path.name}: {match['ref']} needs its version in a comment (# v1.2.3)"
            )


def test_every_service_image_is_pinned_to_an_exact_version() -> None:
    images = [
        service["image"]
        for path in WORKFLOWS
        for job in load_yaml(path)["jobs"].values()
        for service in job.get("services", {}).values()
    ]
    assert images
    for image in images:
        assert PINNED_IMAGE.match(image), image


def test_every_tool_a_workflow_installs_is_pinned() -> None:
    for where, script in run_blocks():
        assert not PIPED_INSTALLER.search(script), f"{where.name}: a downloaded script piped into a shell"
        assert "latest" not in script, f"{where.name}: `latest`"
        for command in re.findall(r"npm (?:install|i) ([^\n]+)", script):
            packages = [arg for arg in command.split() if not arg.startswith("-")]
            assert packages, command
            assert all(re.search(r".@\d+\.\d+\.\d+$", package) for package in packages), command
        for command in re.findall(r"pip install ([^\n]+)", script):
            assert "--constraint requirements/" in command or "-r requirements/" in command, command


# -- permissions, deploys, secrets ---------------------------------------------------------------------------


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_a_workflow_can_only_read_the_repository(workflow: Path) -> None:
    loaded = load_yaml(workflow)
    assert loaded["permissions"] == {"contents": "read"}
    for name, job in loaded["jobs"].items():
        assert "write" not in str(job.get("permissions", "")), f"{workflow.name}: job {name} asks for write access"


def test_one_workflow_deploys_one_deploy_at_a_time() -> None:
    deploying = [path.name for path, script in run_blocks() if re.search(r"\brailway (?:up|redeploy|down)\b", script)]
    assert set(deploying) == {"deploy.yml"}
    deploy = load_yaml(DEPLOY)
    assert deploy["concurrency"]["group"]
    assert deploy["concurrency"]["cancel-in-progress"] is False
    for path in WORKFLOWS:
        if path != DEPLOY:
            assert "RAILWAY_TOKEN" not in path.read_text(), f"{path.name} can read the deploy token"


def test_the_deploy_follows_a_passing_ci_on_main_from_a_protected_environment() -> None:
    deploy, ci = load_yaml(DEPLOY), load_yaml(CI)
    trigger = deploy["on"]["workflow_run"]
    assert trigger == {"workflows": [ci["name"]], "types": ["completed"], "branches": ["main"]}
    assert ci["on"]["push"]["branches"] == ["main"]
    assert "pull_request" in ci["on"]
    newest, job = deploy["jobs"]["newest"], deploy["jobs"]["deploy"]
    assert "github.event.workflow_run.conclusion == 'success'" in newest["if"]
    assert "github.event.workflow_run.event == 'push'" in newest["if"]
    # Never an older commit over a newer one: CI runs on main may finish out of order.
    assert job["needs"] == "newest"
    assert job["if"] == "needs.newest.outputs.deploy == 'true'"
    assert job["environment"]["name"] == "production"
    # The token only where Railway is called: not in the actions' or the installers' reach.
    assert "RAILWAY_TOKEN" not in job.get("env", {})
    for step in job["steps"]:
        calls_railway = re.search(r"\brailway [a-z]|railway-deployments\.sh", step.get("run", "")) is not None
        has_token = step.get("env", {}).get("RAILWAY_TOKEN") == "${{ secrets.RAILWAY_TOKEN }}"
        assert has_token == (calls_railway or "RAILWAY_TOKEN" in step.get("run", "")), step.get("name")


def test_a_failed_smoke_test_rolls_back() -> None:
    job = load_yaml(DEPLOY)["jobs"]["deploy"]
    names = [step.get("name", "") for step in job["steps"]]
    runs = [step.get("run", "") for step in job["steps"]]
    smoke = next(
        index for index, run in enumerate(runs) if 'scripts/smoke.py --recording smoke.wav "$PUBLIC_URL"' in run
    )
    deploys = [index for index, run in enumerate(runs) if "railway up" in run]
    rollback = next(index for index, run in enumerate(runs) if "railway-deployments.sh rollback" in run)
    assert deploys, names
    assert max(deploys) < smoke < rollback, names
    assert job["steps"][rollback]["if"].startswith("failure()")
    assert (PROJECT_ROOT / "scripts" / "smoke.py").is_file()


# -- CI runs what `make test` runs ---------------------------------------------------------------------------


def test_ci_has_the_services_where_the_tests_look_for_them() -> None:
    services = load_yaml(CI)["jobs"]["test"]["services"]
    redis, postgres = urlsplit(REDIS_URL), urlsplit(POSTGRES_URL)
    assert f"{redis.port}:{redis.port}" in services["redis"]["ports"]
    assert f"{postgres.port}:{postgres.port}" in services["postgres"]["ports"]
    # The image's own superuser, admitted by trust, and the tests' database.
    assert postgres.username == "postgres"
    assert services["postgres"]["env"] == {"POSTGRES_HOST_AUTH_METHOD": "trust", "POSTGRES_DB": postgres.path[1:]}


def test_make_test_ci_and_codecov_hold_one_coverage_gate() -> None:
    coverage = pyproject()["tool"]["coverage"]
    assert coverage["run"]["source"] == ["edge", "app", "common"]
    assert coverage["report"]["fail_under"] >= COVERAGE_TARGET

    makefile = (PROJECT_ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "\t$(BIN)/pytest --cov" in recipe.splitlines(), recipe

    test_runs = [step.get("run", "") for step in load_yaml(CI)["jobs"]["test"]["steps"]]
    assert any(run.startswith(".venv/bin/pytest --cov ") for run in test_runs), test_runs

    status = load_yaml(CODECOV)["coverage"]["status"]["project"]["default"]
    assert status["target"] == f"{coverage['report']['fail_under']}%"


def test_ci_runs_the_container_tests_as_make_test_containers_does() -> None:
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest-containers:", 1)[1].split("\n\n", 1)[0]
    pytest_line = re.search(r"\$\(BIN\)/pytest ([^\n]+)", recipe)
    assert pytest_line, recipe
    job = load_yaml(CI)["jobs"]["containers"]
    (step,) = [step for step in job["steps"] if "pytest" in step.get("run", "")]
    assert step["run"] == f".venv/bin/pytest {pytest_line[1]}"
    assert step["env"]["CONTAINER_ENGINE"]
