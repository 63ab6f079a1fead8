"""The public areas luks-tpm asks the TPM to create keys from. The derived primary's is a contract
(docs/derivation.md): its bytes decide the HMAC key, so they must never change; so is the import
parent's (docs/sealing.md): its bytes decide the key that tokens sealed for this TPM elsewhere are
wrapped to. The SRK and EK are the
TCG's standard ECC P-256 templates, which other tools create too. tests/test_templates.py checks each
against tpm2-pytss's own template builders, byte for byte.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..model import IMPORT_PARENT_ATTRIBUTES, IMPORT_PARENT_POLICY
from .esys import ffi, lib

DERIVED_PRIMARY_UNIQUE = hashlib.sha256(b"luks-tpm derived primary v1").digest()

_STORAGE_KEY = (
    lib.TPMA_OBJECT_FIXEDTPM
    | lib.TPMA_OBJECT_FIXEDPARENT
    | lib.TPMA_OBJECT_SENSITIVEDATAORIGIN
    | lib.TPMA_OBJECT_RESTRICTED
    | lib.TPMA_OBJECT_DECRYPT
)
SRK_ATTRIBUTES = _STORAGE_KEY | lib.TPMA_OBJECT_USERWITHAUTH | lib.TPMA_OBJECT_NODA
# TCG EK Credential Profile 2.5, template L-2: the EK is usable only through PolicySecret(endorsement).
_EK_ATTRIBUTES = _STORAGE_KEY | lib.TPMA_OBJECT_ADMINWITHPOLICY
_EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")


def _fill(target: Any, data: bytes) -> None:
    target.size = len(data)
    ffi.memmove(target.buffer, data, len(data))


def _public(kind: int, attributes: int, policy: bytes) -> Any:
    template = ffi.new("TPM2B_PUBLIC *")
    area = template.publicArea
    area.type, area.nameAlg, area.objectAttributes = kind, lib.TPM2_ALG_SHA256, attributes
    _fill(area.authPolicy, policy)
    return template


def _ecc_p256_storage(attributes: int, policy: bytes, unique_size: int) -> Any:
    template = _public(lib.TPM2_ALG_ECC, attributes, policy)
    area = template.publicArea
    detail = area.parameters.eccDetail
    detail.symmetric.algorithm = lib.TPM2_ALG_AES
    detail.symmetric.keyBits.aes = 128
    detail.symmetric.mode.aes = lib.TPM2_ALG_CFB
    detail.scheme.scheme = lib.TPM2_ALG_NULL
    detail.curveID = lib.TPM2_ECC_NIST_P256
    detail.kdf.scheme = lib.TPM2_ALG_NULL
    area.unique.ecc.x.size = area.unique.ecc.y.size = unique_size
    return template


def derived_primary(policy: bytes) -> Any:
    """docs/derivation.md (contract): the keyed-hash primary whose HMAC key is re-created from the owner
    seed. Bound to PCRs or the fence, it carries that policy and no userWithAuth."""
    attributes = (
        lib.TPMA_OBJECT_FIXEDTPM
        | lib.TPMA_OBJECT_FIXEDPARENT
        | lib.TPMA_OBJECT_SENSITIVEDATAORIGIN
        | lib.TPMA_OBJECT_SIGN_ENCRYPT
        | lib.TPMA_OBJECT_NODA
    )
    if not policy:
        attributes |= lib.TPMA_OBJECT_USERWITHAUTH
    template = _public(lib.TPM2_ALG_KEYEDHASH, attributes, policy)
    scheme = template.publicArea.parameters.keyedHashDetail.scheme
    scheme.scheme = lib.TPM2_ALG_HMAC
    scheme.details.hmac.hashAlg = lib.TPM2_ALG_SHA256
    _fill(template.publicArea.unique.keyedHash, DERIVED_PRIMARY_UNIQUE)
    return template


def sealed_object(policy: bytes, *, pin: bool) -> Any:
    """docs/sealing.md: sealed data under the SRK, usable only through its policy; noDA unless a PIN."""
    attributes = lib.TPMA_OBJECT_FIXEDTPM | lib.TPMA_OBJECT_FIXEDPARENT
    if not pin:
        attributes |= lib.TPMA_OBJECT_NODA
    template = _public(lib.TPM2_ALG_KEYEDHASH, attributes, policy)
    template.publicArea.parameters.keyedHashDetail.scheme.scheme = lib.TPM2_ALG_NULL
    return template


def approver() -> Any:
    """docs/policy.md: the approver, an ECC P-256 ECDSA-SHA256 signing key under the SRK that signs the
    approved states of the boot chain. Bound to this TPM (fixedTPM, fixedParent), usable by whoever
    holds its blob (userWithAuth, empty auth), never counting towards dictionary-attack lockout."""
    attributes = (
        lib.TPMA_OBJECT_FIXEDTPM
        | lib.TPMA_OBJECT_FIXEDPARENT
        | lib.TPMA_OBJECT_SENSITIVEDATAORIGIN
        | lib.TPMA_OBJECT_USERWITHAUTH
        | lib.TPMA_OBJECT_SIGN_ENCRYPT
        | lib.TPMA_OBJECT_NODA
    )
    template = _public(lib.TPM2_ALG_ECC, attributes, b"")
    detail = template.publicArea.parameters.eccDetail
    detail.symmetric.algorithm = lib.TPM2_ALG_NULL
    detail.scheme.scheme = lib.TPM2_ALG_ECDSA
    detail.scheme.details.ecdsa.hashAlg = lib.TPM2_ALG_SHA256
    detail.curveID = lib.TPM2_ECC_NIST_P256
    detail.kdf.scheme = lib.TPM2_ALG_NULL
    return template


def srk() -> Any:
    """The standard ECC P-256 storage root key (TCG provisioning guidance), as systemd and tpm2-tools make it."""
    return _ecc_p256_storage(SRK_ATTRIBUTES, b"", 0)


def import_parent() -> Any:
    """docs/sealing.md (contract): the primary that tokens sealed for this TPM on another machine are
    wrapped to. The standard SRK's template with userWithAuth cleared, adminWithPolicy set and the
    Import-or-Load policy: a blob wrapped to it can only be imported and loaded, never rewrapped."""
    assert (
        IMPORT_PARENT_ATTRIBUTES == (SRK_ATTRIBUTES & ~lib.TPMA_OBJECT_USERWITHAUTH) | lib.TPMA_OBJECT_ADMINWITHPOLICY
    )
    return _ecc_p256_storage(IMPORT_PARENT_ATTRIBUTES, IMPORT_PARENT_POLICY, 0)


def endorsement_key() -> Any:
    """The standard ECC P-256 EK (low-range template L-2), unique field zero-filled as the profile says."""
    return _ecc_p256_storage(_EK_ATTRIBUTES, _EK_POLICY, 32)
