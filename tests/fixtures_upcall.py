"""Fixtures: request-key upcalls routed to this checkout's luks-tpm, and a stand-in syslog.

Every test writes its own file in /etc/request-key.d/ whose patterns match only this run's descriptions
(other test runs may share the machine: a random application-name prefix, the test volume's own UUID),
and the fixture removes it whatever happens. Requests are made from the test's private session keyring,
with `keyctl request2` (as a shell user would).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luks_tpm import keyring

from . import keyutils
from .fixtures_tpm import Swtpm
from .helpers import REPO

REQUEST_KEY_D = Path("/etc/request-key.d")
NEGATE_SECONDS = 2  # the handler's negative-key timeout in these tests (10 s by default)
NOBODY = 65534
ENOKEY_TEXT = "Required key not available"


class Upcall:
    """One request-key.d file routing this test's descriptions to this checkout's luks-tpm."""

    def __init__(self, tcti: str, environment: str = "") -> None:
        self.prefix = f"t{secrets.token_hex(6)}"
        self.path = REQUEST_KEY_D / f"luks-tpm-test-{self.prefix}.conf"
        # The kernel's helper runs with PATH=/sbin:/bin:/usr/sbin:/usr/bin in /: absolute paths only.
        self.command = (
            f"/usr/bin/env PYTHONPATH={REPO} LUKS_TPM_NEGATE_TIMEOUT={NEGATE_SECONDS} {environment} "
            f"{sys.executable} -m luks_tpm --tcti {tcti} request-key %k %t %d %c %S"
        )
        self.volumes: list[str] = []
        self._write()

    def app(self, name: str = "") -> str:
        return f"luks-tpm:app:{self.prefix}{name}"

    def serve_volume(self, uuid: str) -> None:
        self.volumes.append(uuid)
        self._write()

    def _write(self) -> None:
        lines = [f"create user luks-tpm:app:{self.prefix}* * {self.command}"]
        lines += [f"create logon cryptsetup:{uuid}-d* * {self.command}" for uuid in self.volumes]
        temporary = self.path.with_suffix(".tmp")  # request-key reads *.conf: never a half-written one
        temporary.write_text("\n".join(lines) + "\n")
        temporary.rename(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".tmp").unlink(missing_ok=True)


@pytest.fixture
def upcalls(private_session_keyring: int) -> Iterator[Callable[..., Upcall]]:
    """Makes `Upcall`s for a TPM; every file made is removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root to write /etc/request-key.d")
    if not os.access("/sbin/request-key", os.X_OK) or not REQUEST_KEY_D.is_dir():
        pytest.skip("needs keyutils' /sbin/request-key and /etc/request-key.d")
    made: list[Upcall] = []

    def make(tcti: str, environment: str = "") -> Upcall:
        made.append(Upcall(tcti, environment))
        return made[-1]

    try:
        yield make
    finally:
        for upcall in made:
            upcall.remove()


@pytest.fixture
def upcall(swtpm: Swtpm, upcalls: Callable[..., Upcall]) -> Upcall:
    return upcalls(swtpm.tcti)


class Refused(Exception):
    pass


def request(key_type: str, description: str, callout: str) -> int:
    """`keyctl request2` in the test's session keyring: the new key's serial, or Refused(stderr)."""
    result = subprocess.run(
        ["keyctl", "request2", key_type, description, callout, "@s"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )  # a hang guard, not a measurement
    if result.returncode:
        raise Refused(result.stderr.strip())
    return int(result.stdout)


def refused(key_type: str, description: str, callout: str) -> str:
    with pytest.raises(Refused) as caught:
        request(key_type, description, callout)
    return str(caught.value)


def take(serial: int) -> bytes:
    """The key's payload, then the key is revoked and unlinked so that the next request is an upcall."""
    try:
        return bytes(keyutils.read(serial))
    finally:
        drop(serial)


def drop(serial: int) -> None:
    keyutils.revoke(serial)
    keyring.unlink(serial, keyring.SESSION)


@pytest.fixture
def syslog_socket() -> Iterator[socket.socket]:
    """Stand in for the syslog daemon at /dev/log (the handler logs there: it has no terminal)."""
    if Path("/dev/log").exists():
        pytest.skip("/dev/log belongs to a running syslog daemon")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        receiver.bind("/dev/log")
    except OSError as error:
        pytest.skip(f"cannot listen on /dev/log: {error}")
    receiver.settimeout(0.2)
    try:
        yield receiver
    finally:
        receiver.close()
        Path("/dev/log").unlink(missing_ok=True)


def received(receiver: socket.socket, marker: str) -> list[str]:
    lines = []
    with contextlib.suppress(TimeoutError):
        while True:
            line = receiver.recv(65536).decode(errors="replace")
            if marker in line:
                lines.append(line)
    return lines
