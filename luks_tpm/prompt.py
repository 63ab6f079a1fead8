"""Secrets a person gives (passphrases, PINs, the lockout authorization), typed or read from a file, and
the recovery key shown once.

They are read byte by byte into a `Secret` (no `str`, no `getpass`) and written to the terminal straight
from it. Key files are read as `cryptsetup --key-file` reads them: exact bytes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import Cause, ExitCode, die
from .files import open_regular
from .secret import Secret

MAX_PASSPHRASE = 512
MAX_KEY_FILE = 8192 * 1024  # cryptsetup's own limit for key files
MAX_PIN = 32  # a sealed object's authValue is at most its nameAlg's digest size (SHA-256)
_MODHEX = b"cbdefghijklnrtuv"  # unambiguous on any keyboard layout, as systemd's recovery keys
RECOVERY_KEY_BYTES = 32

PassphraseSource = Callable[[], Secret]  # an existing passphrase, recovery key or key file
NewPinSource = Callable[[], Secret | None]  # a new binding's PIN, or None when there is none
PinSource = Callable[[int], Secret | None]  # token id -> its PIN, or None when none can be had
Confirm = Callable[[list[str], str], bool]  # shows the lines, asks the question; True to go on


def check_pin(pin: Secret, where: str) -> Secret:
    """A PIN is 1 to 32 bytes, none of them NUL: the TPM drops trailing zero bytes from an authorization
    value, so a PIN of NULs would be no PIN at all, and `ab\\0` would be `ab` (TPM 2.0 Part 1, "authValue").
    Anything else is refused before it reaches the TPM."""
    if 0 in pin.view():
        pin.close()
        die(
            f"{where}: a PIN cannot contain a NUL byte (the TPM would drop trailing ones)",
            hint="choose a PIN of printable characters",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )
    return pin


def pin_source(path: Path | None) -> PinSource:
    """PINs for tokens that have one: from `path` (--pin-file), else asked on the terminal, else none
    (an unattended unlock then skips those tokens)."""

    def pins(token_id: int) -> Secret | None:
        if path is not None:
            return read_pin_file(path, "--pin-file")
        if sys.stdin.isatty():
            return check_pin(ask(f"PIN for token {token_id}: ", limit=MAX_PIN), "the PIN entered")
        return None

    return pins


def read_pin_file(path: Path, option: str) -> Secret:
    return check_pin(read_file(path, what="PIN", option=option, limit=MAX_PIN), f"{option} {path}")


def read_file(path: Path, *, what: str, option: str, limit: int = MAX_KEY_FILE) -> Secret:
    """A key file's exact bytes, as `cryptsetup --key-file` reads them ('-' is standard input)."""
    fd = open_regular(path, what=what, option=option)
    data = bytearray(limit + 1)
    try:
        length = 0
        while length < len(data) and (count := os.readv(fd, [memoryview(data)[length:]])):
            length += count
        if not 0 < length <= limit:
            die(
                f"{option} {path}: the {what} must be 1 to {limit} bytes, not " + ("empty" if not length else "longer"),
                code=ExitCode.USAGE,
                cause=Cause.USAGE,
            )
        return Secret.copy_of(memoryview(data)[:length])
    finally:
        data[:] = bytes(len(data))
        if str(path) != "-":
            os.close(fd)


@contextlib.contextmanager
def _terminal() -> Iterator[int]:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        die(
            "no terminal to ask for the passphrase or PIN",
            hint="give it in a file (--unlock-key-file, --pin-file)",
            code=ExitCode.USAGE,
        )
    try:
        yield fd
    finally:
        os.close(fd)


def ask(prompt: str, *, twice: bool = False, limit: int = MAX_PASSPHRASE) -> Secret:
    """Read a line from the terminal with echo off."""
    with _terminal() as fd:
        first = _read_line(fd, prompt)
        if len(first) > limit:
            first.close()
            die(f"at most {limit} bytes, please", code=ExitCode.USAGE)
        if not twice:
            return first
        with _read_line(fd, "Again: ") as second:
            if not first.equals(second):
                first.close()
                die("the two entries differ", code=ExitCode.USAGE)
        return first


def _read_line(fd: int, prompt: str) -> Secret:
    import termios  # here: most runs never prompt

    os.write(fd, prompt.encode())
    old = termios.tcgetattr(fd)
    quiet = list(old)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
    line = Secret(MAX_PASSPHRASE)
    length = 0
    try:
        while length < MAX_PASSPHRASE:
            byte = os.read(fd, 1)
            if not byte or byte == b"\n":
                break
            line.view()[length] = byte[0]
            length += 1
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, old)
        os.write(fd, b"\n")
    if length == 0:
        line.close()
        die("nothing was entered", code=ExitCode.USAGE)
    with line:
        return Secret.copy_of(line.view()[:length])


def generate_recovery_key() -> Secret:
    """256 random bits as 8 dash-separated groups of 8 modhex characters."""
    import secrets  # here: it loads `random`, which an unlock (that may ask for a PIN) does not need

    raw = bytearray(secrets.token_bytes(RECOVERY_KEY_BYTES))
    key = Secret(RECOVERY_KEY_BYTES * 2 + RECOVERY_KEY_BYTES // 4 - 1)
    view, position = key.view(), 0
    for index, byte in enumerate(raw):
        if index and index % 4 == 0:
            view[position] = ord("-")
            position += 1
        view[position] = _MODHEX[byte >> 4]
        view[position + 1] = _MODHEX[byte & 15]
        position += 2
    raw[:] = bytes(len(raw))
    return key
