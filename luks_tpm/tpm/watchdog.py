"""A bound on every wait for the TPM.

ESYS's synchronous calls wait for the TPM's answer without end (they set their own timeout to "block"
and retry while the TCTI says "try again"), so a TPM, a resource manager or a socket that never answers
would hang luks-tpm, and with it a boot or a program's request_key(2). Every TPM command is therefore
sent under a deadline (`Watchdog.bound`, armed by context.Tpm around each ESYS command). When it passes,
the watchdog's thread shuts down the sockets opened since the connection began (the TCTI's: swtpm's
connects for each command, mssim's and tabrmd's at the start): the blocked read returns, the command
fails as a command does (exit 4, a message naming what was being done, everything cleaned up). Where there is
no socket to shut down (the device TCTI: the kernel bounds its own waits) or the TSS does not return
after all, the process ends GRACE seconds later with the same words on stderr and exit 4.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator

from ..errors import ExitCode

TIMEOUT_SECONDS = 60  # far beyond any command luks-tpm sends (an ECC primary: about a second on hardware)
TIMEOUT_ENVIRONMENT = "LUKS_TPM_TPM_TIMEOUT"
GRACE_SECONDS = 3
TICK_SECONDS = 0.25  # how often the thread looks at the deadline


def timeout_seconds() -> float:
    """The bound, from LUKS_TPM_TPM_TIMEOUT (seconds, 1 to 3600) when set to such a number."""
    value = os.environ.get(TIMEOUT_ENVIRONMENT, "")
    if value.isascii() and value.isdigit() and 1 <= int(value) <= 3600:
        return float(value)
    return float(TIMEOUT_SECONDS)


def open_sockets() -> frozenset[int]:
    """This process's file descriptors that are sockets."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                found.add(int(name))
    return frozenset(found)


class Watchdog:
    """One thread per process, armed for one TPM command at a time."""

    def __init__(self) -> None:
        self._reset()
        # A forked child has no watchdog thread, and the lock may have been held by the parent's.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._condition = threading.Condition()
        self._armed: tuple[int, float, str, frozenset[int]] | None = None  # generation, deadline, doing, baseline
        self._generation = 0
        self._expired = -1  # the generation whose deadline passed
        self._owner = -1  # the pid whose thread runs

    @contextlib.contextmanager
    def bound(self, doing: str, baseline: frozenset[int]) -> Iterator[None]:
        """Run the block (one TPM command) under the deadline; when it passes, the sockets open then that are
        not in `baseline` (those open before the connection began) are shut down."""
        with self._condition:
            if self._owner != os.getpid():  # started on first use: most processes never need it
                self._owner = os.getpid()
                threading.Thread(target=self._watch, name="luks-tpm-watchdog", daemon=True).start()
            self._generation += 1
            self._armed = (self._generation, time.monotonic() + timeout_seconds(), doing, baseline)
            # no notify: the thread looks every TICK seconds (waking it per command would cost a
            # context switch per command, measured at ~40 us on swtpm)
        try:
            yield
        finally:
            with self._condition:
                self._armed = None

    def expired(self) -> bool:
        """Whether the command that just ended (or is ending) ran past its deadline."""
        with self._condition:
            return self._expired == self._generation

    def _watch(self) -> None:
        with self._condition:
            while True:
                armed = self._armed
                if armed is None:
                    self._condition.wait(TICK_SECONDS)
                    continue
                generation, deadline, doing, baseline = armed
                left = deadline - time.monotonic()
                if generation == self._expired:
                    left += GRACE_SECONDS
                if left > 0:
                    self._condition.wait(min(left, TICK_SECONDS))
                    continue
                if generation != self._expired:
                    self._expired = generation
                    for fd in open_sockets() - baseline:  # the blocked read returns; the command fails, saying why
                        with contextlib.suppress(OSError):
                            _shutdown(fd)
                    continue
                _give_up(doing)


def _shutdown(fd: int) -> None:
    """Shut the socket down for both directions; the descriptor stays open (it is the TCTI's to close)."""
    probe = socket.socket(fileno=fd)
    try:
        probe.shutdown(socket.SHUT_RDWR)
    finally:
        probe.detach()


def _give_up(doing: str) -> None:
    """The TSS did not return: end the process (its TPM objects go with the connection, its memory with it)."""
    seconds = int(timeout_seconds())
    with contextlib.suppress(OSError):
        os.write(
            sys.stderr.fileno(),
            f"luks-tpm: the TPM did not answer within {seconds} s ({doing})\n".encode(),
        )
    os._exit(ExitCode.TPM_UNAVAILABLE)


WATCHDOG = Watchdog()
