"""Files only their owner can read: the embedded server's data, its password, job logs.
Modes are set explicitly (0700 dirs, 0600 files), so the umask does not matter."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import TextIO

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(d: Path) -> Path:
    """Create `d` (and missing parents) and make it 0700 when it is ours."""
    d.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    st = d.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != DIR_MODE:
        d.chmod(DIR_MODE)
    return d


def open_private(path: Path, mode: str = "a") -> TextIO:
    """Open a text file for writing ("w" or "a"), created 0600 or made 0600."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an existing file keeps its mode otherwise
        return io.TextIOWrapper(io.FileIO(fd, "a" if mode.startswith("a") else "w"), "utf-8")
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path, text: str) -> None:
    with open_private(path, "w") as f:
        f.write(text)


def tighten(d: Path) -> None:
    """Make everything under `d` 0700 (dirs) or 0600 (files): data written by older
    versions, or with a loose umask. Symlinks and other users' files are left alone."""
    uid = os.getuid()
    for p in d.rglob("*"):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode) or st.st_uid != uid:
            continue
        want = DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE
        if stat.S_IMODE(st.st_mode) != want:
            p.chmod(want)
