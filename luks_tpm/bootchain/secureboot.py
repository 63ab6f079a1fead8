"""Secure Boot facts a prediction must not guess: which authority signed a binary, shim's SbatLevel.

The authorities are the certificates of the log's EV_EFI_VARIABLE_AUTHORITY events (PCR 7): OVMF logs
the db certificate that verified shim, shim the certificate (its built-in vendor certificate, logged
as MokListRT) that verified GRUB and the kernel, each once per boot. A binary is "signed under" such a
certificate when its Authenticode signature's certificates name that certificate's subject as issuer
(the DER bytes of the subject Name appear in the signature): a kernel signed under another authority
would add a new PCR 7 event, which is refused rather than guessed.
"""

from __future__ import annotations

import struct

from . import pecoff
from .eventlog import Event, EventLog, EventType

_CERT_SEQUENCE = 0x30


def _der(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the DER element at `offset`; ValueError when malformed."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > len(data):
        raise ValueError("truncated DER")
    return tag, start, start + length


def certificate_subject(cert: bytes) -> bytes | None:
    """The DER subject Name of an X.509 certificate, or None when it is not one."""
    try:
        tag, start, _ = _der(cert, 0)
        tag, position, _ = _der(cert, start)  # TBSCertificate
        if tag != _CERT_SEQUENCE:
            return None
        fields: list[tuple[int, int, int]] = []
        while len(fields) < 6:
            tag, _contents, end = _der(cert, position)
            fields.append((tag, position, end))
            position = end
        if fields[0][0] != 0xA0:  # no explicit version: v1 certificate, fields shift by one
            fields.insert(0, (0xA0, 0, 0))
        _tag, begin, end = fields[5]  # version, serial, signature, issuer, validity, subject
        return cert[begin:end]
    except ValueError:
        return None


def authority_certificates(log: EventLog, after: int) -> list[bytes]:
    """DER certificates of the PCR 7 authority events at or after index `after` (UEFI_VARIABLE_DATA with
    an EFI_SIGNATURE_DATA: owner GUID + certificate)."""
    certs = []
    for event in log.events:
        if event.index < after or event.pcr != 7 or event.type != EventType.EV_EFI_VARIABLE_AUTHORITY:
            continue
        value = variable_value(event)
        if value is not None and len(value) > 16 and value[16] == _CERT_SEQUENCE:
            certs.append(value[16:])
    return certs


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


def signed_under(image: bytes, certificates: list[bytes]) -> bool:
    """Whether the image's Authenticode signature chains (by issuer name) to one of the certificates."""
    table = pecoff.certificate_table(image)
    subjects = [s for s in (certificate_subject(c) for c in certificates) if s]
    return bool(table) and any(subject in table for subject in subjects)


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
