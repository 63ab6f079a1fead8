"""Plain values shared by every layer: PCR banks, the SRK a binding uses, sealed blobs, and policies
(docs/policy.md, a contract: their digests are computed here in software, exactly as the TPM does).

Nothing here imports a C binding, so policies can be computed without a TPM stack.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct

PCR_COUNT = 24
FENCE_PCR = 15  # docs/policy.md: fenced tokens require sha256 PCR 15 to be all zeros
FENCE_MESSAGE = b"luks-tpm fence v1"  # what `luks-tpm fence` extends PCR 15 with (hashed per bank)
PERSISTENT_FIRST, PERSISTENT_LAST = 0x81000000, 0x81FFFFFF


class Bank(enum.StrEnum):
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA384 = "sha384"

    @property
    def algorithm(self) -> int:
        """The TPM_ALG_ID of the bank's hash."""
        return {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C}[self.value]

    @property
    def size(self) -> int:
        return hashlib.new(self.value).digest_size

    def hash(self, data: bytes) -> bytes:
        return hashlib.new(self.value, data).digest()


FENCE_BANK = Bank.SHA256


class Mode(enum.StrEnum):
    DERIVED = "derived"
    SEALED = "sealed"


@dataclasses.dataclass(frozen=True)
class Parent:
    """The SRK that salts sessions and parents sealed objects; its name pins the TPM and owner seed."""

    handle: int | None  # persistent handle, or None when created transiently from the template
    name: bytes


@dataclasses.dataclass(frozen=True)
class SealedBlob:
    public: bytes  # a marshalled TPM2B_PUBLIC
    private: bytes  # a marshalled TPM2B_PRIVATE


@dataclasses.dataclass(frozen=True)
class ImportedSeal:
    """A sealed object made for a TPM that was not there (docs/sealing.md): TPM2_Import's inputs, which only
    that TPM's import parent can turn into a loadable private area."""

    public: bytes  # a marshalled TPM2B_PUBLIC: the sealed object's public area
    duplicate: bytes  # a marshalled TPM2B_PRIVATE: the outer-wrapped sensitive area
    seed: bytes  # a marshalled TPM2B_ENCRYPTED_SECRET: the ephemeral ECDH point


@dataclasses.dataclass(frozen=True)
class Approver:
    """The key whose signatures approve PCR states of the boot chain (docs/policy.md): an ECC P-256 signing
    key of this TPM, its private part kept by the running system (luks_tpm.approver)."""

    public: bytes  # a marshalled TPM2B_PUBLIC
    name: bytes  # its TPM name: nameAlg (SHA-256) and the hash of the public area

    @staticmethod
    def name_of(public: bytes) -> bytes:
        return bytes.fromhex("000b") + hashlib.sha256(public[2:]).digest()


@dataclasses.dataclass(frozen=True)
class Approval:
    """One approved state: PCR values of a token's bank and PCRs, and the approver's signature."""

    values: dict[int, bytes]
    signature: bytes  # a marshalled TPMT_SIGNATURE (ECDSA, SHA-256) over approval_digest(approved policy)


@dataclasses.dataclass(frozen=True)
class ApprovedState:
    """The approval a policy session is to be authorized with."""

    approver: Approver
    approval: Approval


@dataclasses.dataclass(frozen=True)
class PcrPolicy:
    """What a binding's policy requires (docs/policy.md): PCR values of one bank, or any state of them that
    an approver signed; the fence; a PIN."""

    bank: Bank
    pcrs: tuple[int, ...]
    values: dict[int, bytes]  # the expected value of each PCR in `pcrs` (with an approver: the approved state used)
    pin: bool = False
    fence: bool = False
    approver: bytes | None = None  # the name of the key whose signatures approve PCR states (PolicyAuthorize)

    @property
    def pcr_digest(self) -> bytes:
        """PolicyPCR's pcrDigest: hashed with the policy session's algorithm (SHA-256), whatever the bank."""
        return hashlib.sha256(b"".join(self.values[index] for index in self.pcrs)).digest()

    @property
    def empty(self) -> bool:
        return not (self.pcrs or self.pin or self.fence or self.approver)

    def approved_digest(self) -> bytes:
        """The digest of PolicyPCR over `values` alone: what an approver signs (the approved policy)."""
        return _policy_pcr(bytes(32), self)

    def digest(self) -> bytes:
        """The policy digest, computed in software: what the TPM's trial session gives. It tells a token
        whose fields disagree with its `policy` (a damaged token) without a TPM."""
        if self.approver is not None:
            digest = _extend(bytes(32), _CC_POLICY_AUTHORIZE, self.approver)
            digest = hashlib.sha256(digest + APPROVAL_REF).digest()
        else:
            digest = _policy_pcr(bytes(32), self) if self.pcrs else bytes(32)
        if self.fence:
            digest = _policy_pcr(digest, FENCE_DOWN)
        if self.pin:
            digest = _extend(digest, _CC_POLICY_AUTH_VALUE, b"")
        return digest


def approval_digest(approved: bytes) -> bytes:
    """aHash: what an approver's key signs to approve the policy `approved` (TPM 2.0 Part 3, PolicyAuthorize)."""
    return hashlib.sha256(approved + APPROVAL_REF).digest()


def _extend(digest: bytes, command: int, data: bytes) -> bytes:
    return hashlib.sha256(digest + struct.pack(">I", command) + data).digest()


def _policy_pcr(digest: bytes, part: PcrPolicy) -> bytes:
    bitmap = bytearray(3)
    for index in part.pcrs:
        bitmap[index // 8] |= 1 << (index % 8)
    selection = struct.pack(">IHB", 1, part.bank.algorithm, len(bitmap)) + bytes(bitmap)
    return _extend(digest, _CC_POLICY_PCR, selection + part.pcr_digest)


# TPM_CC values (Part 2)
_CC_POLICY_PCR, _CC_POLICY_AUTH_VALUE, _CC_POLICY_AUTHORIZE = 0x0000017F, 0x0000016B, 0x0000016A
APPROVAL_REF = b"luks-tpm approved boot state v1"  # PolicyAuthorize's policyRef (docs/policy.md)
FENCE_DOWN = PcrPolicy(FENCE_BANK, (FENCE_PCR,), {FENCE_PCR: bytes(FENCE_BANK.size)})  # fenced: PCR 15 = zeros


# The import parent (docs/sealing.md, a contract): the standard SRK's attributes with userWithAuth
# cleared and adminWithPolicy set (fixedTPM | fixedParent | sensitiveDataOrigin | adminWithPolicy | noDA |
# restricted | decrypt), usable only through PolicyOR(PolicyCommandCode(Import), PolicyCommandCode(Load)).
_CC_POLICY_COMMAND_CODE, _CC_POLICY_OR, _CC_IMPORT, _CC_LOAD = 0x0000016C, 0x00000171, 0x00000156, 0x00000157
IMPORT_PARENT_ATTRIBUTES = 0x000304B2
IMPORT_PARENT_BRANCHES = tuple(
    _extend(bytes(32), _CC_POLICY_COMMAND_CODE, struct.pack(">I", code)) for code in (_CC_IMPORT, _CC_LOAD)
)
IMPORT_PARENT_POLICY = _extend(bytes(32), _CC_POLICY_OR, b"".join(IMPORT_PARENT_BRANCHES))
