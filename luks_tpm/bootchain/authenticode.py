"""The PE/COFF Authenticode hash: what OVMF and shim extend into PCR 4 for each image, and `pesign -h` prints.

Microsoft's "Windows Authenticode Portable Executable Signature Format": hash the headers without the
CheckSum field and the certificate table's directory entry, then every section's raw data in file
order, then whatever follows the sections except the certificate table itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from . import pecoff


def _ranges(image: pecoff.PEImage) -> list[tuple[int, int]]:
    """(start, end) byte ranges that are hashed, in order."""
    ranges = [(0, image.checksum_offset)]
    if image.security_entry_offset is None:
        ranges.append((image.checksum_offset + 4, image.headers_size))
    else:
        ranges.append((image.checksum_offset + 4, image.security_entry_offset))
        ranges.append((image.security_entry_offset + 8, image.headers_size))
    hashed = image.headers_size
    for section in sorted(image.sections, key=lambda s: s.raw_offset):
        if section.raw_size:
            ranges.append((section.raw_offset, section.raw_offset + section.raw_size))
            hashed += section.raw_size
    if image.size > hashed + image.cert_size:
        ranges.append((hashed, image.size - image.cert_size))
    return ranges


def digests(data: bytes, algorithms: Iterable[str]) -> dict[str, bytes]:
    """The Authenticode hash of `data` for each algorithm ("sha1", "sha256", ...), in one pass."""
    image = pecoff.parse(data)
    hashes = {name: hashlib.new(name) for name in algorithms}
    view = memoryview(data)
    for start, end in _ranges(image):
        for h in hashes.values():
            h.update(view[start:end])
    return {name: h.digest() for name, h in hashes.items()}


def digest(data: bytes, algorithm: str = "sha256") -> bytes:
    """The Authenticode hash of a PE/COFF image (PEFormatError for anything else)."""
    return digests(data, (algorithm,))[algorithm]
