"""Which volumes a machine has that luks-tpm knows of: DEVICE arguments, the crypttab entries marked
x-luks-tpm, and every block device whose LUKS2 header carries a luks-tpm token (for `wipe`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import crypttab
from .cryptsetup import header_facts, open_device
from .errors import LuksTpmError
from .settings import DEFAULT_CRYPTTAB
from .tokenformat import TOKEN_TYPE


@dataclasses.dataclass(frozen=True)
class Found:
    path: str
    found_by: tuple[str, ...]  # "argument", "crypttab NAME", "scan"
    error: str | None = None  # e.g. a crypttab entry whose device is not there


def known_volumes(
    devices: Sequence[Path],
    crypttab_path: Path | None,
    *,
    scan: bool = True,
    sys_block: Path = Path("/sys/class/block"),
    dev: Path = Path("/dev"),
) -> list[Found]:
    """The DEVICEs given, the crypttab entries marked x-luks-tpm (`crypttab_path` None: /etc/crypttab if
    it exists), and every block device whose LUKS2 header carries a luks-tpm token; each once."""
    found: dict[str, Found] = {}

    def add(path: str, how: str) -> None:
        key = os.path.realpath(path)
        entry = found.setdefault(key, Found(path, ()))
        if how not in entry.found_by:
            found[key] = dataclasses.replace(entry, found_by=(*entry.found_by, how))

    for path in devices:
        add(str(path), "argument")
    for entry in _crypttab_entries(crypttab_path):
        how = f"crypttab {entry.name}"
        try:
            add(crypttab.resolve(entry, dev, sys_block).device, how)
        except LuksTpmError as error:
            found[how] = Found(entry.device, (how,), error.message)
    if scan:
        for path in _block_devices_with_tokens(sys_block, dev):
            add(str(path), "scan")
    return list(found.values())


def _crypttab_entries(path: Path | None) -> list[crypttab.Entry]:
    if path is None:
        if not DEFAULT_CRYPTTAB.exists():
            return []
        path = DEFAULT_CRYPTTAB
    return crypttab.read(path)


def _block_devices_with_tokens(sys_block: Path, dev: Path) -> Iterator[Path]:
    for block in sorted(sys_block.glob("*")) if sys_block.exists() else []:
        path = dev / block.name.replace("!", "/")  # sysfs writes "/" in device names as "!"
        facts = header_facts(path)
        if facts is None or facts.version != 2:
            continue
        try:
            with open_device(path) as device:
                if any(kind == TOKEN_TYPE for _, kind in device.tokens()):
                    yield path
        except LuksTpmError:
            continue  # not ours to judge here: a header luks-tpm cannot read carries no usable token
