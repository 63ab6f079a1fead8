"""Authenticode hashes == `pesign -h` on Debian's signed shim, GRUB and kernels and on hand-made PE files."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from luks_tpm.bootchain import authenticode
from luks_tpm.bootchain.errors import PEFormatError

from . import bootchain_lab as lab


def pesign(path: Path, algorithm: str) -> bytes:
    if shutil.which("pesign") is None:
        pytest.skip("pesign is not installed (scripts/bootstrap installs it)")
    result = subprocess.run(
        ["pesign", "-h", "-d", algorithm, "-i", str(path)], capture_output=True, text=True, check=True
    )
    return bytes.fromhex(result.stdout.split()[-1])


@pytest.mark.parametrize("relative", [lab.SHIM, lab.GRUB, "linux-image-6.1.0-57-amd64/boot/vmlinuz-6.1.0-57-amd64"])
@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_debian_signed_binaries(relative: str, algorithm: str) -> None:
    path = lab.binary(relative)
    assert authenticode.digest(path.read_bytes(), algorithm) == pesign(path, algorithm)


def test_the_kernel_digest_is_what_shim_logged() -> None:
    path = lab.binary("linux-image-6.1.0-56-amd64/boot/vmlinuz-6.1.0-56-amd64")
    logged = [e for e in lab.log("base-r1").events if e.pcr == 4][-1]
    assert authenticode.digests(path.read_bytes(), logged.digests) == dict(logged.digests)


def make_pe(sections: list[bytes], *, cert: bytes = b"", trailing: bytes = b"", directories: int = 16) -> bytes:
    """A minimal PE32+ image: headers (0x200), the sections at 0x200-aligned offsets, trailing data, then the
    certificate table (8-byte aligned, as signing tools place it)."""
    header_size = 0x200
    optional_size = 112 + 8 * directories
    offsets, position = [], header_size
    for data in sections:
        offsets.append(position)
        position += (len(data) + 0x1FF) & ~0x1FF
    body = bytearray(position)
    for offset, data in zip(offsets, sections, strict=True):
        body[offset : offset + len(data)] = data
    body += trailing
    cert_offset = len(body) + (-len(body) % 8) if cert else 0
    body += bytes(cert_offset - len(body)) if cert else b""
    body += cert
    struct.pack_into("<2sH", body, 0, b"MZ", 0x90)
    struct.pack_into("<I", body, 0x3C, 0x80)
    struct.pack_into("<4sHHIIIHH", body, 0x80, b"PE\0\0", 0x8664, len(sections), 0, 0, 0, optional_size, 0x22)
    optional = 0x98
    struct.pack_into("<HBB", body, optional, 0x20B, 14, 0)
    struct.pack_into("<II", body, optional + 32, 0x1000, 0x200)  # section / file alignment
    struct.pack_into("<III", body, optional + 56, position, header_size, 0x1234)  # SizeOfImage, headers, CheckSum
    struct.pack_into("<HH", body, optional + 68, 10, 0)  # EFI application subsystem
    struct.pack_into("<I", body, optional + 108, directories)
    if cert and directories > 4:
        struct.pack_into("<II", body, optional + 112 + 32, cert_offset, len(cert))
    table = optional + optional_size
    for i, (offset, data) in enumerate(zip(offsets, sections, strict=True)):
        raw = (len(data) + 0x1FF) & ~0x1FF
        struct.pack_into("<8sIIII", body, table + 40 * i, b".s%d" % i, len(data), 0x1000 * (i + 1), raw, offset)
    return bytes(body)


CERT = struct.pack("<IHH", 16, 0x0200, 0x0002) + b"\x30\x82\x00\x04fake"


@pytest.mark.parametrize(
    "name,image",
    [
        ("no certificate table", make_pe([b"code" * 100, b"data" * 10])),
        ("certificate table", make_pe([b"code" * 100], cert=CERT)),
        ("trailing data before the certificates", make_pe([b"code" * 100], cert=CERT, trailing=b"extra" * 3)),
        ("trailing data, unsigned", make_pe([b"x" * 0x200], trailing=b"tail")),
        ("three sections", make_pe([b"a" * 0x300, b"b" * 0x10, b"c" * 0x1FF])),
    ],
)
def test_hand_made_images(tmp_path: Path, name: str, image: bytes) -> None:
    path = tmp_path / "image.efi"
    path.write_bytes(image)
    for algorithm in ("sha1", "sha256"):
        assert authenticode.digest(image, algorithm) == pesign(path, algorithm), name


def test_the_certificate_table_is_not_hashed() -> None:
    one = make_pe([b"code" * 100], cert=CERT)
    other = make_pe([b"code" * 100], cert=CERT[:-4] + b"FAKE")
    assert authenticode.digest(one) == authenticode.digest(other)
    assert authenticode.digest(one) != authenticode.digest(make_pe([b"code" * 99 + b"CODE"], cert=CERT))


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "no MZ"),
        (b"#!/bin/sh\necho not a PE\n", "no MZ"),
        (b"MZ" + bytes(10), "truncated"),
        (b"MZ" + bytes(100), "no PE signature"),
        (b"MZ" + bytes(58) + struct.pack("<I", 64) + b"NE\0\0" + bytes(100), "no PE signature"),
    ],
)
def test_non_pe_input_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(PEFormatError, match=message):
        authenticode.digest(data)


def test_a_section_beyond_the_file_is_refused() -> None:
    image = make_pe([b"code" * 200])
    with pytest.raises(PEFormatError, match="beyond"):
        authenticode.digest(image[:0x300])
