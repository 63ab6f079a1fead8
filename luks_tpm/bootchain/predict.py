"""The next boot's PCR values on OVMF/UEFI firmware -> Debian shim -> Debian GRUB 2.06-13 -> Linux.

`next_boot(log, files)` keeps every event up to where GRUB starts (firmware, Secure Boot policy and
authorities, shim's MOK/SbatLevel events: PCRs 0-3, 5-7, 14) and regenerates what the boot files
decide: PCR 4 (Authenticode of shim and GRUB as found on the ESP now, and of the kernel the default
entry boots, twice), PCRs 8 and 9 (the GRUB emulation, from the GRUB image's built-in configuration
on, over the stub grub.cfg, grub.cfg, grubenv and the files they read). Before its output is trusted,
the emulation is run over the booted boot's inputs and must give the log's GRUB events exactly; a
booted config file that update-grub has since replaced is taken from `BootFiles.snapshots` (see
`snapshot`), found by the digest the log recorded for it.

Cannot be seen from files, so never predicted: firmware updates (PCR 0), NVRAM boot entries (1),
Secure Boot db/dbx/KEK/PK and MOK changes (7, 14), the partition table (5). Unpredictable is raised
with a Reason instead of any guess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import struct
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import authenticode, grubbuiltins, grubemu, grubimage, secureboot, signature
from .bootfiles import BootFiles, case_insensitive
from .errors import PEFormatError, Reason, Unpredictable
from .eventlog import Event, EventLog, EventType, make_event, replay
from .grubemu import Kind, Measurement

PREDICTED_PCRS = range(16)
_APP = EventType.EV_EFI_BOOT_SERVICES_APPLICATION
_PREFIXES = {Kind.COMMAND: "grub_cmd: ", Kind.KERNEL_CMDLINE: "kernel_cmdline: "}


@dataclasses.dataclass(frozen=True)
class Prediction:
    values: Mapping[str, Mapping[int, bytes]]  # bank -> PCR 0-15 -> value
    events: tuple[Event, ...]  # the predicted log
    changes: tuple[str, ...]  # what differs from the booted boot, in words


@dataclasses.dataclass(frozen=True)
class _Layout:
    shim: Event  # OVMF's PCR 4 event for shim
    grub: Event  # shim's PCR 4 event for GRUB
    start: int  # index (in log.events) of GRUB's first measurement: its built-in config's first command
    end: int  # one past the last GRUB event


def _layout(log: EventLog) -> _Layout:
    events = log.events
    apps = [i for i, e in enumerate(events) if e.pcr == 4 and e.type == _APP]
    if len(apps) < 2:
        raise Unpredictable(Reason.NOT_GRUB_BOOT, "the log has no shim and GRUB image events in PCR 4")
    start = apps[1] + 1
    stub = next((i for i in range(start, len(events)) if events[i].pcr == 9), None)
    if stub is None or not all(events[i].pcr == 8 for i in range(start, stub)):
        raise Unpredictable(Reason.NOT_GRUB_BOOT, "no GRUB config read after GRUB's image event")
    end = max(i for i, e in enumerate(events) if e.pcr in (4, 8, 9)) + 1
    for event in events[start:end]:
        known = (event.pcr in (8, 9) and event.type == EventType.EV_IPL) or (event.pcr == 4 and event.type == _APP)
        if not known:
            raise Unpredictable(
                Reason.UNKNOWN_EVENT, f"event {event.index} (PCR {event.pcr}, {event.type_name}) inside GRUB's part"
            )
    return _Layout(events[apps[0]], events[apps[1]], start, end)


def _image_path(event: Event) -> str | None:
    """The file path in an image event's device path (UEFI_IMAGE_LOAD_EVENT), or None."""
    data = event.data
    if len(data) < 32:
        return None
    length = struct.unpack_from("<Q", data, 24)[0]
    path, offset = None, 32
    while offset + 4 <= min(len(data), 32 + length):
        kind, subtype, size = struct.unpack_from("<BBH", data, offset)
        if size < 4:
            break
        if kind == 4 and subtype == 4:
            path = data[offset + 4 : offset + size].decode("utf-16-le", "replace").rstrip("\0")
        offset += size
    return path


def _read(files: BootFiles, path: str, what: str) -> bytes:
    host = case_insensitive(files.devices[files.esp_device], path)
    if not host.is_file():
        raise Unpredictable(Reason.MISSING_FILE, f"{what} {path} is not on the ESP ({host})")
    return host.read_bytes()


@dataclasses.dataclass(frozen=True)
class _Loaders:
    shim: bytes
    grub: bytes
    shim_digests: dict[str, bytes]
    grub_digests: dict[str, bytes]


def _loaders(log: EventLog, layout: _Layout, files: BootFiles) -> _Loaders:
    shim_path = _image_path(layout.shim)
    if not shim_path:
        raise Unpredictable(Reason.NOT_GRUB_BOOT, "the firmware's image event for shim has no file path")
    grub_path = _image_path(layout.grub) or shim_path.rsplit("\\", 1)[0] + "\\grubx64.efi"
    shim, grub = _read(files, shim_path, "shim"), _read(files, grub_path, "GRUB")
    return _Loaders(shim, grub, authenticode.digests(shim, log.banks), authenticode.digests(grub, log.banks))


def _booted_sbat_level(log: EventLog) -> str | None:
    """The SbatLevel shim measured this boot: the one the next boot's shim applies when it is unchanged
    (a new shim that would raise it is refused in _check_shim)."""
    booted = [e for e in log.events if e.pcr == 7 and secureboot.variable_name(e) == "SbatLevel"]
    value = secureboot.variable_value(booted[0]) if booted else None
    return value.decode("utf-8", "replace") if value is not None else None


def _refuse_unbootable(
    log: EventLog, image: bytes, digests: Mapping[str, bytes], what: str, authorities: list[bytes]
) -> None:
    """Unpredictable when the firmware or shim will refuse `image` (the next boot would never happen):
    a signature that does not verify under `authorities`, a hash in dbx, a revoked SBAT generation.
    `digests` are the image's Authenticode hashes in the log's banks (so it is known to be PE/COFF)."""
    refused = signature.problem(image, authorities, secureboot.forbidden_hashes(log), digests)
    if refused is not None:
        raise Unpredictable(refused[0], f"the next boot will refuse {what}: {refused[1]}")
    level = _booted_sbat_level(log)
    revoked = signature.sbat_problem(image, level) if level is not None else None
    if revoked is not None:
        raise Unpredictable(Reason.SBAT_REVOKED, f"the next boot will refuse {what}: {revoked}")


def _shim_authorities(log: EventLog, layout: _Layout) -> list[bytes]:
    """What shim verified GRUB and the kernel with this boot: the authorities it logged in PCR 7."""
    return secureboot.authority_certificates(log, layout.shim.index)


# The GRUB builds the emulation was written for and proven against (Debian 12's grub2 2.06-13+deb12uN).
EMULATED_GRUB = "2.06-13"


def _check_grub(log: EventLog, layout: _Layout, loaders: _Loaders, changes: list[str]) -> None:
    """A new GRUB on the ESP is predicted when shim will run it and it is a build the emulation models;
    that its built-in configuration and modules behave as the booted GRUB's did is then proven by the
    validation, which reruns this boot with it."""
    _refuse_unbootable(log, loaders.grub, loaders.grub_digests, "GRUB on the ESP", _shim_authorities(log, layout))
    version = grubimage.debian_version(loaders.grub)
    if version is None or not version.startswith(EMULATED_GRUB):
        raise Unpredictable(
            Reason.GRUB_CHANGED,
            f"GRUB on the ESP is Debian's {version or 'unknown build'}; the emulation models {EMULATED_GRUB} builds",
            hint="reboot once with the new GRUB (the passphrase is asked), then `luks-tpm rebind --approve-current`",
        )
    changes.append(f"PCR 4: GRUB on the ESP changed (Debian {version})")


def _check_shim(log: EventLog, layout: _Layout, loaders: _Loaders, changes: list[str]) -> None:
    # The db certificates the firmware logged before shim ran (each once, the first time it verified an
    # image with it): a new shim verified with one of them adds no PCR 7 event; with another one it would.
    firmware = secureboot.authority_certificates(log, 0, layout.shim.index)
    _refuse_unbootable(log, loaders.shim, loaders.shim_digests, "shim on the ESP", firmware)
    levels = secureboot.sbat_level(loaders.shim)
    old_text = _booted_sbat_level(log)
    if levels is None or old_text is None:
        raise Unpredictable(Reason.SHIM_CHANGED, "a new shim whose SbatLevel cannot be derived")
    new_text = levels[0] if secureboot.sbat_datestamp(levels[0]) > secureboot.sbat_datestamp(old_text) else old_text
    if new_text != old_text:
        raise Unpredictable(
            Reason.SHIM_CHANGED, f"the new shim raises SbatLevel to {secureboot.sbat_datestamp(new_text)} (PCR 7)"
        )
    changes.append("PCR 4: shim on the ESP changed (same SbatLevel, PCR 7 unchanged)")


def _hashes(banks: Sequence[str], data: bytes) -> dict[str, bytes]:
    return {bank: hashlib.new(bank, data).digest() for bank in banks}


class _BootedReader:
    """The validation's reader: files as the log recorded them, contents from disk or a snapshot."""

    def __init__(self, log: EventLog, layout: _Layout, files: BootFiles) -> None:
        self.reads = [e for e in log.events[layout.start : layout.end] if e.pcr == 9]
        self.files = files
        self.bank = "sha256" if "sha256" in log.banks else log.banks[0]

    def __call__(self, name: str, path: Path, contents: bool) -> bytes:
        if not self.reads:
            raise Unpredictable(Reason.EMULATION_MISMATCH, f"the emulation reads {name}, the booted GRUB read no more")
        event = self.reads.pop(0)
        if event.text() != name:
            raise Unpredictable(Reason.EMULATION_MISMATCH, f"the emulation reads {name}, GRUB read {event.text()}")
        if not contents:
            return b""
        wanted = event.digests[self.bank]
        candidates = [path] + ([self.files.snapshots / wanted.hex()] if self.files.snapshots else [])
        for candidate in candidates:
            if (
                candidate.is_file()
                and (data := candidate.read_bytes())
                and _hashes([self.bank], data)[self.bank] == wanted
            ):
                return data
        raise Unpredictable(
            Reason.BOOTED_INPUTS_GONE,
            f"the booted {name} is no longer on disk and no snapshot holds it",
            hint="take a snapshot (bootchain.predict.snapshot) at boot, before update-grub replaces grub.cfg",
        )


def _validate(log: EventLog, layout: _Layout, measured: list[Measurement]) -> None:
    logged = log.events[layout.start : layout.end]
    if len(measured) != len(logged):
        raise Unpredictable(
            Reason.EMULATION_MISMATCH, f"the emulation makes {len(measured)} GRUB events, the log has {len(logged)}"
        )
    for m, event in zip(measured, logged, strict=True):
        if m.kind in _PREFIXES:
            text = _PREFIXES[m.kind] + m.text
            good = (
                event.pcr == 8
                and event.text() == text
                and dict(event.digests) == _hashes(log.banks, m.text.encode("utf-8", "surrogateescape"))
            )
        else:
            good = event.pcr == (9 if m.kind is Kind.FILE else 4)
            text = m.text
        if not good:
            raise Unpredictable(
                Reason.EMULATION_MISMATCH,
                f"event {event.index}: emulated {text[:80]!r}, logged {(event.text() or event.type_name)[:80]!r}",
            )


class _DiskReader:
    """The prediction's reader: the files as they are now (cached: kernels are hashed twice)."""

    def __init__(self) -> None:
        self.cache: dict[Path, bytes] = {}

    def __call__(self, name: str, path: Path, contents: bool) -> bytes:
        if path not in self.cache:
            if not path.is_file():
                raise Unpredictable(Reason.MISSING_FILE, f"the next boot reads {name}, which is missing ({path})")
            self.cache[path] = path.read_bytes()
        return self.cache[path]


def _emulate(layout: _Layout, files: BootFiles, grub: bytes, reader: grubemu.Reader) -> list[Measurement]:
    """GRUB's measurements from its built-in configuration on, as `grub` (the image on the ESP) makes them."""
    builtin = grubimage.builtin_config(grub)
    modules, prefix = grubimage.modules(grub)
    if builtin is None or prefix is None:
        raise Unpredictable(
            Reason.UNMODELLED_CONFIG, "GRUB on the ESP is not built as Debian builds it (`normal (memdisk)/grub.cfg`)"
        )
    device = f"({files.esp_device})"
    loaded_from = (_image_path(layout.grub) or "").replace("\\", "/").rsplit("/", 1)[0]
    return grubbuiltins.emulate(files, reader, builtin, modules, device + prefix, device + loaded_from)


def _kernel_digests(log: EventLog, layout: _Layout, data: bytes, name: str) -> dict[str, bytes]:
    """The kernel's PCR 4 digests, once shim is known to accept it: otherwise the boot would never happen."""
    try:
        digests = authenticode.digests(data, log.banks)
    except PEFormatError as error:
        raise Unpredictable(Reason.OTHER_AUTHORITY, f"kernel {name}: {error}") from None
    _refuse_unbootable(log, data, digests, f"kernel {name}", _shim_authorities(log, layout))
    return digests


def _events(log: EventLog, layout: _Layout, measured: list[Measurement], reader: _DiskReader) -> list[Event]:
    old_images = [e for e in log.events[layout.start : layout.end] if e.pcr == 4]
    events, images = [], {}
    for m in measured:
        if m.kind in _PREFIXES:
            text = m.text.encode("utf-8", "surrogateescape")
            event = (8, EventType.EV_IPL, _hashes(log.banks, text), _PREFIXES[m.kind].encode() + text + b"\0")
        elif m.kind is Kind.FILE:
            assert m.path is not None
            data = reader.cache[m.path]
            event = (9, EventType.EV_IPL, _hashes(log.banks, data), m.text.encode("utf-8", "surrogateescape") + b"\0")
        else:
            assert m.path is not None
            if m.path not in images:
                images[m.path] = _kernel_digests(log, layout, reader.cache[m.path], m.text)
            event = (4, _APP, images[m.path], old_images[0].data if old_images else b"")
        events.append(make_event(0, *event))
    return events


def _describe(old: Sequence[Event], new: Sequence[Event]) -> list[str]:
    def texts(events: Sequence[Event], pcr: int) -> list[str]:
        return [e.text() or "" for e in events if e.pcr == pcr]

    changes = []
    old_lines, new_lines = texts(old, 8), texts(new, 8)
    for line in new_lines:
        if line.startswith("kernel_cmdline: ") and line not in old_lines:
            changes.append(f"PCR 8: kernel command line now {line.split(': ', 1)[1]!r}")
    if old_lines != new_lines and not changes:
        changes.append("PCR 8: GRUB executes other commands (grub.cfg or grubenv changed)")
    old_files = {e.text(): dict(e.digests) for e in old if e.pcr == 9}
    for event in new:
        if event.pcr == 9 and old_files.get(event.text()) != dict(event.digests):
            changes.append(f"PCR 9: {event.text()} {'changed' if event.text() in old_files else 'is read'}")
    if [dict(e.digests) for e in old if e.pcr == 4] != [dict(e.digests) for e in new if e.pcr == 4]:
        changes.append("PCR 4: another kernel image")
    return changes


def next_boot(log: EventLog, files: BootFiles) -> Prediction:
    """The PCR values (0-15, every bank of the log) of the next boot, or Unpredictable(reason).

    The log must be the current boot's, already checked against the TPM (`eventlog.check_replay`).
    Firmware, db/dbx/KEK/PK and MOK updates cannot be seen from files: they are not predicted.
    """
    layout = _layout(log)
    loaders = _loaders(log, layout, files)
    changes: list[str] = []
    if loaders.grub_digests != dict(layout.grub.digests):
        _check_grub(log, layout, loaders, changes)
    if loaders.shim_digests != dict(layout.shim.digests):
        _check_shim(log, layout, loaders, changes)
    booted = _emulate(layout, files, loaders.grub, _BootedReader(log, layout, files))
    _validate(log, layout, booted)
    reader = _DiskReader()
    regenerated = _events(log, layout, _emulate(layout, files, loaders.grub, reader), reader)
    new_digests = {layout.shim.index: loaders.shim_digests, layout.grub.index: loaders.grub_digests}
    kept = [
        make_event(e.index, e.pcr, e.type, new_digests[e.index], e.data) if e.index in new_digests else e
        for e in log.events[: layout.start]
    ]
    events = [*kept, *regenerated, *log.events[layout.end :]]
    events = [make_event(i + 1, e.pcr, e.type, e.digests, e.data) for i, e in enumerate(events)]
    values = replay(log, events)
    predicted = types.MappingProxyType(
        {bank: types.MappingProxyType({p: pcrs[p] for p in PREDICTED_PCRS}) for bank, pcrs in values.items()}
    )
    changes += _describe(log.events[layout.start : layout.end], regenerated)
    current = replay(log)
    moved = [p for p in PREDICTED_PCRS if p != 10 and any(current[b][p] != values[b][p] for b in log.banks)]
    changes.append(f"PCRs that change: {', '.join(map(str, moved))}" if moved else "no PCR changes")
    return Prediction(predicted, tuple(events), tuple(changes))


def snapshot(log: EventLog, files: BootFiles, directory: Path, limit: int = 1 << 20) -> list[Path]:
    """Copy the config files the booted GRUB read (those still unchanged on disk, up to `limit` bytes)
    into `directory`, named by sha256: what `next_boot` needs to validate its emulation after
    update-grub has replaced them. Run it at boot (or before any update touches /boot)."""
    layout = _layout(log)
    directory.mkdir(parents=True, exist_ok=True)
    copied = []
    for event in log.events[layout.start : layout.end]:
        if event.pcr != 9 or "sha256" not in event.digests:
            continue
        path = files.locate(event.text() or "", files.esp_device)
        if not path.is_file() or path.stat().st_size > limit:
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).digest() == event.digests["sha256"]:
            target = directory / event.digests["sha256"].hex()
            if not target.exists():
                shutil.copyfile(path, target)
            copied.append(target)
    return copied
