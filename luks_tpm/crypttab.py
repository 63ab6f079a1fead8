"""crypttab entries marked for luks-tpm (option `x-luks-tpm`), with their devices resolved.

`x-` options are ignored (with at most a warning) by systemd-cryptsetup and cryptroot, so the marker
is safe to leave in a crypttab that other tools read too. A crypttab is a regular file of at most 1 MiB;
bytes that are not UTF-8 are kept as they are (a device path is bytes to the kernel) and escaped when
shown.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .cryptsetup import header_facts
from .errors import Cause, ExitCode, LuksTpmError, die
from .files import read_bytes

MARKER = "x-luks-tpm"
MAX_SIZE = 1 << 20


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    device: str
    readonly: bool = False
    discard: bool = False


@dataclasses.dataclass(frozen=True)
class Unresolved:
    """A crypttab entry whose device is not there: reported per volume, beside the others."""

    device: str
    error: LuksTpmError


_BLANKS = re.compile(r"[ \t\r]+")  # crypttab(5) fields: separated by spaces or tabs, as systemd reads them


def parse(text: str, *, only_marked: bool = True) -> list[Entry]:
    """Entries, one per line ("\n" only) with fields split at ASCII blanks only: Python's splitlines()
    and split() would also cut at a LINE SEPARATOR or a NO-BREAK SPACE inside a name or a path."""
    entries = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.split("#", 1)[0].strip(" \t\r")
        if not line:
            continue
        fields = _BLANKS.split(line)
        if len(fields) < 2:
            die(f"crypttab line {number}: needs at least a name and a device", code=ExitCode.USAGE)
        options = fields[3].split(",") if len(fields) > 3 else []
        if only_marked and MARKER not in options:
            continue
        entries.append(
            Entry(
                fields[0],
                fields[1],
                readonly=bool({"readonly", "read-only"} & set(options)),
                discard="discard" in options,
            )
        )
    return entries


def read(path: Path, option: str = "--crypttab") -> list[Entry]:
    return parse(read_bytes(path, what="crypttab", option=option, limit=MAX_SIZE).decode("utf-8", "surrogateescape"))


def resolve(entry: Entry, dev: Path = Path("/dev"), sys_block: Path = Path("/sys/class/block")) -> Entry:
    """The entry with its device as a path: UUID= through /dev/disk/by-uuid, or by reading LUKS headers
    when udev has not made the links (a minimal initramfs)."""
    kind, _, value = entry.device.partition("=")
    if not value or kind not in {"UUID", "PARTUUID", "LABEL", "PARTLABEL"}:
        return entry
    link = dev / "disk" / f"by-{kind.lower()}" / value
    if link.exists():
        return dataclasses.replace(entry, device=str(link))
    if kind == "UUID":
        found = luks_device(value, dev, sys_block)
        if found is not None:
            return dataclasses.replace(entry, device=str(found))
    die(f"crypttab entry {entry.name}: no device with {entry.device}", code=ExitCode.DEVICE, cause=Cause.DEVICE)


def devices(entries: list[Entry]) -> list[Path | Unresolved]:
    """Each entry's device path, or why it has none."""
    found: list[Path | Unresolved] = []
    for entry in entries:
        try:
            found.append(Path(resolve(entry).device))
        except LuksTpmError as error:
            found.append(Unresolved(entry.device, error))
    return found


def luks_device(uuid: str, dev: Path = Path("/dev"), sys_block: Path = Path("/sys/class/block")) -> Path | None:
    """The block device whose LUKS header carries `uuid`, found by reading every block device's header."""
    for block in sorted(sys_block.glob("*")) if sys_block.exists() else []:
        candidate = dev / block.name
        if _luks_uuid(candidate) == uuid.lower():
            return candidate
    return None


def _luks_uuid(path: Path) -> str | None:
    facts = header_facts(path)
    return None if facts is None else facts.uuid
