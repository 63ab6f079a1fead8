"""A recording Unix-socket proxy in front of swtpm's data socket: what an interposer on the TPM bus sees.

    with TpmProxy(swtpm.socket, tmp_path / "proxy.sock") as (proxy, tcti):
        luks_tpm("load-key", image, tcti=tcti)
    assert secret not in proxy.traffic

Every byte in both directions is recorded (before it is forwarded, so by the time a client has a response
the proxy has it too), per connection and as one stream. The client-to-TPM stream is split into TPM2
commands by their header (tag u16, size u32, commandCode u32, big endian) and the other way into
responses (tag u16, size u32, responseCode u32). The swtpm TCTI finds the control channel at
`<path>.ctrl`; the proxy makes that a symlink to swtpm's own control socket (connect() follows symlinks),
so control traffic (locality, power) bypasses the recording, as it carries no command data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

HEADER = struct.Struct(">HII")

# TPM_CC values (TPM 2.0 Part 2, table 12) for the commands luks-tpm sends, to name them in messages.
COMMAND_NAMES = {
    0x0000011F: "NV_UndefineSpaceSpecial",
    0x00000120: "EvictControl",
    0x00000126: "Clear",
    0x00000131: "CreatePrimary",
    0x00000143: "SelfTest",
    0x00000145: "Shutdown",
    0x0000017F: "PolicyPCR",
    0x00000153: "Create",
    0x00000155: "HMAC",
    0x00000157: "Load",
    0x0000015E: "Unseal",
    0x00000151: "PolicySecret",
    0x00000161: "ContextLoad",
    0x00000162: "ContextSave",
    0x00000165: "FlushContext",
    0x0000016B: "PolicyAuthValue",
    0x00000173: "ReadPublic",
    0x00000176: "StartAuthSession",
    0x0000017A: "GetCapability",
    0x0000017B: "GetRandom",
    0x0000017E: "PCR_Read",
    0x00000182: "PCR_Extend",
    0x00000189: "PolicyGetDigest",
    0x0000018C: "PolicyPassword",
    0x00000180: "PolicyRestart",
    0x00000191: "CreateLoaded",
    0x00000144: "Startup",
}

TPM_CC_START_AUTH_SESSION = 0x176
TPM_CC_HMAC = 0x155
TPM_CC_UNSEAL = 0x15E
TPM_ST_SESSIONS = 0x8002
TPMA_SESSION_ENCRYPT = 0x40
TPMA_SESSION_DECRYPT = 0x20


def command_name(code: int) -> str:
    return COMMAND_NAMES.get(code, f"{code:#x}")


@dataclasses.dataclass
class Connection:
    """One client connection: the raw bytes each way, split into commands and responses."""

    sent: bytearray = dataclasses.field(default_factory=bytearray)  # client -> TPM
    received: bytearray = dataclasses.field(default_factory=bytearray)  # TPM -> client

    @staticmethod
    def _split(stream: bytes) -> list[bytes]:
        messages = []
        offset = 0
        while len(stream) - offset >= HEADER.size:
            _, size, _ = HEADER.unpack_from(stream, offset)
            if size < HEADER.size or len(stream) - offset < size:
                break
            messages.append(bytes(stream[offset : offset + size]))
            offset += size
        return messages

    @property
    def commands(self) -> list[bytes]:
        return self._split(bytes(self.sent))

    @property
    def responses(self) -> list[bytes]:
        return self._split(bytes(self.received))


def accept_until(
    listener: socket.socket,
    stop: threading.Event,
    target: Path,
    serve: Callable[[socket.socket, socket.socket], None],
) -> None:
    """Accept clients until `stop` is set; connect each to `target` (swtpm's socket) and hand the pair to
    `serve`. The listener has a timeout, so `stop` is looked at between clients."""
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(str(target))
        except OSError:
            client.close()
            upstream.close()
            continue
        serve(client, upstream)


class TpmProxy:
    """Forwards connections on `path` to the swtpm data socket `target`, recording them; stop() ends it."""

    def __init__(self, target: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        self.path = Path(path)
        self.connections: list[Connection] = []
        self._traffic = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._open: list[Connection] = []

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.path}"

    @property
    def ctrl(self) -> Path:
        return Path(f"{self.path}.ctrl")

    # ---- what was seen ----------------------------------------------------------------------------

    @property
    def traffic(self) -> bytes:
        """Every byte of every connection, both directions, in the order it passed."""
        with self._lock:
            return bytes(self._traffic)

    @property
    def exchanges(self) -> list[tuple[bytes, bytes | None]]:
        """(command, response) pairs, connection by connection, in order."""
        with self._lock:
            connections = list(self.connections)
        pairs: list[tuple[bytes, bytes | None]] = []
        for connection in connections:
            commands, responses = connection.commands, connection.responses
            pairs += [(command, responses[i] if i < len(responses) else None) for i, command in enumerate(commands)]
        return pairs

    @property
    def commands(self) -> list[int]:
        """The command codes sent to the TPM, in order."""
        return [HEADER.unpack_from(command)[2] for command, _ in self.exchanges]

    def command_names(self) -> list[str]:
        return [command_name(code) for code in self.commands]

    def reset(self) -> None:
        """Forget what was recorded so far (connections still open keep being recorded, afresh)."""
        with self._lock:
            self._traffic.clear()
            for connection in self.connections:
                connection.sent.clear()
                connection.received.clear()
            self.connections = [c for c in self.connections if c in self._open]

    # ---- running ----------------------------------------------------------------------------------

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.ctrl.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(8)
        listener.settimeout(0.05)
        self._listener = listener
        self.ctrl.symlink_to(f"{self.target}.ctrl")
        thread = threading.Thread(target=self._accept, name="tpm-proxy-accept", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for path in (self.path, self.ctrl):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if alive:
            raise RuntimeError(f"proxy threads did not stop: {alive}")

    def __enter__(self) -> tuple[TpmProxy, str]:
        self.start()
        return self, self.tcti

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _accept(self) -> None:
        assert self._listener is not None
        accept_until(self._listener, self._stop, self.target, self._serve)

    def _serve(self, client: socket.socket, upstream: socket.socket) -> None:
        connection = Connection()
        with self._lock:
            self.connections.append(connection)
            self._open.append(connection)
        thread = threading.Thread(
            target=self._pump,
            args=(client, upstream, connection),
            name=f"tpm-proxy-{len(self.connections)}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def _pump(self, client: socket.socket, upstream: socket.socket, connection: Connection) -> None:
        with selectors.DefaultSelector() as selector, client, upstream:
            selector.register(client, selectors.EVENT_READ, (upstream, connection.sent))
            selector.register(upstream, selectors.EVENT_READ, (client, connection.received))
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    destination, record = key.data
                    data = source.recv(65536)
                    if not data:  # one side closed: the connection is over
                        self._close(connection)
                        return
                    with self._lock:  # record first: once the peer has the bytes, so does the test
                        record += data
                        self._traffic += data
                    destination.sendall(data)
        self._close(connection)

    def _close(self, connection: Connection) -> None:
        with self._lock:
            if connection in self._open:
                self._open.remove(connection)


# ---- parsing the commands that matter for the bus properties (TPM 2.0 Part 3) ----------------------------


@dataclasses.dataclass(frozen=True)
class StartAuthSession:
    tpm_key: int
    bind: int
    nonce_caller: bytes
    encrypted_salt: bytes
    session_type: int
    symmetric: tuple[int, int, int]  # algorithm, keyBits, mode (TPM_ALG_NULL has no keyBits/mode: 0, 0)
    auth_hash: int


def _tpm2b(data: bytes, offset: int) -> tuple[bytes, int]:
    (size,) = struct.unpack_from(">H", data, offset)
    return data[offset + 2 : offset + 2 + size], offset + 2 + size


def parse_start_auth_session(command: bytes) -> StartAuthSession:
    tag, _, code = HEADER.unpack_from(command)
    assert code == TPM_CC_START_AUTH_SESSION
    tpm_key, bind = struct.unpack_from(">II", command, HEADER.size)
    offset = HEADER.size + 8
    if tag == TPM_ST_SESSIONS:  # an (audit) authorization area may follow the handles
        (auth_size,) = struct.unpack_from(">I", command, offset)
        offset += 4 + auth_size
    nonce, offset = _tpm2b(command, offset)
    salt, offset = _tpm2b(command, offset)
    session_type = command[offset]
    (algorithm,) = struct.unpack_from(">H", command, offset + 1)
    offset += 3
    key_bits = mode = 0
    if algorithm != 0x0010:  # TPM_ALG_NULL
        key_bits, mode = struct.unpack_from(">HH", command, offset)
        offset += 4
    (auth_hash,) = struct.unpack_from(">H", command, offset)
    return StartAuthSession(tpm_key, bind, nonce, salt, session_type, (algorithm, key_bits, mode), auth_hash)


def start_auth_session_handle(response: bytes) -> int:
    """The session handle a successful StartAuthSession response returns."""
    _, _, rc = HEADER.unpack_from(response)
    assert rc == 0, f"StartAuthSession failed: {rc:#x}"
    (handle,) = struct.unpack_from(">I", response, HEADER.size)
    return int(handle)


def command_sessions(command: bytes, handles: int) -> list[tuple[int, int]]:
    """(session handle, TPMA_SESSION attributes) of each session in a command's authorization area;
    `handles` is how many handles the command has before it (HMAC and Unseal: 1)."""
    tag, _, _ = HEADER.unpack_from(command)
    if tag != TPM_ST_SESSIONS:
        return []
    offset = HEADER.size + 4 * handles
    (auth_size,) = struct.unpack_from(">I", command, offset)
    offset += 4
    end = offset + auth_size
    sessions = []
    while offset < end:
        (handle,) = struct.unpack_from(">I", command, offset)
        _, offset = _tpm2b(command, offset + 4)
        attributes = command[offset]
        _, offset = _tpm2b(command, offset + 1)
        sessions.append((int(handle), int(attributes)))
    return sessions
