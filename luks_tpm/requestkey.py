"""`luks-tpm request-key`: the handler /sbin/request-key runs when a process asks the kernel for a key
that is not there yet (request_key(2), `keyctl request2`), configured in /etc/request-key.d/luks-tpm.conf.

    luks-tpm --tcti SPEC request-key %k %t %d %c %S   (fixed_lines.py)

- `logon cryptsetup:<uuid>-d<digest>`, callout = the LUKS2 device, or `-` to find the block device with
  that UUID: the volume key, recovered and verified exactly as `load-key` does it; for root only.
- `user luks-tpm:app:<name>`, callout = the length in bytes (16-64): an application key derived by the
  TPM for the requesting uid and that name (derive.app_hmac_message, derive.app_expand).

The handler assumes the authority for the key, works the answer out into a `Secret` and instantiates the
key from that buffer: the requester never runs TPM code, and for logon keys never sees the bytes. Nothing
goes to stdout, a pipe, argv, the environment or a file. Any failure negates the key for a short time
(so the requester gets ENOKEY at once, and a retry after the cause is fixed works) and writes one line
to syslog: there is no terminal. It runs on every upcall, so it imports neither click nor anything the
answer does not need.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
import syslog
import threading
from pathlib import Path

from . import keyring
from .boundary import run
from .errors import Cause, ExitCode, LuksTpmError, die
from .output import ErrorInfo, Report
from .secret import Secret, make_undumpable

# How long a failed request stays negative. Short: the requester learns of the failure at once anyway,
# and a retry after the cause is fixed should not wait long. The environment variable is for tests and
# for operators who want another value (set it on the conf line with /usr/bin/env).
NEGATE_SECONDS = 10
NEGATE_ENVIRONMENT = "LUKS_TPM_NEGATE_TIMEOUT"
# The TSS waits for a TPM answer without a timeout, and the requester waits for us: a TPM (or socket) that
# never answers must not hang it. Past this many seconds the request is negated and the handler exits.
DEADLINE_SECONDS = 30
DEADLINE_ENVIRONMENT = "LUKS_TPM_REQUEST_DEADLINE"

_UUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_VOLUME = re.compile(rf"cryptsetup:({_UUID})-d([0-9]{{1,3}})")
_APP_PREFIX = "luks-tpm:app:"
_LENGTH = re.compile(r"[1-9][0-9]{0,2}")


@dataclasses.dataclass
class Request:
    """What the kernel asks, from the argv /sbin/request-key builds out of `%k %t %d %c %S`."""

    tcti: str
    key: str
    type: str
    description: str
    callout: str
    session: str
    uid: int | None = None  # the key's, once described
    authority: bool = False  # assumed: the key can be instantiated or negated

    @property
    def serial(self) -> int | None:
        serial = int(self.key) if re.fullmatch(r"[1-9][0-9]{0,9}", self.key) else 0
        return serial if 0 < serial < 2**31 else None  # key_serial_t: a positive int32

    def what(self) -> str:
        return f"{self.type} {self.description}"


@dataclasses.dataclass(frozen=True)
class Answered:
    key: int
    uid: int

    def lines(self) -> list[str]:
        return []  # the answer is the key itself; nothing is printed


class KernelSink:
    """Where an upcall's outcome goes: one syslog line, and for a failure the key negated for a short time
    (the requester gets ENOKEY at once; a retry after the cause is fixed works)."""

    verbose = 0  # no traceback: there is no terminal

    def __init__(self, request: Request) -> None:
        self._request = request

    def succeeded(self, report: Report | None) -> int:
        request = self._request
        _log(syslog.LOG_INFO, f"request-key: {request.what()}: instantiated key {request.key} for uid {request.uid}")
        return ExitCode.OK

    def failed(self, error: ErrorInfo, cause: BaseException) -> int:
        reason = error.message + (f" (hint: {error.hint})" if error.hint else "")
        if self._request.authority:
            _negate(self._request, reason)
        else:  # without the authority the key can be neither instantiated nor negated: the kernel negates it
            _log(syslog.LOG_ERR, f"request-key: {self._request.what()}: {reason}")
        return error.code


def handle(request: Request) -> int:
    """Answer one request; the exit code is luks-tpm's usual one (request-key only looks at zero)."""
    make_undumpable()
    return run(lambda: _respond(request), KernelSink(request))


def _log(priority: int, text: str) -> None:
    # Descriptions and callouts come from the requester: one line, printable, bounded.
    line = "".join(char if char.isprintable() else "?" for char in text)[:1000]
    # LOG_AUTHPRIV: who got which key is security information. No LOG_CONS: never the console.
    syslog.openlog("luks-tpm", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(priority, line)
    if priority <= syslog.LOG_ERR:  # /dev/null under request-key; someone trying it by hand sees it
        print(f"luks-tpm: {line}", file=sys.stderr)


def _seconds(variable: str, default: int) -> int:
    value = os.environ.get(variable, "")
    return int(value) if re.fullmatch(r"[1-9][0-9]{0,5}", value) else default


def _negate(request: Request, reason: str) -> None:
    seconds = _seconds(NEGATE_ENVIRONMENT, NEGATE_SECONDS)
    try:
        assert request.serial is not None
        keyring.negate(request.serial, seconds)
        negated = f"negated for {seconds} s"
    except keyring.KeyringError as error:  # e.g. instantiated after all, or the requester gave up
        negated = f"not negated ({os.strerror(error.errno or 0)})"
    uid = "unknown" if request.uid is None else request.uid
    _log(syslog.LOG_ERR, f"request-key: {request.what()} for uid {uid}: {reason}; {negated}")


def _start_deadline(request: Request) -> threading.Timer:
    """A daemon thread that gives up for the main thread when it is stuck in the TSS. Started after the
    authority was assumed: a new thread inherits the creating thread's credentials, the authority too."""
    seconds = _seconds(DEADLINE_ENVIRONMENT, DEADLINE_SECONDS)

    def give_up() -> None:
        _negate(request, f"no answer after {seconds} s (is the TPM responding?)")
        os._exit(ExitCode.TPM_UNAVAILABLE)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    return timer


def _respond(request: Request) -> Report:
    serial = request.serial
    if serial is None:
        die(
            f"invalid key serial {request.key[:20]!r}; this command is run by /sbin/request-key "
            "(request-key.conf(5): %k %t %d %c %S)",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )
    try:
        keyring.assume_authority(serial)
    except keyring.KeyringError as error:
        die(
            f"cannot act for key {serial} ({os.strerror(error.errno or 0)}): only /sbin/request-key can run this",
            hint="see `luks-tpm request-key --help`",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )
    request.authority = True
    deadline = _start_deadline(request)
    try:
        asked = keyring.describe(serial)
        request.uid = uid = asked.uid
        if (asked.type, asked.description) != (request.type, request.description):
            die(
                f"the key under construction is {asked.type} {asked.description}, not what the arguments say",
                code=ExitCode.USAGE,
            )
        with _answer(request, uid) as payload:
            deadline.cancel()  # answered in time: nothing may negate it now
            if request.type == "logon":
                # As load-key does: no WRITE (no update in place), nothing for others. Before instantiating:
                # only the authority (divested by instantiation) makes the key ours to change.
                keyring.set_permissions(serial, keyring.logon_key_permissions())
            keyring.instantiate(serial, payload)
    except keyring.KeyringError as error:
        raise LuksTpmError(f"keyring: {error.function}: {os.strerror(error.errno or 0)}", code=ExitCode.BUG) from None
    finally:
        deadline.cancel()
    return Report(Answered(serial, uid))


def _answer(request: Request, uid: int) -> Secret:
    if request.type == "logon":
        match = _VOLUME.fullmatch(request.description)
        if match is None:
            die("not a volume key: logon keys luks-tpm answers are cryptsetup:<uuid>-d<digest>", code=ExitCode.USAGE)
        if uid != 0:
            # Only root can load a dm table that uses the key; nobody else needs root to recover it, or to
            # open a device path of their choosing on their behalf.
            die("volume keys are only for root requesters", code=ExitCode.REFUSED)
        return _volume_key(request.tcti, match[1], int(match[2]), request.callout)
    if request.type == "user" and request.description.startswith(_APP_PREFIX):
        from .derive import APP_KEY_SIZES, APP_NAME

        name = request.description.removeprefix(_APP_PREFIX)
        if not APP_NAME.fullmatch(name):
            die("invalid application key name: 1 to 200 characters from A-Z a-z 0-9 . _ @ + : -", code=ExitCode.USAGE)
        if not _LENGTH.fullmatch(request.callout) or int(request.callout) not in APP_KEY_SIZES:
            die(
                f"invalid key length {request.callout[:20]!r}: the callout info is the length in bytes, "
                f"{APP_KEY_SIZES.start} to {APP_KEY_SIZES.stop - 1}",
                code=ExitCode.USAGE,
            )
        return _app_key(request.tcti, uid, name, int(request.callout))
    die(
        "luks-tpm answers logon cryptsetup:<uuid>-d<digest> and user luks-tpm:app:<name> keys only", code=ExitCode.USAGE
    )


def _volume_key(tcti: str, uuid: str, digest: int, callout: str) -> Secret:
    """The volume key, exactly as `load-key` recovers it: every luks-tpm token tried, verified."""
    from .cryptsetup import open_device
    from .crypttab import luks_device
    from .tpm import Tpm
    from .unlock import Recovery

    if callout == "-":
        path = luks_device(uuid)
        if path is None:
            die(f"no block device has a LUKS header with UUID {uuid}", code=ExitCode.DEVICE)
    elif callout.startswith("/"):
        path = Path(callout)
        try:
            mode = path.stat().st_mode
        except OSError as error:
            die(f"{path}: {error.strerror}", code=ExitCode.DEVICE)
        if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):  # a FIFO or a tty would hang the request
            die(f"{path} is neither a block device nor an image file", code=ExitCode.DEVICE)
    else:
        die(f"the callout info must be the device's absolute path or '-', not {callout[:100]!r}", code=ExitCode.USAGE)
    with open_device(path) as device:
        if device.uuid.lower() != uuid.lower():
            die(f"{path} is LUKS2 volume {device.uuid}, not {uuid}", code=ExitCode.DEVICE)
        if digest not in device.digest_ids():
            die(f"{path} has no LUKS2 digest {digest}", code=ExitCode.DEVICE)
        with Tpm(tcti) as tpm, Recovery(tpm) as recovery:
            found = recovery.recover(device)
    if found.token.digest != digest:
        found.key.close()
        die(
            f"{path}: token {found.token_id} yields the key of digest {found.token.digest}, not {digest}",
            code=ExitCode.UNLOCK_FAILED,
        )
    return found.key


def _app_key(tcti: str, uid: int, name: str, length: int) -> Secret:
    """TPM2_HMAC by the derived primary without a policy, in an SRK-salted session with response
    encryption (the machinery `format` derives with), then HKDF-Expand."""
    from . import derive
    from .tpm import Tpm
    from .tpm.keyuse import KeyUse
    from .tpm.srk import session_key

    with Tpm(tcti) as tpm, KeyUse(tpm) as keys:
        prk = keys.hmac(session_key(tpm), derive.app_hmac_message(uid, name), None)
    with prk:
        return derive.app_expand(prk, uid, name, length)
