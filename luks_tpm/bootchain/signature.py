"""Whether shim will accept a kernel: its Authenticode signature checked as shim checks it.

A prediction approves the PCR values of a boot that runs the new kernel. Approving a kernel that shim
will refuse (changed after signing, signed under another authority, revoked by SbatLevel) would report
"the next boot unlocks" for a boot that never happens, so such a kernel is refused instead.

Authenticode (Microsoft's "Windows Authenticode Portable Executable Signature Format") is a PKCS#7
SignedData in the PE certificate table. Its content, SpcIndirectDataContent, holds the image's
Authenticode hash; the signer's authenticated attributes hold the hash of that content; the signature
covers the attributes. Each link is checked here, then the signer's certificate is followed (through
the certificates the signature carries) to an authority the booted log shows in PCR 7: the certificate
shim's own verification used for GRUB and the kernel of this boot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Mapping

from .. import libcrypto
from . import authenticode, pecoff
from .errors import Reason

_OID, _OCTETS, _SEQUENCE, _SET, _EXPLICIT0 = 0x06, 0x04, 0x30, 0x31, 0xA0
_SIGNED_DATA = bytes.fromhex("2a864886f70d010702")  # 1.2.840.113549.1.7.2
_SPC_INDIRECT_DATA = bytes.fromhex("2b060104018237020104")  # 1.3.6.1.4.1.311.2.1.4
_MESSAGE_DIGEST = bytes.fromhex("2a864886f70d010904")  # 1.2.840.113549.1.9.4
_DIGESTS = {
    bytes.fromhex("2b0e03021a"): "sha1",
    bytes.fromhex("608648016503040201"): "sha256",
    bytes.fromhex("608648016503040202"): "sha384",
    bytes.fromhex("608648016503040203"): "sha512",
}
_PKCS_SIGNED_DATA = 0x0002  # WIN_CERTIFICATE.wCertificateType
_CHAIN_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class _Element:
    tag: int
    header: int  # where its tag is
    start: int  # where its contents are
    end: int


def _elements(der: bytes, start: int, end: int) -> list[_Element]:
    """The DER elements one after another in der[start:end]; ValueError when malformed."""
    found, position = [], start
    while position < end:
        if position + 2 > end:
            raise ValueError("truncated DER")
        tag, length, contents = der[position], der[position + 1], position + 2
        if length & 0x80:
            count = length & 0x7F
            if not 0 < count <= 4 or contents + count > end:
                raise ValueError("bad DER length")
            length = int.from_bytes(der[contents : contents + count], "big")
            contents += count
        if contents + length > end:
            raise ValueError("truncated DER")
        found.append(_Element(tag, position, contents, contents + length))
        position = contents + length
    return found


def _inside(der: bytes, element: _Element, tag: int) -> list[_Element]:
    if element.tag != tag:
        raise ValueError(f"DER tag 0x{element.tag:02x} where 0x{tag:02x} belongs")
    return _elements(der, element.start, element.end)


def _value(der: bytes, element: _Element, tag: int) -> bytes:
    if element.tag != tag:
        raise ValueError(f"DER tag 0x{element.tag:02x} where 0x{tag:02x} belongs")
    return der[element.start : element.end]


def _algorithm(der: bytes, identifier: _Element) -> str:
    oid = _value(der, _inside(der, identifier, _SEQUENCE)[0], _OID)
    if oid not in _DIGESTS:
        raise ValueError(f"digest algorithm {oid.hex()} is not one shim knows")
    return _DIGESTS[oid]


@dataclasses.dataclass(frozen=True)
class _SignedData:
    image_algorithm: str
    image_digest: bytes  # the Authenticode hash the signer signed
    content: bytes  # SpcIndirectDataContent without its tag and length: what the attributes hash
    certificates: tuple[bytes, ...]
    attribute_algorithm: str
    message_digest: bytes  # the messageDigest attribute
    attributes: bytes  # the authenticated attributes as a DER SET OF: what the signature covers
    signature: bytes


def _signed_data(der: bytes) -> _SignedData:
    oid, explicit = _inside(der, _elements(der, 0, len(der))[0], _SEQUENCE)[:2]
    if _value(der, oid, _OID) != _SIGNED_DATA:
        raise ValueError("not a PKCS#7 SignedData")
    fields = _inside(der, _inside(der, explicit, _EXPLICIT0)[0], _SEQUENCE)
    content_type, content_explicit = _inside(der, fields[2], _SEQUENCE)[:2]
    if _value(der, content_type, _OID) != _SPC_INDIRECT_DATA:
        raise ValueError("the signed content is not SpcIndirectDataContent")
    content = _inside(der, content_explicit, _EXPLICIT0)[0]
    digest_algorithm, digest = _inside(der, _inside(der, content, _SEQUENCE)[1], _SEQUENCE)
    certificates = _inside(der, fields[3], _EXPLICIT0) if fields[3].tag == _EXPLICIT0 else []
    signers = _inside(der, fields[-1], _SET)
    if len(signers) != 1:
        raise ValueError(f"{len(signers)} signers where Authenticode has one")
    signer = _inside(der, signers[0], _SEQUENCE)
    attributes = signer[3]
    message_digest = b""
    for attribute in _inside(der, attributes, _EXPLICIT0):
        attribute_type, values = _inside(der, attribute, _SEQUENCE)
        if _value(der, attribute_type, _OID) == _MESSAGE_DIGEST:
            message_digest = _value(der, _inside(der, values, _SET)[0], _OCTETS)
    return _SignedData(
        _algorithm(der, digest_algorithm),
        _value(der, digest, _OCTETS),
        der[content.start : content.end],
        tuple(der[c.header : c.end] for c in certificates),
        _algorithm(der, signer[2]),
        message_digest,
        bytes([_SET]) + der[attributes.header + 1 : attributes.end],
        _value(der, signer[5], _OCTETS),
    )


def _signatures(image: bytes) -> list[bytes]:
    """The PKCS#7 SignedData of each WIN_CERTIFICATE in the image's certificate table (8-byte aligned)."""
    table, found, position = pecoff.certificate_table(image), [], 0
    while position + 8 <= len(table):
        length, _revision, kind = struct.unpack_from("<IHH", table, position)
        if length < 8 or position + length > len(table):
            break
        if kind == _PKCS_SIGNED_DATA:
            found.append(table[position + 8 : position + length])
        position += (length + 7) & ~7
    return found


def _chains_to(certificate: bytes, carried: tuple[bytes, ...], authorities: list[bytes]) -> bool:
    for _ in range(_CHAIN_DEPTH):
        if certificate in authorities or any(libcrypto.certificate_signed_by(certificate, a) for a in authorities):
            return True
        issuer = next(
            (c for c in carried if c != certificate and libcrypto.certificate_signed_by(certificate, c)), None
        )
        if issuer is None:
            return False
        certificate = issuer
    return False


def _problem(image: bytes, digests: _Digests, der: bytes, authorities: list[bytes]) -> tuple[Reason, str] | None:
    try:
        signed = _signed_data(der)
    except (ValueError, IndexError) as error:
        return Reason.BAD_SIGNATURE, f"its signature cannot be read ({error})"
    if digests.of(signed.image_algorithm) != signed.image_digest:
        return Reason.BAD_SIGNATURE, "it was changed after it was signed (its Authenticode hash is not the signed one)"
    if hashlib.new(signed.attribute_algorithm, signed.content).digest() != signed.message_digest:
        return Reason.BAD_SIGNATURE, "its signature does not cover the hash it carries"
    signer = next(
        (
            c
            for c in signed.certificates
            if libcrypto.signature_valid(c, signed.signature, signed.attributes, signed.attribute_algorithm)
        ),
        None,
    )
    if signer is None:
        return Reason.BAD_SIGNATURE, "its signature does not verify with any certificate it carries"
    if not _chains_to(signer, signed.certificates, authorities):
        return Reason.OTHER_AUTHORITY, "it is not signed under an authority the booted log shows (PCR 7)"
    return None


class _Digests:
    """The image's Authenticode hashes: those the caller already has, the others computed once."""

    def __init__(self, image: bytes, known: Mapping[str, bytes]) -> None:
        self.image, self.known = image, dict(known)

    def of(self, algorithm: str) -> bytes:
        if algorithm not in self.known:
            self.known[algorithm] = authenticode.digest(self.image, algorithm)
        return self.known[algorithm]


def problem(
    image: bytes,
    authorities: list[bytes],
    forbidden: frozenset[bytes] = frozenset(),
    digests: Mapping[str, bytes] | None = None,
) -> tuple[Reason, str] | None:
    """None when one of the image's signatures verifies under one of `authorities` (DER certificates)
    and its SHA-256 Authenticode hash is not `forbidden` (dbx), else why not. `digests` are Authenticode
    hashes of the image the caller already computed (bank -> digest). PEFormatError when the image is
    not PE/COFF."""
    known = _Digests(image, digests or {})
    if known.of("sha256") in forbidden:
        return Reason.REVOKED, "its hash is in the Secure Boot forbidden database (dbx)"
    signatures = _signatures(image)
    if not signatures:
        return Reason.OTHER_AUTHORITY, "it is not signed"
    problems = [_problem(image, known, der, authorities) for der in signatures]
    return None if None in problems else problems[0]


def sbat_problem(image: bytes, level: str) -> str | None:
    """Why shim's SBAT check refuses the image under SbatLevel `level`, or None. An image without a .sbat
    section passes: shim requires one only of what it loads itself, not of what GRUB asks it to verify."""
    section = pecoff.section_data(image, ".sbat")
    if section is None:
        return None
    revoked = {}
    for line in level.splitlines():
        fields = line.split(",")
        if len(fields) >= 2 and fields[1].strip().isascii() and fields[1].strip().isdigit():
            revoked[fields[0]] = int(fields[1])
    for line in section.rstrip(b"\0").decode("utf-8", "replace").splitlines():
        if not line:
            continue
        fields = line.split(",")
        if len(fields) < 2 or not (fields[1].isascii() and fields[1].isdigit()):
            return f"its .sbat line {line[:60]!r} cannot be read"
        if fields[0] in revoked and int(fields[1]) < revoked[fields[0]]:
            return f"SbatLevel revokes {fields[0]} generation {fields[1]} (it requires {revoked[fields[0]]})"
    return None
