"""Files a person names (crypttab, key and PIN files, the lockout authorization): regular files of bounded
size, opened without ever blocking.

A FIFO, a socket, a terminal, /dev/zero or a directory where a file is expected would hang a command or
make it read without end; each is refused at once, with one line naming the option. The check is made on
the opened descriptor (O_NONBLOCK, then fstat), so the file cannot be swapped between a check and the
read. '-' is standard input, read as it is (the caller bounds it).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from .errors import Cause, ExitCode, die


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, *, what: str, option: str) -> int:
    """A descriptor of `path`, a regular file (standard input for '-'); a usage error (exit 2) otherwise."""
    if str(path) == "-":
        return sys.stdin.fileno()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        die(f"{option} {path}: cannot read the {what}: {error.strerror}", code=ExitCode.USAGE, cause=Cause.USAGE)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        die(
            f"{option} {path}: {_kind(mode)}, not a regular file",
            hint=f"give the {what} in a regular file",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )
    os.set_blocking(fd, True)
    return fd


def read_bytes(path: Path, *, what: str, option: str, limit: int) -> bytes:
    """The whole content of a regular file of at most `limit` bytes (not for key material: see prompt.py)."""
    fd = open_regular(path, what=what, option=option)
    try:
        data = os.read(fd, limit + 1)
        while len(data) <= limit and (more := os.read(fd, limit + 1 - len(data))):
            data += more
    except OSError as error:
        die(f"{option} {path}: cannot read the {what}: {error.strerror}", code=ExitCode.USAGE, cause=Cause.USAGE)
    finally:
        if str(path) != "-":
            os.close(fd)
    if len(data) > limit:
        die(f"{option} {path}: the {what} is longer than {limit} bytes", code=ExitCode.USAGE, cause=Cause.USAGE)
    return data
