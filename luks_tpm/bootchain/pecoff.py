"""PE/COFF image layout: the header fields, sections and certificate table that Authenticode and SBAT need.

Every offset is checked against the file's size, so any malformed or non-PE input is a PEFormatError
with one line saying what is wrong, never an IndexError or struct.error.
"""

from __future__ import annotations

import dataclasses
import struct

from .errors import PEFormatError

_PE32, _PE32_PLUS = 0x10B, 0x20B
_SECURITY_DIRECTORY = 4  # IMAGE_DIRECTORY_ENTRY_SECURITY: the certificate table (a file offset, not an RVA)


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    raw_offset: int
    raw_size: int


@dataclasses.dataclass(frozen=True)
class PEImage:
    """Where Authenticode's skipped fields and hashed ranges lie in one image."""

    size: int
    checksum_offset: int  # OptionalHeader.CheckSum (4 bytes, not hashed)
    security_entry_offset: int | None  # the certificate table's data directory entry (8 bytes, not hashed)
    headers_size: int  # OptionalHeader.SizeOfHeaders
    sections: tuple[Section, ...]
    cert_offset: int
    cert_size: int


def _u16(data: bytes, offset: int, what: str) -> int:
    if offset < 0 or offset + 2 > len(data):
        raise PEFormatError(f"not a PE/COFF image: truncated before {what}")
    value: int = struct.unpack_from("<H", data, offset)[0]
    return value


def _u32(data: bytes, offset: int, what: str) -> int:
    if offset < 0 or offset + 4 > len(data):
        raise PEFormatError(f"not a PE/COFF image: truncated before {what}")
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


def _long_name(data: bytes, pe: int, name: str) -> str:
    """Section names longer than 8 bytes are "/N": offset N in the COFF string table (after the symbols)."""
    if not name.startswith("/") or not name[1:].isdigit():
        return name
    strings = _u32(data, pe + 12, "the symbol table") + 18 * _u32(data, pe + 16, "the symbol count")
    start = strings + int(name[1:])
    end = data.find(b"\0", start)
    return data[start:end].decode("ascii", "replace") if 0 < strings < start < end else name


def _sections(data: bytes, pe: int, table: int, count: int) -> tuple[Section, ...]:
    sections = []
    for i in range(count):
        entry = table + 40 * i
        if entry + 40 > len(data):
            raise PEFormatError(f"not a PE/COFF image: section table entry {i} lies beyond the file")
        name = _long_name(data, pe, data[entry : entry + 8].rstrip(b"\0").decode("ascii", "replace"))
        raw_size, raw_offset = _u32(data, entry + 16, "a section size"), _u32(data, entry + 20, "a section offset")
        if raw_size and raw_offset + raw_size > len(data):
            raise PEFormatError(f"PE section {name!r} lies beyond the end of the file")
        sections.append(Section(name, raw_offset, raw_size))
    return tuple(sections)


def parse(data: bytes) -> PEImage:
    """The layout of a PE/COFF image (PE32 or PE32+)."""
    if data[:2] != b"MZ":
        raise PEFormatError("not a PE/COFF image (no MZ header)")
    pe = _u32(data, 0x3C, "the PE header offset")
    if data[pe : pe + 4] != b"PE\0\0":
        raise PEFormatError("not a PE/COFF image (no PE signature where the MZ header points)")
    section_count = _u16(data, pe + 6, "the section count")
    optional_size = _u16(data, pe + 20, "the optional header size")
    optional = pe + 24
    magic = _u16(data, optional, "the optional header magic")
    if magic not in (_PE32, _PE32_PLUS):
        raise PEFormatError(f"not a PE/COFF image (optional header magic 0x{magic:x})")
    directories = optional + (96 if magic == _PE32 else 112)
    directory_count = _u32(data, directories - 4, "the data directory count")
    headers_size = _u32(data, optional + 60, "SizeOfHeaders")
    if headers_size > len(data) or headers_size < directories:
        raise PEFormatError(f"PE SizeOfHeaders {headers_size} does not fit the file")
    security = None
    cert_offset = cert_size = 0
    if directory_count > _SECURITY_DIRECTORY:
        security = directories + 8 * _SECURITY_DIRECTORY
        if security + 8 > headers_size:
            raise PEFormatError("PE certificate table entry lies beyond the headers")
        cert_offset, cert_size = _u32(data, security, "the certificate table"), _u32(data, security + 4, "it")
        if cert_size and (cert_offset < headers_size or cert_offset + cert_size > len(data)):
            raise PEFormatError("PE certificate table lies outside the file")
    sections = _sections(data, pe, optional + optional_size, section_count)
    return PEImage(len(data), optional + 64, security, headers_size, sections, cert_offset, cert_size)


def section_data(data: bytes, name: str) -> bytes | None:
    """The raw bytes of the first section called `name` (e.g. ".sbat"), or None."""
    for section in parse(data).sections:
        if section.name == name:
            return data[section.raw_offset : section.raw_offset + section.raw_size]
    return None


def certificate_table(data: bytes) -> bytes:
    """The image's attribute certificate table (WIN_CERTIFICATE entries: the Authenticode signatures)."""
    image = parse(data)
    return data[image.cert_offset : image.cert_offset + image.cert_size]
