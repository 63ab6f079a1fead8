"""The file-system view a prediction reads: GRUB's devices mapped to directories, fs UUIDs to devices.

GRUB names files `(hd0,gpt2)/grub/grub.cfg`, or `/vmlinuz-...` relative to `$root`. A `BootFiles`
maps each GRUB device name to the directory where that file system is mounted (the live system:
the ESP at /boot/efi and /boot; a test or an image builder: any directory tree), and each fs UUID
that `search` looks for to its device. The device names come from the log's own strings
(`BootFiles.from_log`). FAT (the ESP) is case-insensitive, so ESP paths are matched that way.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

from .errors import Reason, Unpredictable
from .eventlog import EventLog, EventType

_DEVICE_PATH = re.compile(r"^\(([^()]+)\)(.*)$")


@dataclasses.dataclass(frozen=True)
class BootFiles:
    """Where GRUB's devices are mounted, and the fs UUIDs `search` finds on them.

    `esp_device` is the GRUB device of the EFI System Partition (shim and GRUB are read from it);
    `snapshots` is an optional directory of earlier copies of config files, named by their sha256
    (see `predict.snapshot`): the booted grub.cfg after update-grub has replaced it.
    """

    devices: Mapping[str, Path]
    uuids: Mapping[str, str]
    esp_device: str
    snapshots: Path | None = None

    @classmethod
    def from_log(
        cls, log: EventLog, *, esp: Path, boot: Path, uuids: Mapping[str, str] = {}, snapshots: Path | None = None
    ) -> BootFiles:
        """Device names from the log: the ESP's is the one the stub grub.cfg was read from, /boot's the
        one the main grub.cfg was read from (`/grub/grub.cfg` on a separate /boot, else `/boot/grub/...`:
        then `boot` is the root file system's mount point, normally `/`)."""
        names = [e.text() or "" for e in log.events if e.pcr == 9 and e.type == EventType.EV_IPL]
        configs = [m for m in (_DEVICE_PATH.match(n) for n in names if n.endswith("grub.cfg")) if m]
        if len(configs) < 2:
            raise Unpredictable(Reason.NOT_GRUB_BOOT, "the log shows no stub and main grub.cfg read by GRUB")
        esp_device, boot_device = configs[0].group(1), configs[1].group(1)
        boot_root = boot if configs[1].group(2).startswith("/grub/") else boot.parent
        devices = {esp_device: esp, boot_device: boot_root}
        return cls(devices, {k.lower(): v for k, v in uuids.items()}, esp_device, snapshots)

    def device_for_uuid(self, uuid: str) -> str | None:
        return {k.lower(): v for k, v in self.uuids.items()}.get(uuid.lower())

    def locate(self, grub_path: str, root: str) -> Path:
        """The host path of a GRUB path; Unpredictable when its device is not mapped."""
        match = _DEVICE_PATH.match(grub_path)
        device, path = (match.group(1), match.group(2)) if match else (root, grub_path)
        if device not in self.devices:
            raise Unpredictable(
                Reason.MISSING_FILE,
                f"GRUB device ({device}) of {grub_path!r} is not mapped to a directory",
                hint="map every GRUB device the boot reads (BootFiles.devices)",
            )
        base = self.devices[device]
        relative = path.lstrip("/")
        if device == self.esp_device:
            return case_insensitive(base, relative)
        return base / relative if relative else base


def case_insensitive(base: Path, relative: str) -> Path:
    """`base/relative`, matching each component regardless of case (FAT), as found on disk."""
    path = base
    for component in [c for c in re.split(r"[\\/]", relative) if c]:
        exact = path / component
        if exact.exists() or not path.is_dir():
            path = exact
            continue
        matches = [p for p in os.listdir(path) if p.lower() == component.lower()]
        path = path / (matches[0] if matches else component)
    return path
