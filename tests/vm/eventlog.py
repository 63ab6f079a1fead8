"""The firmware's TCG2 event log (crypto-agile format, TCG PC Client Platform Firmware Profile §10): parse
and replay. Standard library only, so the check does not trust the tools it could be checking.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

EV_NO_ACTION = 0x3  # informational (the Spec ID header, ...): never extended into a PCR
# TPM_ALG_ID -> hashlib name, for the banks a log can carry
ALGORITHMS = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}


@dataclass(frozen=True)
class Event:
    pcr: int
    type: int
    digests: dict[str, bytes]  # bank -> digest (empty for the first, SHA1-format, header event)
    data: bytes


def parse(log: bytes) -> list[Event]:
    """Every event of a crypto-agile log; refuses a log without the "Spec ID Event03" header."""
    pcr, event_type = struct.unpack_from("<II", log, 0)
    (size,) = struct.unpack_from("<I", log, 28)  # the header event is in the SHA1 format: 20-byte digest
    header = log[32 : 32 + size]
    if not header.startswith(b"Spec ID Event03\0"):
        raise ValueError("not a crypto-agile TCG2 event log (no Spec ID Event03 header)")
    (count,) = struct.unpack_from("<I", header, 24)
    sizes = {}
    for i in range(count):
        algorithm, digest_size = struct.unpack_from("<HH", header, 28 + 4 * i)
        sizes[algorithm] = digest_size
    events = [Event(pcr, event_type, {}, header)]
    offset = 32 + size
    while offset + 12 <= len(log):
        pcr, event_type, count = struct.unpack_from("<III", log, offset)
        offset += 12
        digests = {}
        for _ in range(count):
            (algorithm,) = struct.unpack_from("<H", log, offset)
            if algorithm not in sizes:
                raise ValueError(f"event digest with algorithm {algorithm:#x}, not in the log's header")
            digests[ALGORITHMS.get(algorithm, f"{algorithm:#x}")] = log[offset + 2 : offset + 2 + sizes[algorithm]]
            offset += 2 + sizes[algorithm]
        (size,) = struct.unpack_from("<I", log, offset)
        offset += 4
        if offset + size > len(log):
            raise ValueError("event log truncated")
        events.append(Event(pcr, event_type, digests, log[offset : offset + size]))
        offset += size
    return events


def replay(events: list[Event]) -> dict[str, dict[int, str]]:
    """The PCR values the events extend to, from all-zero PCRs: {bank: {pcr: lowercase hex}}, for the
    PCRs the log extends."""
    banks = sorted({bank for event in events for bank in event.digests})
    values: dict[str, dict[int, bytes]] = {bank: {} for bank in banks}
    for event in events:
        if event.type == EV_NO_ACTION:
            continue
        for bank, digest in event.digests.items():
            old = values[bank].get(event.pcr, bytes(hashlib.new(bank).digest_size))
            values[bank][event.pcr] = hashlib.new(bank, old + digest).digest()
    return {bank: {pcr: value.hex() for pcr, value in sorted(pcrs.items())} for bank, pcrs in values.items()}
