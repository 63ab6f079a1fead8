"""`luks-tpm doctor`: is everything luks-tpm needs here, and if not, what to do about it."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

from . import cryptsetup, keyring
from .errors import Cause, ExitCode, LuksTpmError
from .files import read_bytes
from .model import FENCE_PCR, Bank
from .output import ABSENT, Absent, Report
from .secret import Secret
from .tpm import Tpm
from .tpm import tcti as tcti_string
from .tpm.info import LockoutState
from .tpm.responses import OWNER_AUTH_HINT


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str | None = None

    def line(self) -> str:
        return f"{'OK ' if self.ok else 'BAD'} {self.name}: {self.detail}" + (f" -> {self.hint}" if self.hint else "")


@dataclasses.dataclass(frozen=True)
class SrkFacts:
    persistent: bool
    name: str


@dataclasses.dataclass(frozen=True)
class TpmFacts:
    identity: dict[str, str]
    banks: tuple[Bank, ...]
    srk: SrkFacts | None  # None: the TPM cannot give luks-tpm an SRK now (the srk check says why)
    lockout: LockoutState
    fence_up: bool | None  # None: no sha256 bank, so no fence (the fence check says so)


@dataclasses.dataclass(frozen=True)
class DoctorReport:
    ok: bool
    checks: tuple[Check, ...]
    # The TPM's facts, present together exactly when a TPM answered (docs/json.md)
    identity: dict[str, str] | Absent = ABSENT
    banks: tuple[Bank, ...] | Absent = ABSENT
    srk: SrkFacts | Absent | None = ABSENT
    lockout: LockoutState | Absent = ABSENT
    fence_up: bool | Absent | None = ABSENT

    def lines(self) -> list[str]:
        return [check.line() for check in self.checks]


# What a TPM that answers may lack: a check says so, the others go on. Anything else (a lost connection,
# a failing TPM) fails doctor as a whole, with exit 4.
_LACKS = frozenset({Cause.OWNER_AUTH, Cause.HIERARCHY_DISABLED, Cause.UNSUPPORTED})
_SHA256_HINT = (
    "enable the sha256 PCR bank in the firmware's TPM settings (or `tpm2_pcrallocate`); until then PCR "
    "bindings need `enroll --pcr-bank sha1`, and no binding can be fenced"
)


def _tpm_checks(tcti: str) -> tuple[list[Check], TpmFacts | None]:
    try:
        tpm = Tpm(tcti)
    except LuksTpmError as error:
        if error.code is ExitCode.USAGE:  # a TCTI refused before use: the command line's mistake
            raise
        return [Check("tpm", False, error.message, error.hint)], None
    from .tpm import info, owner, pcr

    with tpm:
        identity = info.identity(tpm)
        banks = tuple(pcr.pcr_banks(tpm))
        srk_check, srk_facts = _srk_check(tpm)
        owner_set = owner.owner_auth_set(tpm)
        lockout = info.lockout_state(tpm)
        fence_up = pcr.fence_is_up(tpm) if Bank.SHA256 in banks else None
    reached = (
        f"reachable through {tcti}: {identity['manufacturer']} {identity['vendor']}, firmware {identity['firmware']}"
    )
    checks = [
        Check("tpm", True, reached),
        Check("pcr-banks", Bank.SHA256 in banks, ", ".join(map(str, banks)) or "none",
              None if Bank.SHA256 in banks else _SHA256_HINT),
        srk_check,
        Check("owner-auth", not owner_set, "set: luks-tpm can neither create the SRK nor derive keys without it"
              if owner_set else "not set (empty, as TPMs ship)", OWNER_AUTH_HINT if owner_set else None),
        Check("lockout", not lockout.in_lockout, lockout.describe(),
              "wait, or clear it with `tpm2_dictionarylockout --clear-lockout`" if lockout.in_lockout else None),
        _fence_check(fence_up),
    ]  # fmt: skip
    return checks, TpmFacts(identity, banks, srk_facts, lockout, fence_up)


def _srk_check(tpm: Tpm) -> tuple[Check, SrkFacts | None]:
    from .tpm import srk

    try:
        _, parent = srk.current_srk(tpm)
    except LuksTpmError as error:
        if error.cause not in _LACKS:
            raise
        return Check("srk", False, f"cannot be had: {error.message}", error.hint), None
    facts = SrkFacts(parent.handle is not None, parent.name.hex())
    if parent.handle is not None:
        return Check("srk", True, f"the standard SRK, persistent at {parent.handle:#x}"), facts
    detail = "not persistent; created on each use (fast on swtpm, up to ~1 s on hardware)"
    foreign = [warning for warning in tpm.warnings if warning.startswith(f"{srk.SRK_PERSISTENT_HANDLE:#x} holds")]
    if foreign:
        return Check("srk", True, f"{detail}; {foreign[0]}"), facts
    return Check("srk", True, detail, "`luks-tpm persist-srk` stores it (faster unlocks)"), facts


def _fence_check(fence_up: bool | None) -> Check:
    if fence_up is None:
        return Check("fence", False, f"cannot be used: the fence is PCR {FENCE_PCR} of the sha256 bank, which this "
                     "TPM lacks", _SHA256_HINT)  # fmt: skip
    state = "raised: fenced tokens cannot be recovered until reboot" if fence_up else "down"
    return Check("fence", True, f"PCR {FENCE_PCR} is {state}")


def _keyring_check() -> Check:
    try:
        with Secret(32) as probe:
            serial = keyring.add_logon_key("luks-tpm:doctor-probe", probe, keyring.PROCESS)
        keyring.unlink(serial, keyring.PROCESS)
        return Check("keyring", True, "logon keys can be added")
    except (OSError, ValueError) as error:
        return Check(
            "keyring",
            False,
            f"cannot add a logon key: {error}",
            "the kernel needs CONFIG_KEYS; in containers, keyctl may be blocked by seccomp",
        )


REQUEST_KEY = Path("/sbin/request-key")  # the kernel runs exactly this path (CONFIG_KEYS)
REQUEST_KEY_CONF = Path("/etc/request-key.d/luks-tpm.conf")


def request_key_check(conf: Path = REQUEST_KEY_CONF, helper: Path = REQUEST_KEY) -> Check:
    """Is the request-key handler installed, and can the kernel reach it? Not installed is fine (optional)."""
    if not conf.exists():
        return Check(
            "request-key",
            True,
            f"handler not installed ({conf} absent; optional)",
            "`make install` installs it, for request_key(2) volume and application keys",
        )
    if not os.access(helper, os.X_OK):
        return Check(
            "request-key", False, f"{conf} is installed but the kernel's helper {helper} is missing", "install keyutils"
        )
    try:
        text = read_bytes(conf, what="request-key configuration", option="request-key", limit=1 << 20)
        lines = [
            shlex.split(line)
            for line in text.decode("utf-8", "surrogateescape").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    except LuksTpmError as error:
        return Check("request-key", False, f"cannot read {conf}: {error.message}")
    except ValueError as error:
        return Check("request-key", False, f"cannot read {conf}: {error}")
    programs = {words[4] for words in lines if len(words) > 5}
    missing = sorted(program for program in programs if not os.access(program, os.X_OK))
    if not programs or missing:
        return Check(
            "request-key",
            False,
            f"{conf} runs {', '.join(missing) or 'nothing'}, which is not an executable",
            "fix the program path on its lines (absolute, see request-key.conf(5))",
        )
    types = sorted({f"{words[1]} {words[2]}" for words in lines if len(words) > 5})
    tctis = sorted(
        {words[i + 1] for words in lines for i in range(len(words) - 1) if words[i] == "--tcti"}
        | {word.removeprefix("--tcti=") for words in lines for word in words if word.startswith("--tcti=")}
    )
    for tcti in tctis:  # the handler would refuse it on every upcall: say so now
        try:
            tcti_string.check(tcti)
        except LuksTpmError as error:
            return Check("request-key", False, f"{conf}: {error.message}", error.hint)
    return Check(
        "request-key",
        True,
        f"handler installed for {', '.join(types)}, run by {helper}; "
        f"TPM: {', '.join(tctis) or 'the default (device:/dev/tpmrm0)'}",
    )


def doctor(tcti: str) -> Report:
    checks, facts = _tpm_checks(tcti)
    checks.append(_keyring_check())
    checks.append(request_key_check())
    checks.append(Check("libcryptsetup", True, cryptsetup.library_version()))
    dm = cryptsetup.device_mapper_available()
    checks.append(
        Check(
            "dm-crypt",
            dm,
            "available" if dm else "device-mapper or dm-crypt missing",
            None if dm else "`modprobe dm_crypt`; without it only load-key works, not open",
        )
    )
    ok = all(check.ok for check in checks)
    found = {} if facts is None else {field.name: getattr(facts, field.name) for field in dataclasses.fields(facts)}
    report = DoctorReport(ok, tuple(checks), **found)
    return Report(report, exit_code=ExitCode.OK if checks[0].ok else ExitCode.TPM_UNAVAILABLE)
