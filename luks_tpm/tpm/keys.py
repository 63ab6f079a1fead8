"""The three operations that touch key material: the derived primary's HMAC, Seal and Unseal.

Every result that is key material travels in a session salted with the SRK with response encryption,
is copied straight out of the TSS's C buffer into a `Secret`, and that buffer is then zeroed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import Cause, ExitCode, LuksTpmError
from ..model import ImportedSeal, SealedBlob
from ..secret import Secret
from . import importparent, templates
from .context import Tpm, fill_tpm2b, secret_from_tpm2b, wipe_response_buffer, zero_c
from .esys import ffi, lib, marshal, unmarshal
from .responses import OWNER, TpmError, token_data, tpm_errors
from .sessions import SessionUse


@contextmanager
def derived_primary(tpm: Tpm, policy: bytes = b"") -> Iterator[Any]:
    with tpm_errors("creating the derived primary key", OWNER):
        esys = tpm.esys.create_primary(lib.ESYS_TR_RH_OWNER, templates.derived_primary(policy))
    with tpm.transient(esys):
        yield esys


def _take_result(tpm: Tpm, session: SessionUse, doing: str, command: Any, *args: Any) -> Secret:
    """Run a command whose response is key material, copy it into a Secret and zero every copy the TSS
    made. On the session's last use the TPM ends it (continueSession clear)."""
    if session.last:
        tpm.last_use(session.handle)
    with tpm_errors(doing):
        try:
            result = command(*args, session.handle)
        finally:
            wipe_response_buffer(tpm.esys)
    if session.last:
        tpm.ended_by_tpm(session.handle)
    return secret_from_tpm2b(result)


def hmac(tpm: Tpm, primary: Any, message: bytes, session: SessionUse) -> Secret:
    """TPM2_HMAC with the derived primary, its result (the PRK) encrypted on the bus. `session` is a
    salted HMAC session, or a salted policy session with the primary's policy already applied."""
    return _take_result(tpm, session, "computing the derived key", tpm.esys.hmac, primary, message)


def seal(tpm: Tpm, key: Secret, srk: Any, policy_digest: bytes, pin: Secret | None) -> SealedBlob:
    sensitive = ffi.new("TPM2B_SENSITIVE_CREATE *")
    inner = sensitive.sensitive
    try:
        if len(key) > len(inner.data.buffer):
            raise LuksTpmError(
                "the volume key is too large to seal", code=ExitCode.UNSUPPORTED, cause=Cause.UNSUPPORTED
            )
        fill_tpm2b(inner.data, key, "volume key")
        if pin is not None:
            fill_tpm2b(inner.userAuth, pin, "PIN")
        template = templates.sealed_object(policy_digest, pin=pin is not None)
        with tpm.session(lib.TPM2_SE_HMAC, salt_key=srk) as session, tpm_errors("sealing the volume key"):
            public, private = tpm.esys.create(srk, sensitive, template, session)
    finally:
        zero_c(inner)
    return SealedBlob(public, private)


def _set_auth(tpm: Tpm, handle: Any, pin: Secret) -> None:
    auth = ffi.new("TPM2B_AUTH *")
    try:
        fill_tpm2b(auth, pin, "PIN")
        tpm.esys.tr_set_auth(handle, auth)
    finally:
        zero_c(auth)


def _clear_auth(tpm: Tpm, handle: Any) -> None:
    """ESYS keeps its own copy of an object's auth value (Esys_TR_SetAuth assigns the whole TPM2B to the
    object's record) and frees that record on flush without zeroing it: the PIN would outlive its Secret
    in freed heap. Assigning an all-zero TPM2B_AUTH overwrites it (clearing just the size would not)."""
    tpm.esys.tr_set_auth(handle, ffi.new("TPM2B_AUTH *"))


def load_sealed(tpm: Tpm, blob: SealedBlob, srk: Any) -> Any:
    """Load a sealed object (tracked: flushed by the caller or at close). The SRK's name was checked
    against the token before, so an object the TPM rejects as not its own is a damaged blob."""
    with token_data("reading the token's sealed object"):
        public = unmarshal("TPM2B_PUBLIC", blob.public)
        private = unmarshal("TPM2B_PRIVATE", blob.private)
        marshal("TPM2B_PUBLIC", public)  # ESYS marshals it again to name the object: what fails is the token's
    try:
        with tpm_errors("loading the sealed key"):
            return tpm.track(tpm.esys.load(srk, private, public))
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


def unseal(tpm: Tpm, blob: SealedBlob | ImportedSeal, parent: Any, pin: Secret | None, session: SessionUse) -> Secret:
    """Unseal through `session`, a salted policy session in which the object's policy was just applied.
    `parent` is the SRK, or the import parent for a blob sealed elsewhere for this TPM."""
    if isinstance(blob, ImportedSeal):
        sealed = importparent.load_imported(tpm, parent, blob)
    else:
        sealed = load_sealed(tpm, blob, parent)
    try:
        if pin is not None:
            _set_auth(tpm, sealed, pin)
        return _take_result(tpm, session, "unsealing the volume key", tpm.esys.unseal, sealed)
    finally:
        if pin is not None:
            _clear_auth(tpm, sealed)
        tpm.flush(sealed)
