"""A fault-injecting Unix-socket proxy in front of swtpm's data socket: a TPM that breaks at command N.

    with FaultProxy(swtpm.socket, tmp_path / "faulty.sock") as proxy:
        proxy.arm(Fault.CUT, 3)              # the 4th command of the next run (counted from 0)
        cli.run("load-key", image, tcti=proxy.tcti, expect=None)
        assert proxy.fired

Commands are counted over every connection since the last `arm` (a command line may connect more than
once). The faulty command never reaches swtpm; its client gets instead:

- CUT: nothing; both sockets are closed (a TPM that disappears, a resource manager that died);
- FAILURE: a well-formed response with TPM_RC_FAILURE (the TPM in failure mode);
- NOISE: 16 bytes of noise (a bus that garbles the response);
- GARBLED: a response header that says success, followed by noise (a response that does not parse);
- SILENT: nothing, with the connection kept open (a TPM that never answers).

After the fault every command passes through again (a connection that was cut stays cut). The control
channel `<path>.ctrl` is swtpm's own (a symlink), as in tests/tpm_proxy.py.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import selectors
import socket
import struct
import threading
from pathlib import Path
from types import TracebackType

from .tpm_proxy import HEADER, accept_until, command_name

TPM_ST_NO_SESSIONS = 0x8001
TPM_RC_FAILURE = 0x101


class Fault(enum.StrEnum):
    CUT = "cut"
    FAILURE = "failure"
    NOISE = "noise"
    GARBLED = "garbled"
    SILENT = "silent"


def fault_response(fault: Fault, command: bytes) -> bytes:
    """What the client gets instead of the TPM's answer (deterministic per command: tests repeat)."""
    noise = hashlib.sha256(command).digest()[:16]
    if fault is Fault.FAILURE:
        return HEADER.pack(TPM_ST_NO_SESSIONS, HEADER.size, TPM_RC_FAILURE)
    if fault is Fault.NOISE:
        return noise
    if fault is Fault.GARBLED:
        return HEADER.pack(TPM_ST_NO_SESSIONS, HEADER.size + len(noise), 0) + noise
    raise AssertionError(fault)


class FaultProxy:
    """Forwards connections on `path` to the swtpm data socket `target`, failing the armed command."""

    def __init__(self, target: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._fault: Fault | None = None
        self._index = -1
        self.count = 0  # commands seen since the last arm()
        self.codes: list[int] = []  # their command codes
        self.fired: str | None = None  # the command that was failed, by name

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.path}"

    def arm(self, fault: Fault | None, index: int = -1) -> None:
        """Fail command `index` (from 0) of what follows with `fault`; None: count only."""
        with self._lock:
            self._fault, self._index = fault, index
            self.count, self.codes, self.fired = 0, [], None

    # ---- running ----------------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        for stale in (self.path, Path(f"{self.path}.ctrl")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(8)
        listener.settimeout(0.05)
        self._listener = listener
        Path(f"{self.path}.ctrl").symlink_to(f"{self.target}.ctrl")
        self._spawn(self._accept, "fault-proxy-accept")
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        for path in (self.path, Path(f"{self.path}.ctrl")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        assert self._listener is not None
        accept_until(
            self._listener,
            self._stop,
            self.target,
            lambda client, upstream: self._spawn(self._pump, "fault-proxy-pump", client, upstream),
        )

    def _decide(self, command: bytes) -> Fault | None:
        with self._lock:
            index = self.count
            self.count += 1
            code = HEADER.unpack_from(command)[2]
            self.codes.append(code)
            if self._fault is not None and index == self._index:
                self.fired = command_name(code)
                return self._fault
        return None

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        pending = bytearray()
        silent = False
        with selectors.DefaultSelector() as selector, client, upstream:
            selector.register(client, selectors.EVENT_READ, "client")
            selector.register(upstream, selectors.EVENT_READ, "upstream")
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    if key.data == "upstream":
                        client.sendall(data)
                        continue
                    if silent:
                        continue  # the command that is never answered: the client gives up, or waits
                    pending += data
                    while len(pending) >= HEADER.size:
                        size = max(struct.unpack_from(">I", pending, 2)[0], HEADER.size)
                        if len(pending) < size:
                            break
                        command, pending[:] = bytes(pending[:size]), pending[size:]
                        fault = self._decide(command)
                        if fault is None:
                            upstream.sendall(command)
                        elif fault is Fault.CUT:
                            return
                        elif fault is Fault.SILENT:
                            silent = True
                            break
                        else:
                            client.sendall(fault_response(fault, command))
