"""The data directory (`APP_DATA_DIR`) and everything in it are the app's user's alone:
directories 0700, files 0600.

`python -m app` sets the umask 077 before anything is opened, so that whatever the app
and its libraries create there - the SQLite database and its -wal and -shm files, reply
audio, the embedded Qdrant's files - is owner-only from the moment it exists (sqlite and
qdrant-client take no mode of their own). `secure` makes the directory and puts right
what an older version left group- or world-readable, at every start.

A platform volume may be mounted owned by root (Railway's is), where the image's user
cannot write. Started as root with `APP_RUN_AS_USER` set, the app gives the directory (and
the backup directory) to that user and becomes it before anything else (`become`), so it never runs as root
(docs/deployment.md#the-volume-and-its-owner).

While an app process keeps its stores in the directory (SQLite, the embedded Qdrant) it
holds `claim`'s lock on it: a second app process, or a restore, is refused instead of
corrupting it. The kernel lets go when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import IO

OWNER_ONLY_UMASK = 0o077
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
LOCK_FILE = "app.lock"


class DataDirInUse(Exception):
    pass


def restrict_umask() -> None:
    os.umask(OWNER_ONLY_UMASK)


def secure(directory: Path) -> None:
    """Creates `directory` if need be; chmods it and everything under it to owner-only.
    The directory itself may be a link to a volume; links inside it are left as they are,
    since chmod would follow them out of it."""
    directory.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
    top = directory.resolve()
    _restrict(top, DIRECTORY_MODE)
    for root, directories, files in os.walk(top):
        for name in directories:
            _restrict(Path(root, name), DIRECTORY_MODE)
        for name in files:
            _restrict(Path(root, name), FILE_MODE)


def _restrict(path: Path, mode: int) -> None:
    try:
        status = path.lstat()
    except FileNotFoundError:  # deleted meanwhile, by another replica's sweep on a shared volume
        return
    if not stat.S_ISLNK(status.st_mode) and stat.S_IMODE(status.st_mode) != mode:
        path.chmod(mode)


def claim(directory: Path) -> IO[bytes]:
    """`directory` to this process alone while the returned file stays open;
    `DataDirInUse` if another process has it."""
    directory.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
    descriptor = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise DataDirInUse(f"{directory} is in use by an app process (one at a time): stop it first") from None
    return os.fdopen(descriptor, "rb")


def become(user: tuple[int, int], *directories: Path) -> None:
    """As root: each of `directories` and everything in it owned by `user` (uid, gid), then
    this process runs as that user alone, with no supplementary groups. Not root: nothing
    to do (the image's own user, or a developer's)."""
    if os.geteuid() != 0:
        return
    uid, gid = user
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
        top = directory.resolve()
        os.chown(top, uid, gid)
        for root, names, files in os.walk(top):
            for name in [*names, *files]:
                os.chown(Path(root, name), uid, gid, follow_symlinks=False)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
