"""Secure Boot facts a prediction must not guess: the authorities this boot used, shim's SbatLevel.

The authorities are the certificates of the log's EV_EFI_VARIABLE_AUTHORITY events (PCR 7): OVMF logs
the db certificate that verified shim, shim the certificate (its built-in vendor certificate, logged
as MokListRT) that verified GRUB and the kernel, each once per boot. A kernel signed under another
authority would add a new PCR 7 event: signature.py refuses it rather than guess.
"""

from __future__ import annotations

import struct
import uuid

from . import pecoff
from .eventlog import Event, EventLog, EventType

_CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328").bytes_le  # EFI_CERT_SHA256_GUID


def authority_certificates(log: EventLog, after: int, before: int | None = None) -> list[bytes]:
    """DER certificates of the PCR 7 authority events with an index in [after, before) (UEFI_VARIABLE_DATA
    with an EFI_SIGNATURE_DATA: owner GUID + certificate)."""
    certs = []
    for event in log.events:
        if event.pcr != 7 or event.type != EventType.EV_EFI_VARIABLE_AUTHORITY:
            continue
        if event.index < after or (before is not None and event.index >= before):
            continue
        value = variable_value(event)
        if value is not None and _is_certificate(value[16:]):
            certs.append(value[16:])
    return certs


def _is_certificate(der: bytes) -> bool:
    """A DER SEQUENCE filling `der` exactly, with a two-byte length: what every X.509 certificate of a few
    hundred bytes to 64 KiB is (and what shim's SbatLevel text, also an authority event, is not)."""
    return len(der) > 4 and der[:2] == b"\x30\x82" and int.from_bytes(der[2:4], "big") + 4 == len(der)


def forbidden_hashes(log: EventLog) -> frozenset[bytes]:
    """The SHA-256 image hashes in the dbx this boot measured (PCR 7): firmware and shim refuse those
    images. dbx is a run of EFI_SIGNATURE_LISTs (type GUID, list size, header size, entry size, header,
    entries of owner GUID + data); the EFI_CERT_SHA256 ones hold Authenticode hashes."""
    found = [
        e
        for e in log.events
        if e.pcr == 7 and e.type == EventType.EV_EFI_VARIABLE_DRIVER_CONFIG and variable_name(e) == "dbx"
    ]
    value = (variable_value(found[0]) if found else None) or b""
    hashes, position = set(), 0
    while position + 28 <= len(value):
        list_size, header_size, entry_size = struct.unpack_from("<III", value, position + 16)
        if list_size < 28 or position + list_size > len(value) or entry_size < 16:
            break
        if value[position : position + 16] == _CERT_SHA256 and entry_size == 48:
            for entry in range(position + 28 + header_size, position + list_size - 47, 48):
                hashes.add(value[entry + 16 : entry + 48])
        position += list_size
    return frozenset(hashes)


def variable_value(event: Event) -> bytes | None:
    """The value bytes of a UEFI_VARIABLE_DATA event (GUID, name length, value length, name, value)."""
    data = event.data
    if len(data) < 32:
        return None
    name_chars, value_length = struct.unpack_from("<QQ", data, 16)
    start = 32 + 2 * name_chars
    return data[start : start + value_length] if start + value_length <= len(data) else None


def variable_name(event: Event) -> str:
    data = event.data
    if len(data) < 32:
        return ""
    name_chars = struct.unpack_from("<Q", data, 16)[0]
    return data[32 : 32 + 2 * name_chars].decode("utf-16-le", "replace")


def sbat_level(shim: bytes) -> tuple[str, str] | None:
    """(previous, latest) SbatLevel payloads from shim's `.sbatlevel` section, or None without one.

    The section is: u32 version, u32 offset of "previous", u32 offset of "latest" (offsets from the
    end of the version field), each a NUL-terminated text. shim (default policy) writes "previous"
    into SbatLevel when it is newer than the variable's current value.
    """
    section = pecoff.section_data(shim, ".sbatlevel")
    if section is None or len(section) < 12:
        return None
    _version, previous, latest = struct.unpack_from("<III", section, 0)

    def text(offset: int) -> str:
        raw = section[4 + offset :]
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    return text(previous), text(latest)


def sbat_datestamp(level: str) -> str:
    """The datestamp that orders SbatLevel payloads ("sbat,1,2025021800\\n..." -> "2025021800")."""
    first = level.split("\n", 1)[0].split(",")
    return first[2] if len(first) > 2 else ""
