"""A private Docker engine for the container tests (`make test-containers`; docs/deployment.md).

`python scripts/container_engine.py run -- COMMAND [ARG...]` runs COMMAND with a Docker
engine of its own and stops that engine afterwards, whatever COMMAND's outcome:

1. installs Debian's `docker.io` and `debootstrap` when their commands are missing
   (scripts/install_debian_packages.sh), but only where the package's own service is kept
   from starting (policy-rc.d), so that no system daemon comes up;
2. starts `dockerd` with everything under ENGINE_DIR - data root, exec root, socket, pid
   file, log - and no bridge, iptables, forwarding or masquerading, so neither another
   daemon nor the host's network rules are touched;
3. makes the base image, once (kept by its tag in the data root): Debian bookworm by
   debootstrap from the mirror of the host's own apt sources, with the host's CA bundle,
   stripped of documentation and locales, imported as BASE_TAG;
4. runs COMMAND with DOCKER_HOST (the engine's socket), DOCKER_CONFIG (holding the
   Compose v2 plugin from the virtualenv) and CONTAINER_BASE_IMAGE (BASE_TAG) set, and
   CONTAINER_ENGINE set to DOCKER_HOST's value;
5. removes every container, network and volume, and SIGTERMs the daemon by its PID
   (SIGKILL after STOP_TIMEOUT_S).

Images and build cache stay in the data root, so the next run builds only what changed;
`rm -rf ENGINE_DIR` (while no run is under way) removes them too.

Without root, or where the packages cannot be installed, COMMAND still runs, with
CONTAINER_ENGINE_UNAVAILABLE saying why (the container tests skip, giving that reason).
One run at a time uses ENGINE_DIR: a second waits for the first. Exit status: COMMAND's.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
# Checked to be a directory of this user's own before use (exclusive_use).
ENGINE_DIR = Path(os.environ.get("CONTAINER_ENGINE_DIR", "/tmp/voice-containers"))  # noqa: S108
BASE_TAG = "voice-companion/base:bookworm-python3.11"
BASE_PACKAGES = "python3.11,python3-venv,ca-certificates"
SUITE = "bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
COMPOSE_PLUGIN = ROOT / ".venv" / "bin" / "docker-compose"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# What a minimal image needs none of; apt's lists and caches come back with `apt-get update`.
STRIPPED = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
)


class EngineUnavailable(Exception):
    """Why this machine cannot give the tests an engine: the tests skip, saying so."""


class EngineFailed(Exception):
    """An engine that should have started did not: the run fails."""


def say(message: str) -> None:
    print(f"container engine: {message}", file=sys.stderr, flush=True)


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the private Docker engine needs root (dockerd, debootstrap)"
    return None


def install_packages() -> None:
    missing = [command for command in ("dockerd", "debootstrap") if not executable(command)]
    if not missing:
        return
    # On a machine whose init starts services on installation, docker.io would start the
    # system's daemon, which sets up its own bridge and iptables rules.
    policy = Path("/usr/sbin/policy-rc.d")
    if not policy.exists() or subprocess.run([str(policy), "docker", "start"], check=False).returncode != 101:
        raise EngineUnavailable(
            "docker.io is not installed and installing it here would start the system's Docker service; "
            "install docker.io and debootstrap first"
        )
    subprocess.run(
        [str(ROOT / "scripts" / "install_debian_packages.sh"), "dockerd:docker.io", "debootstrap:debootstrap"],
        check=True,
    )
    still_missing = [command for command in missing if not executable(command)]
    if still_missing:
        raise EngineUnavailable(f"not installed: {', '.join(still_missing)}")


def executable(command: str) -> str | None:
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")


def docker_command() -> str:
    found = shutil.which("docker")
    if found is None:
        raise EngineUnavailable("no docker command on PATH (the docker.io package provides one)")
    return found


@contextmanager
def exclusive_use() -> Iterator[None]:
    """ENGINE_DIR for this run alone: one daemon per data root."""
    ENGINE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    # /tmp is everybody's: a symlink or someone else's directory there is not ours to use.
    if ENGINE_DIR.is_symlink() or ENGINE_DIR.stat().st_uid != os.geteuid():
        raise EngineFailed(f"{ENGINE_DIR} is not a directory of this user's own")
    with (ENGINE_DIR / "lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for the other run using {ENGINE_DIR}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class Engine:
    """One dockerd, everything of it under ENGINE_DIR."""

    def __init__(self) -> None:
        self.socket = ENGINE_DIR / "docker.sock"
        self.pidfile = ENGINE_DIR / "docker.pid"
        self.log = ENGINE_DIR / "dockerd.log"
        self.config_dir = ENGINE_DIR / "config"
        self.process: subprocess.Popen[bytes] | None = None
        self.docker = ""

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def environment(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_CONFIG": str(self.config_dir)}

    def start(self) -> None:
        self.docker = docker_command()
        self.stop_leftover()
        plugins = self.config_dir / "cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        plugin = plugins / "docker-compose"
        plugin.unlink(missing_ok=True)
        plugin.symlink_to(COMPOSE_PLUGIN)
        # An empty configuration of its own: /etc/docker/daemon.json is another daemon's.
        daemon_config = ENGINE_DIR / "daemon.json"
        daemon_config.write_text("{}\n")
        dockerd = executable("dockerd")
        assert dockerd is not None  # install_packages checked
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    dockerd,
                    f"--config-file={daemon_config}",
                    f"--data-root={ENGINE_DIR / 'data'}",
                    f"--exec-root={ENGINE_DIR / 'exec'}",
                    f"--host={self.host}",
                    f"--pidfile={self.pidfile}",
                    "--storage-driver=overlay2",
                    "--bridge=none",
                    "--iptables=false",
                    "--ip6tables=false",
                    "--ip-forward=false",
                    "--ip-masq=false",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the terminal's Ctrl-C is for the command, not the daemon
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace").splitlines()[-10:]
                raise EngineFailed("dockerd did not start:\n" + "\n".join(tail))
            time.sleep(0.2)
        say(f"dockerd (pid {self.process.pid}) listening on {self.host}")
        self.clear()

    def clear(self) -> None:
        """No container, network or volume outlives a run; a run that was killed left some,
        which would come back up with the daemon (restart policies)."""
        docker = self.docker
        environment = self.environment()
        listed = subprocess.run(
            [docker, "ps", "--all", "--quiet"], env=environment, capture_output=True, text=True, check=False
        )
        containers = listed.stdout.split()
        if containers:
            subprocess.run(
                [docker, "rm", "--force", "--volumes", *containers], env=environment, capture_output=True, check=False
            )
        for kind in ("network", "volume"):
            subprocess.run([docker, kind, "prune", "--force"], env=environment, capture_output=True, check=False)

    def answers(self) -> bool:
        probe = subprocess.run(
            [self.docker, "version", "--format", "{{.Server.Version}}"],
            env=self.environment(),
            capture_output=True,
            check=False,
        )
        return probe.returncode == 0

    def stop_leftover(self) -> None:
        """A daemon of an earlier run that was killed before it could stop its own: the lock
        is ours, so a live process in the pid file running dockerd is that one."""
        try:
            pid = int(self.pidfile.read_text())
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"dockerd" in command_line and str(ENGINE_DIR).encode() in command_line:
            say(f"stopping the daemon a previous run left (pid {pid})")
            terminate(pid)
            unmount_under(ENGINE_DIR)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.clear()
            say(f"stopping dockerd (pid {self.process.pid})")
            terminate(self.process.pid)
            self.process.wait()
        # It keeps the host's network namespace bound at exec-root/netns/default.
        unmount_under(ENGINE_DIR)


def terminate(pid: int) -> None:
    """SIGTERM, then SIGKILL if it is still there after STOP_TIMEOUT_S."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.1)


def unmount_under(directory: Path) -> None:
    """Whatever a stopped daemon or an interrupted debootstrap left mounted under
    `directory`, innermost first."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    prefix = f"{directory}/"
    for mount_point in sorted((point for point in mounts if point.startswith(prefix)), reverse=True):
        subprocess.run(["umount", mount_point], check=False)  # noqa: S607 - util-linux, on PATH


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its parent reaps it


def apt_mirror() -> str:
    """The Debian mirror the host's own apt sources use for SUITE's main archive."""
    deb822 = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in deb822:
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                name, _, value = line.partition(":")
                if value and not name.startswith("#"):
                    fields[name.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split():
                return fields["uris"].split()[0]
    one_line = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            match = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
            if match and match.group(2) == SUITE:
                return match.group(1)
    raise EngineUnavailable(f"no Debian {SUITE} archive in the host's apt sources to build the base image from")


def ensure_base_image(engine: Engine) -> None:
    docker = engine.docker
    environment = engine.environment()
    inspect = [docker, "image", "inspect", BASE_TAG]
    if subprocess.run(inspect, env=environment, capture_output=True, check=False).returncode == 0:
        return
    debootstrap = executable("debootstrap")
    assert debootstrap is not None  # install_packages checked
    mirror = apt_mirror()
    say(f"making the base image {BASE_TAG} (debootstrap {SUITE}, about a minute)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=ENGINE_DIR, prefix="rootfs-") as workspace:
        rootfs = Path(workspace) / "rootfs"
        log_path = ENGINE_DIR / "debootstrap.log"
        try:
            with log_path.open("wb") as log:
                bootstrapped = subprocess.run(
                    [debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, str(rootfs), mirror],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
        finally:
            unmount_under(rootfs)  # its /proc and /sys, when it was interrupted
        if bootstrapped.returncode != 0:
            raise EngineFailed(f"debootstrap failed (status {bootstrapped.returncode}); see {log_path}")
        for stripped in STRIPPED:
            target = rootfs / stripped
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True, exist_ok=True)
        # This machine's HTTPS egress may be intercepted: trust what the host trusts.
        shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        bundle = "/etc/ssl/certs/ca-certificates.crt"
        changes = [
            f"ENV SSL_CERT_FILE={bundle} PIP_CERT={bundle} REQUESTS_CA_BUNDLE={bundle}",
            "ENV LANG=C.UTF-8",
            'CMD ["python3"]',
        ]
        tar = subprocess.Popen(
            [shutil.which("tar") or "/usr/bin/tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
            stdout=subprocess.PIPE,
        )
        change_arguments = [argument for change in changes for argument in ("--change", change)]
        imported = subprocess.run(
            [docker, "import", *change_arguments, "-", BASE_TAG],
            stdin=tar.stdout,
            env=environment,
            stdout=subprocess.DEVNULL,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise EngineFailed("the base image could not be imported")
    say(f"base image {BASE_TAG} made in {time.monotonic() - started:.0f} s")


def run_command(command: list[str], environment: dict[str, str]) -> int:
    """COMMAND in this process group (Ctrl-C reaches it), with SIGTERM passed on to it."""
    child = subprocess.Popen(command, env=environment)

    def pass_on(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue  # the child got the same SIGINT; its exit ends this run
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(command: list[str]) -> int:
    reason = unavailable_reason()
    if reason is not None:
        return run_unavailable(command, reason)
    # SIGTERM during set-up or clean-up: unwind through the clean-up below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    engine = Engine()
    try:
        with exclusive_use():
            try:
                try:
                    install_packages()
                    engine.start()
                    ensure_base_image(engine)
                except EngineUnavailable as unavailable:
                    engine.stop()
                    return run_unavailable(command, str(unavailable))
                environment = {
                    **engine.environment(),
                    "CONTAINER_ENGINE": engine.host,
                    "CONTAINER_BASE_IMAGE": BASE_TAG,
                }
                return run_command(command, environment)
            finally:  # also after Ctrl-C or SIGTERM during set-up: the daemon never outlives the run
                engine.stop()
    except (EngineFailed, subprocess.CalledProcessError) as error:
        say(f"failed: {error}")
        return 1


def run_unavailable(command: list[str], reason: str) -> int:
    say(f"unavailable: {reason}")
    return run_command(command, {**os.environ, "CONTAINER_ENGINE_UNAVAILABLE": reason})


def main(arguments: list[str]) -> int:
    if len(arguments) < 3 or arguments[:2] != ["run", "--"]:
        print("usage: container_engine.py run -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    return run(arguments[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
