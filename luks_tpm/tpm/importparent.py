"""The import parent (docs/sealing.md): the key a TPM's provisioning file names, to which tokens sealed for
this TPM on another machine are wrapped (luks_tpm.duplication).

It is a primary of the owner hierarchy made from a fixed template (templates.import_parent), so it is
re-created, the same key, whenever it is needed, and destroyed with the owner seed like the SRK. It is
not the SRK on purpose: the standard SRK's USER role needs no authorization, and TPM2_Rewrap under it
would unwrap any blob wrapped to it. The import parent answers only a policy session that names
TPM2_Import or TPM2_Load, so a blob can be imported and loaded, and its object then answers only its own
policy (PCRs, fence, PIN) like every sealed token's.
"""

from __future__ import annotations

from typing import Any

from ..errors import Cause, ExitCode
from ..model import IMPORT_PARENT_BRANCHES, ImportedSeal, Parent
from . import templates
from .context import Tpm
from .esys import lib, marshal, unmarshal
from .responses import OWNER, TpmError, token_data, tpm_errors


def create(tpm: Tpm) -> tuple[Any, Parent]:
    """The import parent, made now (tracked: flushed when the connection closes): (handle, its name)."""
    with tpm_errors("creating the import parent", OWNER):
        handle = tpm.track(tpm.esys.create_primary(lib.ESYS_TR_RH_OWNER, templates.import_parent()))
        return handle, Parent(None, tpm.esys.tr_get_name(handle))


def public_area(tpm: Tpm, handle: Any) -> bytes:
    """Its marshalled TPM2B_PUBLIC, as the provisioning file carries it."""
    with tpm_errors("reading the import parent"):
        return marshal("TPM2B_PUBLIC", tpm.esys.read_public(handle))


def load_imported(tpm: Tpm, parent: Any, seal: ImportedSeal) -> Any:
    """TPM2_Import then TPM2_Load under the import parent (each in a policy session naming that command):
    the sealed object, loaded and tracked. Once the parent's name matched the token's, anything the TPM
    refuses in the blob means the token is damaged."""
    with token_data("reading the token's import blob"):  # what does not unmarshal is the token's
        public = unmarshal("TPM2B_PUBLIC", seal.public)
        marshal("TPM2B_PUBLIC", public)  # ESYS marshals it again to name the object
    try:
        with tpm.session(lib.TPM2_SE_POLICY) as session, tpm_errors("importing the sealed key"):
            _authorize(tpm, session, lib.TPM2_CC_Import)
            private = tpm.esys.import_(
                parent,
                session,
                public,
                unmarshal("TPM2B_PRIVATE", seal.duplicate),
                unmarshal("TPM2B_ENCRYPTED_SECRET", seal.seed),
            )
        with tpm.session(lib.TPM2_SE_POLICY) as session, tpm_errors("loading the imported key"):
            _authorize(tpm, session, lib.TPM2_CC_Load)
            return tpm.track(tpm.esys.load(parent, unmarshal("TPM2B_PRIVATE", private), public, session))
    except TpmError as error:
        if error.cause in (Cause.NO_TPM, Cause.LOCKED_OUT):
            raise
        raise TpmError(
            "the TPM refuses the token's import blob, although it was made for this TPM: the token is damaged",
            hint="remove the token and re-enroll (on this machine, or with `enroll --for-tpm` again)",
            code=ExitCode.DEVICE,
            cause=Cause.CORRUPT_TOKEN,
            rc=error.rc,
        ) from None


def _authorize(tpm: Tpm, session: Any, command: int) -> None:
    tpm.esys.policy_command_code(session, command)
    tpm.esys.policy_or(session, IMPORT_PARENT_BRANCHES)
