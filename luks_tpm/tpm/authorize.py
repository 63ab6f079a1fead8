"""PolicyAuthorize (docs/policy.md): approved states of the boot chain, signed by the approver key.

A version 2 token's policy is PolicyAuthorize(approver, "luks-tpm approved boot state v1") [+ the fence]
[+ a PIN]: any PolicyPCR state the approver signed satisfies it, and the approved part comes first, so the
fence and the PIN stay whatever state is approved. The approver is an ECC P-256 signing key of this TPM,
made under the SRK; its blob is kept by the running system (luks_tpm.approver). To use an approval the TPM
checks the signature with the approver's public area alone (LoadExternal, VerifySignature): the boot needs
no secret but the TPM's.
"""

from __future__ import annotations

from typing import Any

from ..model import APPROVAL_REF, Approval, PcrPolicy, SealedBlob, approval_digest
from . import templates
from .context import Tpm
from .esys import ffi, lib, unmarshal
from .responses import tpm_errors


def create_approver(tpm: Tpm, srk: Any) -> SealedBlob:
    """A new approver key under `srk`: its (public, private) blob."""
    with tpm.session(lib.TPM2_SE_HMAC, salt_key=srk) as session, tpm_errors("creating the approver key"):
        public, private = tpm.esys.create(srk, ffi.new("TPM2B_SENSITIVE_CREATE *"), templates.approver(), session)
    return SealedBlob(public, private)


def sign(tpm: Tpm, srk: Any, approver: SealedBlob, approved: bytes) -> bytes:
    """The approver's signature (a marshalled TPMT_SIGNATURE) approving the policy digest `approved`."""
    scheme = ffi.new("TPMT_SIG_SCHEME *")
    scheme.scheme = lib.TPM2_ALG_ECDSA
    scheme.details.ecdsa.hashAlg = lib.TPM2_ALG_SHA256
    with tpm_errors("loading the approver key"):
        handle = tpm.esys.load(
            srk, unmarshal("TPM2B_PRIVATE", approver.private), unmarshal("TPM2B_PUBLIC", approver.public)
        )
    with tpm.transient(handle), tpm_errors("signing an approved boot state"):
        return tpm.esys.sign(handle, approval_digest(approved), scheme)


class Tickets:
    """Approvals checked by the TPM in one pass: one VerifySignature per approval, its ticket kept (a ticket
    is good until the TPM resets), so that volumes sharing an approval cost one check."""

    def __init__(self, tpm: Tpm) -> None:
        self.tpm = tpm
        self._tickets: dict[tuple[bytes, bytes], Any] = {}

    def ticket(self, approver_public: bytes, approval: Approval, approved: bytes) -> Any:
        key = (approver_public, approval.signature)
        if key not in self._tickets:
            with tpm_errors("checking the approval's signature"):
                public = unmarshal("TPM2B_PUBLIC", approver_public)
                signature = unmarshal("TPMT_SIGNATURE", approval.signature)
                handle = self.tpm.esys.load_external(public, lib.ESYS_TR_RH_OWNER)
            with self.tpm.transient(handle), tpm_errors("checking the approval's signature"):
                self._tickets[key] = self.tpm.esys.verify_signature(handle, approval_digest(approved), signature)
        return self._tickets[key]


def authorize(tpm: Tpm, session: Any, policy: PcrPolicy, ticket: Any) -> None:
    """PolicyAuthorize in a session whose digest is now `policy`'s approved PolicyPCR."""
    assert policy.approver is not None
    with tpm_errors("authorizing the approved boot state"):
        tpm.esys.policy_authorize(session, policy.approved_digest(), APPROVAL_REF, policy.approver, ticket)


def trial_ticket() -> Any:
    """The NULL ticket a trial session takes for PolicyAuthorize (a trial checks nothing)."""
    ticket = ffi.new("TPMT_TK_VERIFIED *")
    ticket.tag, ticket.hierarchy = lib.TPM2_ST_VERIFIED, lib.TPM2_RH_NULL
    return ticket
