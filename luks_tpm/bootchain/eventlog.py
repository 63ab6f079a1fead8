"""The TCG2 crypto-agile event log (`/sys/kernel/security/tpm0/binary_bios_measurements`): parse and replay.

The log starts with a SHA1-format EV_NO_ACTION "Spec ID Event03" event that lists every bank and its
digest size; every later event carries one digest per bank. EV_NO_ACTION events are never extended
(one of them, "StartupLocality", sets PCR 0's starting value). Replay = for each bank,
PCR := H(PCR || digest) per event; the result must equal the TPM's PCRs before a log is trusted.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct
import types
from collections.abc import Iterable, Mapping

from .errors import EventLogError, ReplayMismatch

# TPM_ALG_ID -> hashlib name
ALGORITHMS = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512", 0x0012: "sm3_256"}
# PCRs the firmware, shim and GRUB extend: what a replay of the pre-OS log can vouch for. The OS extends
# others (IMA's 10, systemd's 11-15, luks-tpm's fence in 15) without writing this log.
PRE_OS_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14)
_SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
_STARTUP_LOCALITY = b"StartupLocality\0"
_MAX_EVENT_SIZE = 16 * 1024 * 1024


class EventType(enum.IntEnum):
    """TCG PC Client event types (TCG PC Client Platform Firmware Profile, section 10.4.1)."""

    EV_PREBOOT_CERT = 0x0
    EV_POST_CODE = 0x1
    EV_UNUSED = 0x2
    EV_NO_ACTION = 0x3
    EV_SEPARATOR = 0x4
    EV_ACTION = 0x5
    EV_EVENT_TAG = 0x6
    EV_S_CRTM_CONTENTS = 0x7
    EV_S_CRTM_VERSION = 0x8
    EV_CPU_MICROCODE = 0x9
    EV_PLATFORM_CONFIG_FLAGS = 0xA
    EV_TABLE_OF_DEVICES = 0xB
    EV_COMPACT_HASH = 0xC
    EV_IPL = 0xD
    EV_IPL_PARTITION_DATA = 0xE
    EV_NONHOST_CODE = 0xF
    EV_NONHOST_CONFIG = 0x10
    EV_NONHOST_INFO = 0x11
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x12
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
    EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
    EV_EFI_GPT_EVENT = 0x80000006
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_HANDOFF_TABLES = 0x80000009
    EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
    EV_EFI_HANDOFF_TABLES2 = 0x8000000B
    EV_EFI_VARIABLE_BOOT2 = 0x8000000C
    EV_EFI_HCRTM_EVENT = 0x80000010
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
    EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
    EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2


@dataclasses.dataclass(frozen=True)
class Event:
    """One measurement: `digests` maps each bank ("sha256", ...) to the digest extended into `pcr`."""

    index: int  # position in the log (the Spec ID event is 0)
    pcr: int
    type: EventType | int  # an int for types this module has no name for
    digests: Mapping[str, bytes]
    data: bytes

    @property
    def type_name(self) -> str:
        return self.type.name if isinstance(self.type, EventType) else f"0x{self.type:08x}"

    def text(self) -> str | None:
        """The event data as text when it is a NUL-terminated string (GRUB's and shim's EV_IPL events)."""
        raw = self.data[:-1] if self.data.endswith(b"\0") else self.data
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return text if "\0" not in text else None


@dataclasses.dataclass(frozen=True)
class EventLog:
    """A parsed log: the banks (name -> digest size) from its Spec ID event, and every event after it."""

    digest_sizes: Mapping[str, int]
    events: tuple[Event, ...]
    startup_locality: int = 0

    @property
    def banks(self) -> tuple[str, ...]:
        return tuple(self.digest_sizes)


def make_event(index: int, pcr: int, etype: EventType | int, digests: Mapping[str, bytes], data: bytes) -> Event:
    return Event(index, pcr, etype, types.MappingProxyType(dict(digests)), data)


class _Reader:
    """Bounds-checked little-endian reads: a short log is an EventLogError, never a struct.error."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise EventLogError(f"event log truncated at byte {self.offset} (reading {what})")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value


def _event_type(value: int) -> EventType | int:
    try:
        return EventType(value)
    except ValueError:
        return value


def _parse_spec_id(reader: _Reader) -> dict[str, int]:
    pcr, etype = reader.u32("first event's PCR"), reader.u32("first event's type")
    reader.take(20, "first event's SHA1 digest")
    size = reader.u32("Spec ID event size")
    if pcr != 0 or etype != EventType.EV_NO_ACTION or size > _MAX_EVENT_SIZE:
        raise EventLogError("not a TCG2 event log (the first event is not the Spec ID event)")
    spec = _Reader(reader.take(size, "Spec ID event"))
    if spec.take(16, "Spec ID signature") != _SPEC_ID_SIGNATURE:
        raise EventLogError("not a crypto-agile TCG2 event log (no 'Spec ID Event03' signature)")
    spec.take(8, "Spec ID platform class and version")
    count = spec.u32("Spec ID number of algorithms")
    if not 0 < count <= 16:
        raise EventLogError(f"Spec ID event lists {count} algorithms")
    sizes: dict[str, int] = {}
    for _ in range(count):
        alg, digest_size = spec.u16("Spec ID algorithm"), spec.u16("Spec ID digest size")
        name = ALGORITHMS.get(alg, f"alg-0x{alg:04x}")
        if name not in hashlib.algorithms_available or hashlib.new(name).digest_size != digest_size:
            raise EventLogError(f"event log bank {name} (digest size {digest_size}) cannot be replayed here")
        sizes[name] = digest_size
    return sizes


def _parse_event(reader: _Reader, index: int, sizes: Mapping[str, int]) -> Event:
    by_id = {alg: name for alg, name in ALGORITHMS.items() if name in sizes}
    pcr, etype, count = reader.u32("PCR index"), reader.u32("event type"), reader.u32("digest count")
    if pcr > 23:
        raise EventLogError(f"event {index} names PCR {pcr}")
    if count != len(sizes):
        raise EventLogError(f"event {index} has {count} digests, the log has {len(sizes)} banks")
    digests: dict[str, bytes] = {}
    for _ in range(count):
        alg = reader.u16("digest algorithm")
        name = by_id.get(alg)
        if name is None or name in digests:
            raise EventLogError(f"event {index} has a digest of algorithm 0x{alg:04x} not (or twice) in the log")
        digests[name] = reader.take(sizes[name], f"event {index}'s {name} digest")
    size = reader.u32("event size")
    if size > _MAX_EVENT_SIZE:
        raise EventLogError(f"event {index} claims {size} bytes of data")
    data = reader.take(size, f"event {index}'s data")
    return make_event(index, pcr, _event_type(etype), digests, data)


def parse(data: bytes) -> EventLog:
    """Parse a crypto-agile TCG2 event log; EventLogError (one line) on any damage."""
    reader = _Reader(bytes(data))
    sizes = _parse_spec_id(reader)
    events: list[Event] = []
    locality = 0
    while reader.remaining():
        event = _parse_event(reader, len(events) + 1, sizes)
        if event.type == EventType.EV_NO_ACTION and event.data.startswith(_STARTUP_LOCALITY):
            if len(event.data) != len(_STARTUP_LOCALITY) + 1:
                raise EventLogError(f"event {event.index}: malformed StartupLocality event")
            locality = event.data[-1]
        events.append(event)
    return EventLog(types.MappingProxyType(sizes), tuple(events), locality)


def initial_value(bank_size: int, pcr: int, locality: int = 0) -> bytes:
    """A PCR's value after TPM2_Startup: PCRs 17-22 (DRTM) are all ones, PCR 0 carries the startup locality."""
    if 17 <= pcr <= 22:
        return b"\xff" * bank_size
    if pcr == 0 and locality:
        return b"\0" * (bank_size - 1) + bytes([locality])
    return b"\0" * bank_size


def replay(log: EventLog, events: Iterable[Event] | None = None) -> dict[str, dict[int, bytes]]:
    """PCRs 0-23 of every bank after extending `events` (default: the log's own) from their initial values."""
    values = {
        bank: {pcr: initial_value(size, pcr, log.startup_locality) for pcr in range(24)}
        for bank, size in log.digest_sizes.items()
    }
    for event in log.events if events is None else events:
        if event.type == EventType.EV_NO_ACTION:
            continue
        for bank, pcrs in values.items():
            pcrs[event.pcr] = hashlib.new(bank, pcrs[event.pcr] + event.digests[bank]).digest()
    return values


def check_replay(log: EventLog, current: Mapping[str, Mapping[int, bytes]], pcrs: Iterable[int] = PRE_OS_PCRS) -> None:
    """Raise ReplayMismatch naming every (bank, PCR) of `current` among `pcrs` that the replay does not give.

    A bank in `current` that the log lacks counts as differing. PCRs outside `pcrs` are ignored: the OS
    extends them (IMA, systemd, the PCR-15 fence) without writing this log.
    """
    wanted = set(pcrs)
    replayed = replay(log)
    differing = []
    for bank in sorted(current):
        for pcr in sorted(set(current[bank]) & wanted):
            if replayed.get(bank, {}).get(pcr) != bytes(current[bank][pcr]):
                differing.append((bank, pcr))
    if differing:
        raise ReplayMismatch(tuple(differing))
