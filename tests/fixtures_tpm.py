"""Fixtures: a real swtpm on a Unix socket, per session and per test, checked for leaked handles."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from luks_tpm.model import FENCE_BANK, FENCE_PCR
from luks_tpm.tpm import Tpm
from luks_tpm.tpm.pcr import pcr_values


class Swtpm:
    """A swtpm process serving one state directory; `tcti` is what luks-tpm is pointed at.

    On Unix sockets by default; with `port`, on TCP 127.0.0.1:port (control channel port+1), which is what
    a TCP proxy in front of it (the benchmark's latency model) needs."""

    def __init__(self, state: Path, *, port: int | None = None) -> None:
        self.state = state
        self.socket = state / "swtpm.sock"
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket}" if self.port is None else f"swtpm:host=127.0.0.1,port={self.port}"

    def _channels(self) -> tuple[str, str]:
        """swtpm's --server and --ctrl arguments."""
        if self.port is not None:
            return (
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
            )
        # the swtpm TCTI finds the control channel at <path>.ctrl
        return f"type=unixio,path={self.socket}", f"type=unixio,path={self.socket}.ctrl"

    def start(self) -> None:
        if shutil.which("swtpm") is None:
            pytest.skip("swtpm is not installed (scripts/bootstrap installs it)")
        self.state.mkdir(parents=True, exist_ok=True)
        server, ctrl = self._channels()
        self.process = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state}",
                "--server",
                server,
                "--ctrl",
                ctrl,
                "--flags",
                "not-need-init,startup-clear",
                "--log",
                f"file={self.state / 'swtpm.log'}",
            ],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._accepting():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"swtpm did not start (exit {self.process.poll()})")
            time.sleep(0.01)

    def _accepting(self) -> bool:
        """swtpm creates its socket files a moment before it listens on them (a connection can be refused
        in between, about 1 start in 13 here): connect to both once to be sure."""
        if self.port is not None:
            for port in (self.port, self.port + 1):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return False
            return True
        for path in (self.socket, Path(f"{self.socket}.ctrl")):
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                except OSError:
                    return False
        return True

    def stop(self) -> None:
        """Shut down cleanly so the state is saved, as a real power-off would."""
        if self.process is None:
            return
        subprocess.run(["tpm2_shutdown", "-T", self.tcti], check=False, capture_output=True)
        control = ["--unix", f"{self.socket}.ctrl"] if self.port is None else ["--tcp", f"127.0.0.1:{self.port + 1}"]
        subprocess.run(["swtpm_ioctl", *control, "-s"], check=False, capture_output=True)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def tpm2(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a tpm2-tools command against this TPM (e.g. clear, pcrextend), as an operator would."""
        return subprocess.run(
            ["tpm2_" + args[0], "-T", self.tcti, *args[1:]], check=True, capture_output=True, text=True
        )

    def loaded_handles(self) -> list[int]:
        """Transient objects and sessions currently in the TPM (loaded and saved sessions included)."""
        with Tpm(self.tcti) as tpm:
            return [handle for first in (0x80000000, 0x02000000, 0x03000000) for handle in tpm.handles(first)]

    def assert_clean(self) -> None:
        left = self.loaded_handles()
        assert left == [], f"the TPM still holds transient objects or sessions: {[hex(h) for h in left]}"


@pytest.fixture(scope="session")
def session_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    swtpm = Swtpm(tmp_path_factory.mktemp("swtpm"))
    swtpm.start()
    yield swtpm
    swtpm.stop()


@pytest.fixture
def swtpm(session_swtpm: Swtpm) -> Iterator[Swtpm]:
    """The shared swtpm; the test fails if it leaves objects or sessions loaded, or the fence raised (PCR 15
    stays extended until the TPM restarts, and fenced tokens of later tests would not unlock)."""
    yield session_swtpm
    session_swtpm.assert_clean()
    with Tpm(session_swtpm.tcti) as tpm:
        fence = pcr_values(tpm, FENCE_BANK, [FENCE_PCR])[FENCE_PCR]
    assert fence == bytes(FENCE_BANK.size), "the test raised the fence on the shared swtpm: use fresh_swtpm"


def _own_swtpm(state: Path) -> Iterator[Swtpm]:
    """A swtpm for one test, checked for leaked handles and stopped at its end."""
    swtpm = Swtpm(state)
    swtpm.start()
    yield swtpm
    try:
        swtpm.assert_clean()
    finally:
        swtpm.stop()


@pytest.fixture(scope="module")
def module_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """A TPM shared by one module's tests (for modules that change its state as a whole)."""
    yield from _own_swtpm(tmp_path_factory.mktemp("module-swtpm"))


@pytest.fixture
def fresh_swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A TPM of its own, for tests that clear it, extend PCRs or exhaust the DA counter."""
    yield from _own_swtpm(tmp_path / "swtpm")


@pytest.fixture
def second_swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """Another TPM (another machine's): its own seeds, its own EK, for volumes that carry tokens of both."""
    yield from _own_swtpm(tmp_path / "second-swtpm")
