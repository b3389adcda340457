"""nginx for the proxy benchmark: where it is installed, and the command line running one of
the templates (bench/nginx.conf.template, bench/nginx-concerns.conf.template) rendered for
this run's ports and temp dir."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from bench.support import BENCH_DIR


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def nginx_argv(
    nginx: str, template: str, tmp: Path, stem: str, port: int, upstream_port: int, allowed_origin: str
) -> list[str]:
    """Writes `<stem>.conf` into `tmp` (its logs go there too) and returns the command running it."""
    config = (
        (BENCH_DIR / template)
        .read_text()
        .replace("@@TMP_DIR@@", str(tmp))
        .replace("@@LISTEN_PORT@@", str(port))
        .replace("@@UPSTREAM_PORT@@", str(upstream_port))
        .replace("@@ALLOWED_ORIGIN_REGEX@@", re.escape(allowed_origin))
    )
    (tmp / f"{stem}.conf").write_text(config)
    return [nginx, "-p", str(tmp), "-e", str(tmp / f"{stem}.error.log"), "-c", str(tmp / f"{stem}.conf")]
