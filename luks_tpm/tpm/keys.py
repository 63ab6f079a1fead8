"""The three operations that touch key material: the derived primary's HMAC, Seal and Unseal.

Every result that is key material travels in a session salted with the SRK with response encryption,
is copied straight out of the TSS's C buffer into a `Secret`, and that buffer is then zeroed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_AUTH, TPM2B_PRIVATE, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

from ..errors import Cause, ExitCode, LuksTpmError
from ..model import SealedBlob
from ..secret import Secret
from .context import Tpm, TpmError, c_data, fill_tpm2b, secret_from_tpm2b, tpm_errors, wipe_response_buffer, zero_c

DERIVED_PRIMARY_UNIQUE = hashlib.sha256(b"luks-tpm derived primary v1").digest()


def derived_primary_template(policy: bytes) -> TPM2B_PUBLIC:
    """docs/derivation.md (contract): the keyed-hash primary whose HMAC key is re-created from the owner
    seed. Bound to PCRs or the fence, it carries that policy and no userWithAuth."""
    attributes = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.NODA
    )
    if not policy:
        attributes |= TPMA_OBJECT.USERWITHAUTH
    template = TPM2B_PUBLIC.parse("hmac:sha256", nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
    template.publicArea.authPolicy = policy
    template.publicArea.unique.keyedHash = DERIVED_PRIMARY_UNIQUE
    return template


def sealed_object_template(policy: bytes, *, pin: bool) -> TPM2B_PUBLIC:
    """docs/sealing.md: sealed data under the SRK, usable only through its policy; noDA unless a PIN."""
    attributes = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
    if not pin:
        attributes |= TPMA_OBJECT.NODA
    template = TPM2B_PUBLIC.parse("keyedhash", nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
    template.publicArea.authPolicy = policy
    return template


@contextmanager
def derived_primary(tpm: Tpm, policy: bytes = b"") -> Iterator[Any]:
    with tpm_errors("creating the derived primary key"):
        esys, *_ = tpm.esapi.create_primary(None, derived_primary_template(policy), ESYS_TR.OWNER)
    with tpm.transient(esys):
        yield esys


def salted_session(tpm: Tpm, srk: Any, *, policy: bool = False) -> Any:
    """A context manager: an SRK-salted HMAC (or policy) session encrypting commands and responses."""
    return tpm.session(TPM2_SE.POLICY if policy else TPM2_SE.HMAC, salt_key=srk)


def _take_result(tpm: Tpm, session: Any, last_use: bool, doing: str, command: Any, *args: Any) -> Secret:
    if last_use:
        tpm.last_use(session)
    with tpm_errors(doing):
        try:
            result = command(*args, session1=session)
        finally:
            wipe_response_buffer(tpm.esapi)
    if last_use:
        tpm.ended_by_tpm(session)
    return secret_from_tpm2b(result)


def hmac(tpm: Tpm, primary: Any, message: bytes, session: Any, *, last_use: bool = False) -> Secret:
    """TPM2_HMAC with the derived primary, its result (the PRK) encrypted on the bus. `session` is a
    salted HMAC session, or a salted policy session with the primary's policy already applied.

    `last_use`: the session serves no further command, so the TPM ends it (one FlushContext fewer)."""
    return _take_result(
        tpm, session, last_use, "computing the derived key", tpm.esapi.hmac, primary, message, TPM2_ALG.SHA256
    )


def seal(tpm: Tpm, key: Secret, srk: Any, policy_digest: bytes, pin: Secret | None) -> SealedBlob:
    sensitive = TPM2B_SENSITIVE_CREATE()
    inner = c_data(sensitive).sensitive
    try:
        if len(key) > len(inner.data.buffer):
            raise LuksTpmError(
                "the volume key is too large to seal", code=ExitCode.UNSUPPORTED, cause=Cause.UNSUPPORTED
            )
        fill_tpm2b(inner.data, key, "volume key")
        if pin is not None:
            fill_tpm2b(inner.userAuth, pin, "PIN")
        with salted_session(tpm, srk) as session, tpm_errors("sealing the volume key"):
            private, public, *_ = tpm.esapi.create(
                srk, sensitive, sealed_object_template(policy_digest, pin=pin is not None), session1=session
            )
    finally:
        zero_c(inner)
    return SealedBlob(public.marshal(), private.marshal())


def _set_auth(tpm: Tpm, handle: Any, pin: Secret) -> None:
    auth = TPM2B_AUTH()
    try:
        fill_tpm2b(c_data(auth), pin, "PIN")
        tpm.esapi.tr_set_auth(handle, auth)
    finally:
        zero_c(c_data(auth))


def _clear_auth(tpm: Tpm, handle: Any) -> None:
    """ESYS keeps its own copy of an object's auth value (Esys_TR_SetAuth assigns the whole TPM2B to the
    object's record) and frees that record on flush without zeroing it: the PIN would outlive its Secret
    in freed heap. Assigning an all-zero TPM2B_AUTH overwrites it (clearing just the size would not)."""
    tpm.esapi.tr_set_auth(handle, TPM2B_AUTH())


def load_sealed(tpm: Tpm, blob: SealedBlob, srk: Any) -> Any:
    """Load a sealed object (tracked: flushed by the caller or at close). The SRK's name was checked
    against the token before, so an object the TPM rejects as not its own is a damaged blob."""
    try:
        with tpm_errors("loading the sealed key"):
            public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
            private, _ = TPM2B_PRIVATE.unmarshal(blob.private)
            return tpm.track(tpm.esapi.load(srk, private, public))
    except TpmError as error:
        if error.cause is not Cause.SRK_CHANGED:
            raise
        raise TpmError(
            "the TPM rejects the sealed object under the very SRK it was made with: the token's blob is damaged",
            hint="remove the token and re-enroll with the recovery key",
            code=ExitCode.DEVICE,
            cause=Cause.CORRUPT_TOKEN,
            rc=error.rc,
        ) from None


def unseal(tpm: Tpm, blob: SealedBlob, srk: Any, pin: Secret | None, session: Any, *, last_use: bool) -> Secret:
    """Unseal through `session`, a salted policy session in which the object's policy was just applied."""
    sealed = load_sealed(tpm, blob, srk)
    try:
        if pin is not None:
            _set_auth(tpm, sealed, pin)
        return _take_result(tpm, session, last_use, "unsealing the volume key", tpm.esapi.unseal, sealed)
    finally:
        if pin is not None:
            _clear_auth(tpm, sealed)
        tpm.flush(sealed)
