"""An independent implementation of the TPM 2.0 duplication format, for checking luks_tpm.duplication.

Everything cryptographic here is pyca's `cryptography` (ECDH, the SP 800-56A concatenation KDF for
KDFe, the SP 800-108 counter-mode KBKDF for KDFa, AES-CFB, HMAC), and the structures are marshalled by
hand from TPM 2.0 Part 2, not by the code under test. Both directions: `wrap` builds a blob as the
build host must, `unwrap` opens one as TPM2_Import does (given the parent's private key, which a test
SRK has and a real one never gives out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

SHA256_ALG = struct.pack(">H", 0x000B)
CURVE = ec.SECP256R1()


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa(SHA-256): SP 800-108 HMAC counter mode, [i]32 first, then label || 00 || context || [L]32."""
    return KBKDFHMAC(
        algorithm=hashes.SHA256(),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context_u + context_v,
        fixed=None,
    ).derive(key)


def kdfe(z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe(SHA-256): the SP 800-56A one-step KDF with OtherInfo = label || 00 || partyUInfo || partyVInfo."""
    return ConcatKDFHash(hashes.SHA256(), bits // 8, label + b"\0" + party_u + party_v).derive(z)


def private_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(scalar, "big"), CURVE)


def point_of(key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    numbers = key.public_key().public_numbers()
    return numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")


def exchange(scalar: bytes, point: tuple[bytes, bytes]) -> bytes:
    """ECDH: the x coordinate of scalar·point."""
    peer = ec.EllipticCurvePublicNumbers(int.from_bytes(point[0], "big"), int.from_bytes(point[1], "big"), CURVE)
    return private_key(scalar).exchange(ec.ECDH(), peer.public_key())


def srk_public(x: bytes, y: bytes) -> bytes:
    """The standard ECC P-256 SRK's TPM2B_PUBLIC (docs/sealing.md's table) with this point as unique."""
    area = bytes.fromhex("0023000b000304720000000600800043001000030010") + tpm2b(x) + tpm2b(y)
    return tpm2b(area)


def name_of(tpm2b_public: bytes) -> bytes:
    return SHA256_ALG + hashlib.sha256(tpm2b_public[2:]).digest()


def sealed_public(policy: bytes, unique: bytes, *, pin: bool) -> bytes:
    attributes = 0x00000000 if pin else 0x00000400  # noDA unless a PIN; no fixedTPM/fixedParent
    area = struct.pack(">HHI", 0x0008, 0x000B, attributes) + tpm2b(policy) + struct.pack(">H", 0x0010) + tpm2b(unique)
    return tpm2b(area)


def sensitive(key: bytes, pin: bytes, seed_value: bytes) -> bytes:
    area = struct.pack(">H", 0x0008) + tpm2b(pin) + tpm2b(seed_value) + tpm2b(key)
    return tpm2b(area)


def _cfb(key: bytes, data: bytes, *, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(key), CFB(bytes(16)))
    context = cipher.encryptor() if encrypt else cipher.decryptor()
    return context.update(data) + context.finalize()


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = crypto_hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


@dataclasses.dataclass(frozen=True)
class Wrapped:
    z: bytes
    seed: bytes
    sym_key: bytes
    hmac_key: bytes
    public: bytes
    duplicate: bytes
    in_sym_seed: bytes
    name: bytes


def wrap_area(srk_point: tuple[bytes, bytes], ephemeral: bytes, public: bytes, sensitive_area: bytes) -> Wrapped:
    """Any object's duplication blob for the parent with public point `srk_point` (SHA-256, AES-128)."""
    srk_key = ec.EllipticCurvePublicNumbers(
        int.from_bytes(srk_point[0], "big"), int.from_bytes(srk_point[1], "big"), CURVE
    ).public_key()
    eph = private_key(ephemeral)
    eph_x, eph_y = point_of(eph)
    z = eph.exchange(ec.ECDH(), srk_key)
    seed = kdfe(z, b"DUPLICATE", eph_x, srk_point[0], 256)
    name = name_of(public)
    sym_key = kdfa(seed, b"STORAGE", name, b"", 128)
    hmac_key = kdfa(seed, b"INTEGRITY", b"", b"", 256)
    encrypted = _cfb(sym_key, sensitive_area, encrypt=True)
    duplicate = tpm2b(tpm2b(_hmac(hmac_key, encrypted + name)) + encrypted)
    return Wrapped(z, seed, sym_key, hmac_key, public, duplicate, tpm2b(tpm2b(eph_x) + tpm2b(eph_y)), name)


def wrap(
    srk_point: tuple[bytes, bytes], ephemeral: bytes, key: bytes, policy: bytes, pin: bytes, seed_value: bytes
) -> Wrapped:
    """The sealed object's blob and its intermediates for fixed inputs, as TPM 2.0 Part 1 describes them."""
    public = sealed_public(policy, hashlib.sha256(seed_value + key).digest(), pin=bool(pin))
    return wrap_area(srk_point, ephemeral, public, sensitive(key, pin, seed_value))


def storage_key(scalar: bytes, seed_value: bytes) -> tuple[bytes, bytes]:
    """(TPM2B_PUBLIC, TPM2B_SENSITIVE) of the standard SRK's shape with a known private key and fixedTPM and
    fixedParent clear, which TPM2_Import accepts: a parent under which the fixed vectors can be imported."""
    x, y = point_of(private_key(scalar))
    public = srk_public(x, y)
    public = public[:6] + struct.pack(">I", 0x00030472 & ~0x12) + public[10:]
    return public, tpm2b(struct.pack(">H", 0x0023) + tpm2b(b"") + tpm2b(seed_value) + tpm2b(scalar))


@dataclasses.dataclass(frozen=True)
class Opened:
    auth: bytes
    seed_value: bytes
    data: bytes


def unwrap(srk_private: bytes, public: bytes, duplicate: bytes, in_sym_seed: bytes) -> Opened:
    """What TPM2_Import does with the blob (symmetricAlg NULL): ValueError where the TPM returns an error."""
    srk = private_key(srk_private)
    point = in_sym_seed[2:]
    ex, ey = point[2:34], point[36:68]
    if point[:2] != b"\x00\x20" or point[34:36] != b"\x00\x20" or len(point) != 68:
        raise ValueError("inSymSeed is not a P-256 TPMS_ECC_POINT")
    peer = ec.EllipticCurvePublicNumbers(int.from_bytes(ex, "big"), int.from_bytes(ey, "big"), CURVE).public_key()
    z = srk.exchange(ec.ECDH(), peer)
    seed = kdfe(z, b"DUPLICATE", ex, point_of(srk)[0], 256)
    name = name_of(public)
    body = duplicate[2:]
    integrity, encrypted = body[2:34], body[34:]
    if body[:2] != b"\x00\x20" or integrity != _hmac(kdfa(seed, b"INTEGRITY", b"", b"", 256), encrypted + name):
        raise ValueError("integrity")
    plain = _cfb(kdfa(seed, b"STORAGE", name, b"", 128), encrypted, encrypt=False)
    size, kind = struct.unpack(">HH", plain[:4])
    if size != len(plain) - 2 or kind != 0x0008:
        raise ValueError("not a keyed-hash TPMT_SENSITIVE")
    fields, offset = [], 4
    for _ in range(3):
        (length,) = struct.unpack(">H", plain[offset : offset + 2])
        fields.append(plain[offset + 2 : offset + 2 + length])
        offset += 2 + length
    if offset != len(plain):
        raise ValueError("trailing bytes in the sensitive area")
    auth, seed_value, data = fields
    if public[-32:] != hashlib.sha256(seed_value + data).digest():
        raise ValueError("binding: unique is not H(seedValue || data)")
    return Opened(auth, seed_value, data)
