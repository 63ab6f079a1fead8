"""`luks-tpm doctor`: is everything luks-tpm needs here, and if not, what to do about it."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

from . import cryptsetup, keyring
from .errors import ExitCode, LuksTpmError
from .model import FENCE_PCR, Bank
from .output import OMIT_IF_NONE, Report
from .secret import Secret
from .tpm import Tpm
from .tpm.info import LockoutState


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
    srk: SrkFacts
    lockout: LockoutState
    fence_up: bool


@dataclasses.dataclass(frozen=True)
class DoctorReport:
    ok: bool
    checks: tuple[Check, ...]
    # The TPM's facts, present together exactly when a TPM answered (docs/json.md)
    identity: dict[str, str] | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)
    banks: tuple[Bank, ...] | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)
    srk: SrkFacts | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)
    lockout: LockoutState | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)
    fence_up: bool | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)

    def lines(self) -> list[str]:
        return [check.line() for check in self.checks]


def _tpm_checks(tcti: str) -> tuple[list[Check], TpmFacts | None]:
    try:
        tpm = Tpm(tcti)
    except LuksTpmError as error:
        return [Check("tpm", False, error.message, error.hint)], None
    from .tpm import info, pcr, srk

    with tpm:
        identity = info.identity(tpm)
        banks = pcr.pcr_banks(tpm)
        _, parent = srk.current_srk(tpm)
        lockout = info.lockout_state(tpm)
        fence_up = pcr.fence_is_up(tpm)
    facts = TpmFacts(identity, tuple(banks), SrkFacts(parent.handle is not None, parent.name.hex()), lockout, fence_up)
    checks = [
        Check(
            "tpm",
            True,
            f"reachable through {tcti}: {identity['manufacturer']} {identity['vendor']}, "
            f"firmware {identity['firmware']}",
        ),
        Check(
            "pcr-banks",
            Bank.SHA256 in banks,
            ", ".join(map(str, banks)) or "none",
            None if Bank.SHA256 in banks else "enable the sha256 PCR bank in the firmware, or use --pcr-bank",
        ),
        Check(
            "srk",
            True,
            f"persistent at {parent.handle:#x}"
            if parent.handle is not None
            else "not persistent; created on each use (fast on swtpm, up to ~1 s on hardware)",
        ),
        Check(
            "lockout",
            not lockout.in_lockout,
            lockout.describe(),
            "wait, or clear it with `tpm2_dictionarylockout --clear-lockout`" if lockout.in_lockout else None,
        ),
        Check(
            "fence",
            True,
            f"PCR {FENCE_PCR} is " + ("raised: fenced tokens cannot be recovered until reboot" if fence_up else "down"),
        ),
    ]
    return checks, facts


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
        lines = [
            shlex.split(line)
            for line in conf.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    except (OSError, ValueError) as error:
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
