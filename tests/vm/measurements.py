"""What the guest's /sbin/init (images/rootfs-init) reports about its measured boot, decoded from the
console: the Secure Boot state, the lockdown mode, PCRs 0-16 of every bank and the firmware's event log.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .eventlog import Event, parse, replay


@dataclass(frozen=True)
class Measurements:
    secure_boot: str  # as the kernel logged it: "enabled", "disabled", ...
    lockdown: str  # /sys/kernel/security/lockdown, e.g. "none [integrity] confidentiality"
    pcrs: dict[str, dict[int, str]]  # bank -> PCR index -> lowercase hex, as the guest read them
    eventlog: Path  # the TCG2 event log, binary

    def events(self) -> list[Event]:
        return parse(self.eventlog.read_bytes())

    def replayed(self) -> dict[str, dict[int, str]]:
        """The PCRs the event log extends, replayed on the host."""
        return replay(self.events())

    def replay_mismatches(self) -> list[str]:
        """The (bank, PCR) pairs where replaying the log does not give what the guest read; [] if none."""
        replayed = self.replayed()
        if not replayed:
            return ["the event log has no digests"]
        wrong = []
        for bank, pcrs in replayed.items():
            for pcr, value in pcrs.items():
                read = self.pcrs.get(bank, {}).get(pcr)
                if read != value:
                    wrong.append(f"{bank} PCR {pcr}: log {value}, guest {read}")
        return wrong

    @property
    def lockdown_mode(self) -> str:
        found = re.search(r"\[(\w+)\]", self.lockdown)
        return found[1] if found else ""


def decode(console: str, directory: Path) -> Measurements | None:
    """The measurements on the console, saved in DIRECTORY: eventlog.bin, pcrs.json, and state.json (Secure
    Boot, lockdown); None if the guest did not report them (it did not reach its init)."""
    lines = console.replace("\r", "").splitlines()
    end = [line for line in lines if line.startswith("LUKSTPM-EVENTLOG-END ")]
    if not end:
        return None
    size, digest = end[0].split()[1:3]
    encoded = "".join(line.split(" ", 1)[1] for line in lines if line.startswith("LUKSTPM-EVENTLOG "))
    log = gzip.decompress(base64.b64decode(encoded))
    if len(log) != int(size) or hashlib.sha256(log).hexdigest() != digest:
        raise AssertionError(f"the event log on the console is garbled ({len(log)} bytes, expected {size})")
    pcrs: dict[str, dict[int, str]] = {}
    for line in lines:
        found = re.fullmatch(r"LUKSTPM-PCR (\w+) (\d+) ([0-9A-Fa-f]+)", line)
        if found:
            pcrs.setdefault(found[1], {})[int(found[2])] = found[3].lower()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "eventlog.bin").write_bytes(log)
    (directory / "pcrs.json").write_text(json.dumps(pcrs, indent=1, sort_keys=True) + "\n")
    state = {"secure_boot": _marker(lines, "LUKSTPM-SECUREBOOT"), "lockdown": _marker(lines, "LUKSTPM-LOCKDOWN")}
    (directory / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    return load(directory)


def load(directory: Path) -> Measurements:
    """Measurements decode() saved in DIRECTORY."""
    state = json.loads((directory / "state.json").read_text())
    pcrs = json.loads((directory / "pcrs.json").read_text())
    return Measurements(
        secure_boot=state["secure_boot"],
        lockdown=state["lockdown"],
        pcrs={bank: {int(pcr): value for pcr, value in values.items()} for bank, values in pcrs.items()},
        eventlog=directory / "eventlog.bin",
    )


def _marker(lines: list[str], name: str) -> str:
    found = [line[len(name) + 1 :] for line in lines if line.startswith(name + " ")]
    return found[0].strip() if found else ""
