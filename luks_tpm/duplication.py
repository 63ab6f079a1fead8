"""Sealing a volume key for a TPM that is not here: the TPM 2.0 duplication format that TPM2_Import takes.

From nothing but the target TPM's standard ECC P-256 SRK public area, this builds a sealed-data
object (KEYEDHASH, the volume key as its data, the token's policy, an optional PIN as its auth value)
wrapped so that only that SRK's private key opens it:

    TPM2_Import(parent = SRK, encryptionKey = empty, objectPublic = public, duplicate, inSymSeed = seed,
                symmetricAlg = TPM_ALG_NULL) -> outPrivate;  TPM2_Load(SRK, outPrivate, public)

and the loaded object unseals in a policy session like any sealed token (docs/policy.md). The format
(TPM 2.0 Part 1, "Protected Storage" and "Duplication"; Annex C.6 for ECC secret sharing; KDFa and
KDFe in "Key Derivation Functions"), as libtpms implements it (Import.c, Object_spt.c, CryptUtil.c):

    Z         = x coordinate of e·Q_srk for an ephemeral P-256 key e             (32 bytes)
    seed      = KDFe(SHA-256, Z, "DUPLICATE", x(e·G), x(Q_srk), 256)            (32 bytes)
    inSymSeed = TPM2B( TPMS_ECC_POINT e·G )                                    (2 + 68 bytes)
    symKey    = KDFa(SHA-256, seed, "STORAGE", name, "", 128)                   (AES-128: the SRK's)
    hmacKey   = KDFa(SHA-256, seed, "INTEGRITY", "", "", 256)                   (the SRK's nameAlg)
    encrypted = AES-128-CFB(symKey, IV = 0, TPM2B_SENSITIVE)
    duplicate = TPM2B( TPM2B(HMAC-SHA256(hmacKey, encrypted || name)) || encrypted )

No inner wrapper (symmetricAlg NULL), so the object's attributes must leave encryptedDuplication
clear, and TPM2_Import refuses fixedTPM or fixedParent. Once imported, the object cannot be duplicated
again under luks-tpm's policies (TPM2_Duplicate's DUP role needs PolicyCommandCode in the policy).

The blob itself, though, is only as safe as its parent's USER authorization: TPM2_Rewrap(oldParent =
the parent, newParent = TPM_RH_NULL) turns it into the plain sensitive area with no regard for the
object's policy, and the standard SRK's USER role is open to anyone (empty auth, userWithAuth). So a
blob wrapped to the standard SRK gives its key to anyone who can read it and talk to the target TPM;
tests/test_duplication_tpm.py proves both this and the fix luks-tpm uses: blobs are wrapped to the
import parent (tpm.importparent, docs/sealing.md), usable only through PolicyCommandCode(Import or Load).
`parse_import_parent` checks a provisioning file's import parent; the wrap works for any ECC P-256 storage
key with nameAlg SHA-256 and AES-128-CFB.

Key material (the volume key, the PIN, seedValue, Z, seed, symKey, hmacKey, the plain sensitive area)
lives only in `Secret`s (its hashes and MACs computed by libcrypto into them). Nothing here talks to a TPM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

from . import aes, libcrypto
from .ecdh import COORDINATE_SIZE, EphemeralKey, Point, is_on_curve
from .errors import Cause, ExitCode, LuksTpmError
from .model import IMPORT_PARENT_ATTRIBUTES, IMPORT_PARENT_POLICY
from .secret import Secret

# TPM 2.0 Part 2 constants.
ALG_ECC, ALG_KEYEDHASH, ALG_SHA256, ALG_AES, ALG_CFB, ALG_NULL = 0x0023, 0x0008, 0x000B, 0x0006, 0x0043, 0x0010
ECC_NIST_P256 = 0x0003
NODA = 0x00000400
# The standard SRK (docs/sealing.md): fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | noDA |
# restricted | decrypt.
SRK_ATTRIBUTES = 0x00030472
DIGEST_SIZE = 32  # SHA-256: the SRK's and the sealed object's nameAlg
SYM_KEY_BITS = 128  # the standard SRK's symmetric algorithm: AES-128 (CFB)
MAX_DATA = 128  # TPM 2.0 Part 2, MAX_SYM_DATA: the most a sealed data object holds
MAX_PIN = DIGEST_SIZE  # an auth value is at most the size of the object's nameAlg digest

# Labels: the TPM uses them with their terminating NUL (libtpms Global.h TPM2B_STRING); the KDFs below
# add that one zero byte.
DUPLICATE, STORAGE, INTEGRITY = b"DUPLICATE", b"STORAGE", b"INTEGRITY"


@dataclasses.dataclass(frozen=True)
class SrkPublic:
    """The parent a blob is wrapped to, as its public area tells: the bytes, its TPM name, its public point.
    `parse_srk_public` makes one only for the standard SRK; the wrap itself works for any ECC P-256 storage
    key with nameAlg SHA-256 and AES-128-CFB (such as the policy-only import parent the tests propose)."""

    public: bytes  # the marshalled TPM2B_PUBLIC
    name: bytes  # 000b || SHA-256(TPMT_PUBLIC): what tokens record as parent.name
    point: Point


@dataclasses.dataclass(frozen=True)
class ImportBlob:
    """TPM2_Import's inputs besides the parent, each in its marshalled TPM2B form; nothing here is secret."""

    public: bytes  # TPM2B_PUBLIC: the sealed object's public area (objectPublic)
    duplicate: bytes  # TPM2B_PRIVATE: outer HMAC and the encrypted sensitive area
    seed: bytes  # TPM2B_ENCRYPTED_SECRET: the ephemeral point (inSymSeed)
    name: bytes  # the sealed object's TPM name


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def tpm_name(tpmt_public: bytes) -> bytes:
    """An object's name: its nameAlg (SHA-256) followed by the digest of its marshalled TPMT_PUBLIC."""
    return struct.pack(">H", ALG_SHA256) + hashlib.sha256(tpmt_public).digest()


# ---- the target's SRK ------------------------------------------------------------------------------


def _bad_parent(what: str, why: str) -> LuksTpmError:
    # The public area is what the operator handed us (the target's provisioning file): a wrong one is a
    # usage error, like a bad option value, not a damaged disk or an absent TPM.
    return LuksTpmError(
        f"not the target TPM's {what}: {why}",
        hint="export it on the target with `luks-tpm srk-public` and give that file unchanged",
        code=ExitCode.USAGE,
        cause=Cause.USAGE,
    )


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ValueError("the public area is truncated")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def tpm2b(self) -> bytes:
        return self.take(self.uint(2))


# What a parent's public area holds besides its attributes, policy and point: (field, size in bytes, value).
_STORAGE_FIELDS = (
    ("symmetric algorithm", 2, ALG_AES),
    ("symmetric key bits", 2, SYM_KEY_BITS),
    ("symmetric mode", 2, ALG_CFB),
    ("scheme", 2, ALG_NULL),
    ("curveID", 2, ECC_NIST_P256),
    ("kdf", 2, ALG_NULL),
)


def parse_parent_public(public: bytes, *, what: str, attributes: int, policy: bytes) -> SrkPublic:
    """Check that `public` (a marshalled TPM2B_PUBLIC) is an ECC P-256 storage key with these attributes
    and authPolicy and a point on the curve; LuksTpmError (exit code USAGE) naming the first field that
    is not."""
    reader = _Reader(public)
    try:
        if reader.uint(2) != len(public) - 2:
            raise ValueError("the size field does not match the data")
        fields = (("type", 2, ALG_ECC), ("nameAlg", 2, ALG_SHA256), ("objectAttributes", 4, attributes))
        for field, size, expected in fields:
            _expect(reader.uint(size), field, size, expected)
        if reader.tpm2b() != policy:
            raise ValueError("its authPolicy is not the expected one")
        for field, size, expected in _STORAGE_FIELDS:
            _expect(reader.uint(size), field, size, expected)
        point = Point(reader.tpm2b(), reader.tpm2b())
        if reader.offset != len(public):
            raise ValueError("trailing bytes after the public area")
    except ValueError as error:
        raise _bad_parent(what, str(error)) from None
    if len(point.x) != COORDINATE_SIZE or len(point.y) != COORDINATE_SIZE:
        raise _bad_parent(what, "its public point does not have 32-byte coordinates")
    if not is_on_curve(point):
        raise _bad_parent(what, "its public point is not on the P-256 curve")
    return SrkPublic(public, tpm_name(public[2:]), point)


def _expect(value: int, field: str, size: int, expected: int) -> None:
    if value != expected:
        raise ValueError(f"{field} is {value:#0{2 * size + 2}x}, expected {expected:#0{2 * size + 2}x}")


def parse_srk_public(public: bytes) -> SrkPublic:
    """The standard SRK (what a blob must NOT be wrapped to in production: module docstring)."""
    return parse_parent_public(public, what="standard SRK", attributes=SRK_ATTRIBUTES, policy=b"")


def parse_import_parent(public: bytes) -> SrkPublic:
    """The import parent (templates.import_parent): what `enroll --for-tpm` wraps to."""
    return parse_parent_public(
        public, what="import parent", attributes=IMPORT_PARENT_ATTRIBUTES, policy=IMPORT_PARENT_POLICY
    )


# ---- key derivation (TPM 2.0 Part 1, "Key Derivation Functions") ------------------------------------


def kdfa(key: Secret, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> Secret:
    """KDFa with HMAC-SHA-256 (SP 800-108 counter mode): K(i) = HMAC(key, [i]32 || label || 00 ||
    contextU || contextV || [bits]32), concatenated and cut to `bits`."""
    if bits <= 0 or bits % 8:
        raise ValueError("KDFa here makes whole bytes")
    out = Secret(bits // 8)
    with Secret(DIGEST_SIZE) as block:
        for counter, offset in enumerate(range(0, len(out), DIGEST_SIZE), start=1):
            message = bytearray(struct.pack(">I", counter) + label + b"\0" + context_u + context_v)
            message += struct.pack(">I", bits)
            libcrypto.hmac_sha256(key.view(), memoryview(message), block.view())
            size = min(DIGEST_SIZE, len(out) - offset)
            out.view()[offset : offset + size] = block.view()[:size]
    return out


def kdfe(z: Secret, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> Secret:
    """KDFe with SHA-256 (SP 800-56A concatenation KDF): H([i]32 || Z || label || 00 || partyUInfo ||
    partyVInfo), concatenated and cut to `bits`."""
    if bits <= 0 or bits % 8:
        raise ValueError("KDFe here makes whole bytes")
    out = Secret(bits // 8)
    other = label + b"\0" + party_u + party_v
    with Secret(4 + len(z) + len(other)) as message, Secret(DIGEST_SIZE) as block:
        view = message.view()
        view[4 : 4 + len(z)] = z.view()
        view[4 + len(z) :] = other
        for counter, offset in enumerate(range(0, len(out), DIGEST_SIZE), start=1):
            view[:4] = struct.pack(">I", counter)
            libcrypto.sha256(view, block.view())
            size = min(DIGEST_SIZE, len(out) - offset)
            out.view()[offset : offset + size] = block.view()[:size]
    return out


# ---- the sealed object ------------------------------------------------------------------------------


def _check_inputs(key: Secret, policy: bytes, pin: Secret | None) -> None:
    if len(policy) != DIGEST_SIZE:
        raise ValueError("the policy is a SHA-256 digest (32 zero bytes for the empty policy)")
    if len(key) > MAX_DATA:
        raise LuksTpmError("the volume key is too large to seal", code=ExitCode.UNSUPPORTED, cause=Cause.UNSUPPORTED)
    if pin is not None and len(pin) > MAX_PIN:
        raise LuksTpmError(f"the PIN is too long: at most {MAX_PIN} bytes", code=ExitCode.USAGE, cause=Cause.USAGE)


def sealed_public(policy: bytes, unique: bytes, *, pin: bool) -> bytes:
    """The sealed object's TPMT_PUBLIC: KEYEDHASH, nameAlg SHA-256, scheme NULL, `unique` the TPM's
    H(seedValue || data). Attributes: noDA unless a PIN, nothing else; in particular no fixedTPM or
    fixedParent (TPM2_Import refuses them), no userWithAuth (only a policy session unseals), no
    encryptedDuplication (there is no inner wrapper), no sensitiveDataOrigin (the data is ours)."""
    attributes = 0 if pin else NODA
    return (
        struct.pack(">HHI", ALG_KEYEDHASH, ALG_SHA256, attributes)
        + _tpm2b(policy)
        + struct.pack(">H", ALG_NULL)  # TPMT_KEYEDHASH_SCHEME: NULL, no details
        + _tpm2b(unique)
    )


def sealed_unique(seed_value: Secret, key: Secret) -> bytes:
    """The TPM's binding of a keyed-hash object's public and sensitive parts (CryptComputeSymmetricUnique
    for a non-parent): SHA-256(seedValue || data). Public; seedValue keeps it from revealing the key."""
    digest = hashlib.sha256(seed_value.view())
    digest.update(key.view())
    return digest.digest()


def sensitive_area(key: Secret, pin: Secret | None, seed_value: Secret) -> Secret:
    """TPM2B_SENSITIVE: size || TPMT_SENSITIVE { sensitiveType KEYEDHASH, authValue (the PIN or empty),
    seedValue, sensitive.bits (the volume key) }, written straight into a Secret."""
    pin_size = len(pin) if pin is not None else 0
    inner = 2 + (2 + pin_size) + (2 + len(seed_value)) + (2 + len(key))
    chunks: list[bytes | memoryview] = [struct.pack(">HH", inner, ALG_KEYEDHASH)]
    for part in (pin, seed_value, key):
        chunks.append(struct.pack(">H", len(part) if part is not None else 0))
        if part is not None:
            chunks.append(part.view())
    area = Secret(2 + inner)
    view, offset = area.view(), 0
    for chunk in chunks:
        view[offset : offset + len(chunk)] = chunk
        offset += len(chunk)
    return area


# ---- the outer wrapper ------------------------------------------------------------------------------


def ecc_point(point: Point) -> bytes:
    """TPMS_ECC_POINT: TPM2B x || TPM2B y."""
    return _tpm2b(point.x) + _tpm2b(point.y)


def outer_wrap(seed: Secret, name: bytes, sensitive: Secret) -> bytes:
    """The TPM2B_PRIVATE duplicate: integrity HMAC then the sensitive area encrypted under the seed.
    `sensitive` is encrypted in place (it holds ciphertext afterwards)."""
    with kdfa(seed, STORAGE, name, b"", SYM_KEY_BITS) as sym_key:
        aes.cfb_encrypt(sym_key, sensitive)
    encrypted = bytes(sensitive.view())
    integrity = bytearray(DIGEST_SIZE)  # a MAC of ciphertext: not secret
    with kdfa(seed, INTEGRITY, b"", b"", 8 * DIGEST_SIZE) as hmac_key:
        libcrypto.hmac_sha256(hmac_key.view(), memoryview(bytearray(encrypted + name)), memoryview(integrity))
    return _tpm2b(_tpm2b(bytes(integrity)) + encrypted)


def wrap_for_import(
    srk: SrkPublic,
    key: Secret,
    policy: bytes,
    pin: Secret | None,
    *,
    ephemeral: EphemeralKey,
    seed_value: Secret,
) -> ImportBlob:
    """The deterministic core: the blob for fixed ephemeral key and seedValue (test vectors use it;
    `seal_for_import` draws both at random). `policy` is the token's policy digest."""
    _check_inputs(key, policy, pin)
    if len(seed_value) != DIGEST_SIZE:
        raise ValueError("seedValue is as long as the nameAlg digest (the TPM refuses any other size)")
    public = sealed_public(policy, sealed_unique(seed_value, key), pin=pin is not None)
    name = tpm_name(public)
    with ephemeral.shared_x(srk.point) as z:
        seed = kdfe(z, DUPLICATE, ephemeral.public.x, srk.point.x, 8 * DIGEST_SIZE)
    with seed, sensitive_area(key, pin, seed_value) as sensitive:
        duplicate = outer_wrap(seed, name, sensitive)
    return ImportBlob(_tpm2b(public), duplicate, _tpm2b(ecc_point(ephemeral.public)), name)


def seal_for_import(parent: SrkPublic, key: Secret, policy: bytes, pin: Secret | None = None) -> ImportBlob:
    """Seal `key` for the TPM whose parent (parse_import_parent) is `parent`, under the policy digest
    `policy` (docs/policy.md) and an optional PIN: a fresh ephemeral key and seedValue."""
    with EphemeralKey() as ephemeral, Secret(DIGEST_SIZE) as seed_value:
        libcrypto.call("RAND_priv_bytes", seed_value.as_ctypes(), len(seed_value))  # straight into the Secret
        return wrap_for_import(parent, key, policy, pin, ephemeral=ephemeral, seed_value=seed_value)
