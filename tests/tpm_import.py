"""The TPM side of an import, for tests: TPM2_Import, TPM2_Duplicate, TPM2_Rewrap and the policy commands
luks-tpm's production code does not send, through the same ESYS binding (luks_tpm.tpm.esys).

Each returns the TPM's response code instead of raising, so a test can pin the exact code; 0 is success.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from collections.abc import Sequence
from typing import Any

from luks_tpm.duplication import ImportBlob
from luks_tpm.ecdh import Point
from luks_tpm.model import SealedBlob
from luks_tpm.secret import Secret
from luks_tpm.tpm import Tpm
from luks_tpm.tpm.esys import NONE, PASSWORD, check, ffi, lib, marshal, unmarshal

# TPM 2.0 Part 2: command codes, and response codes as the TPM returns them for these commands.
CC_DUPLICATE, CC_REWRAP, CC_IMPORT, CC_LOAD = 0x14B, 0x152, 0x156, 0x157
CC_POLICY_COMMAND_CODE, CC_POLICY_OR = 0x16C, 0x171
RC_INTEGRITY_DUPLICATE = 0x3DF  # TPM_RC_INTEGRITY (0x09f) + parameter 3 (duplicate)
RC_ATTRIBUTES_OBJECT_PUBLIC = 0x2C2  # TPM_RC_ATTRIBUTES (0x082) + parameter 2 (objectPublic)
RC_ATTRIBUTES_ENCRYPTION_KEY = 0x1C2  # TPM_RC_ATTRIBUTES + parameter 1 (encryptionKey)
RC_ECC_POINT_SEED = 0x4E7  # TPM_RC_ECC_POINT (0x0a7) + parameter 4 (inSymSeed)
RC_POLICY_FAIL_SESSION_1 = 0x99D  # TPM_RC_POLICY_FAIL (0x09d) + session 1
RC_POLICY_CC_SESSION_1 = 0x9A4  # TPM_RC_POLICY_CC (0x0a4) + session 1
RC_AUTH_UNAVAILABLE = 0x12F  # TPM_RC_AUTH_UNAVAILABLE: neither authValue nor authPolicy can authorize


@dataclasses.dataclass(frozen=True)
class Parent:
    """A loaded storage key: its ESYS handle, its public area (as the target's provisioning file gives it)."""

    handle: Any
    public: bytes
    point: Point


def parent_of(tpm: Tpm, handle: Any) -> Parent:
    public = tpm.esys.read_public(handle)  # keep it: the struct views below do not keep it alive
    unique = public.publicArea.unique.ecc
    point = Point(bytes(ffi.buffer(unique.x.buffer, unique.x.size)), bytes(ffi.buffer(unique.y.buffer, unique.y.size)))
    return Parent(handle, marshal("TPM2B_PUBLIC", public), point)


def _null_symmetric() -> Any:
    symmetric = ffi.new("TPMT_SYM_DEF_OBJECT *")
    symmetric.algorithm = lib.TPM2_ALG_NULL
    return symmetric


def tpm_import(tpm: Tpm, parent: Any, blob: ImportBlob, session: Any = PASSWORD) -> tuple[int, bytes]:
    """TPM2_Import(parent, encryptionKey empty, blob, symmetricAlg NULL): (rc, outPrivate)."""
    out = ffi.new("TPM2B_PRIVATE **")
    rc = lib.Esys_Import(
        tpm.esys.context, parent, session, NONE, NONE, ffi.new("TPM2B_DATA *"),
        unmarshal("TPM2B_PUBLIC", blob.public), unmarshal("TPM2B_PRIVATE", blob.duplicate),
        unmarshal("TPM2B_ENCRYPTED_SECRET", blob.seed), _null_symmetric(), out,
    )  # fmt: skip
    if rc:
        return rc, b""
    private = marshal("TPM2B_PRIVATE", out[0])
    lib.Esys_Free(out[0])
    return 0, private


def imported(tpm: Tpm, parent: Any, blob: ImportBlob) -> SealedBlob:
    """Import that must succeed: the object's (public, private) under `parent`, loadable as a sealed token's."""
    rc, private = tpm_import(tpm, parent, blob)
    assert rc == 0, f"TPM2_Import failed: {rc:#x}"
    return SealedBlob(blob.public, private)


def load(tpm: Tpm, parent: Any, sealed: SealedBlob, session: Any = PASSWORD) -> Any:
    """TPM2_Load, tracked so that the Tpm flushes it."""
    handle = ffi.new("ESYS_TR *")
    check(
        lib.Esys_Load(
            tpm.esys.context, parent, session, NONE, NONE,
            unmarshal("TPM2B_PRIVATE", sealed.private), unmarshal("TPM2B_PUBLIC", sealed.public), handle,
        )
    )  # fmt: skip
    return tpm.track(handle[0])


def load_external_public(tpm: Tpm, public: bytes) -> Any:
    """Another TPM's key, public part only (in the NULL hierarchy): a new parent to duplicate to."""
    handle = ffi.new("ESYS_TR *")
    check(
        lib.Esys_LoadExternal(
            tpm.esys.context, NONE, NONE, NONE, ffi.NULL, unmarshal("TPM2B_PUBLIC", public), lib.ESYS_TR_RH_NULL,
            handle,
        )
    )  # fmt: skip
    return tpm.track(handle[0])


def duplicate(tpm: Tpm, item: Any, new_parent: Any, session: Any) -> tuple[int, bytes]:
    """TPM2_Duplicate(item, newParent, no inner wrapper) authorized by `session`: (rc, duplicate)."""
    key_out, out = ffi.new("TPM2B_DATA **"), ffi.new("TPM2B_PRIVATE **")
    seed_out = ffi.new("TPM2B_ENCRYPTED_SECRET **")
    rc = lib.Esys_Duplicate(
        tpm.esys.context, item, new_parent, session, NONE, NONE, ffi.new("TPM2B_DATA *"), _null_symmetric(),
        key_out, out, seed_out,
    )  # fmt: skip
    if rc:
        return rc, b""
    blob = marshal("TPM2B_PRIVATE", out[0])
    for pointer in (key_out[0], out[0], seed_out[0]):
        lib.Esys_Free(pointer)
    return 0, blob


def rewrap_to_null(tpm: Tpm, old_parent: Any, blob: ImportBlob, session: Any = PASSWORD) -> tuple[int, bytes]:
    """TPM2_Rewrap(oldParent, newParent = TPM_RH_NULL, the blob): (rc, outDuplicate)."""
    name = ffi.new("TPM2B_NAME *")
    name.size = len(blob.name)
    ffi.memmove(name.name, blob.name, len(blob.name))
    out, seed_out = ffi.new("TPM2B_PRIVATE **"), ffi.new("TPM2B_ENCRYPTED_SECRET **")
    rc = lib.Esys_Rewrap(
        tpm.esys.context, old_parent, lib.ESYS_TR_RH_NULL, session, NONE, NONE,
        unmarshal("TPM2B_PRIVATE", blob.duplicate), name, unmarshal("TPM2B_ENCRYPTED_SECRET", blob.seed),
        out, seed_out,
    )  # fmt: skip
    if rc:
        return rc, b""
    result = marshal("TPM2B_PRIVATE", out[0])
    lib.Esys_Free(out[0])
    lib.Esys_Free(seed_out[0])
    return 0, result


def policy_command_code(tpm: Tpm, session: Any, code: int) -> None:
    check(lib.Esys_PolicyCommandCode(tpm.esys.context, session, NONE, NONE, NONE, code))


def policy_or(tpm: Tpm, session: Any, branches: Sequence[bytes]) -> int:
    digests = ffi.new("TPML_DIGEST *")
    digests.count = len(branches)
    for index, branch in enumerate(branches):
        digests.digests[index].size = len(branch)
        ffi.memmove(digests.digests[index].buffer, branch, len(branch))
    rc: int = lib.Esys_PolicyOR(tpm.esys.context, session, NONE, NONE, NONE, digests)
    return rc


def set_auth(tpm: Tpm, handle: Any, pin: Secret) -> None:
    auth = ffi.new("TPM2B_AUTH *")
    auth.size = len(pin)
    ffi.memmove(auth.buffer, pin.as_ctypes(), len(pin))
    tpm.esys.tr_set_auth(handle, auth)
    ffi.memmove(auth, bytes(ffi.sizeof("TPM2B_AUTH")), ffi.sizeof("TPM2B_AUTH"))


def extend_policy(digest: bytes, *parts: bytes) -> bytes:
    return hashlib.sha256(digest + b"".join(parts)).digest()


def command_code_branch(code: int) -> bytes:
    """The digest of a policy that is just PolicyCommandCode(code)."""
    return extend_policy(bytes(32), struct.pack(">II", CC_POLICY_COMMAND_CODE, code))


def unseals_to(tpm: Tpm, item: Any, session: Any, key: Secret) -> bool:
    """TPM2_Unseal through `session` (kept open) gives exactly `key`; the result is zeroed after the check."""
    result = ffi.new("TPM2B_SENSITIVE_DATA **")
    check(lib.Esys_Unseal(tpm.esys.context, item, session, NONE, NONE, result))
    try:
        return bool(hmac.compare_digest(ffi.buffer(result[0].buffer, result[0].size), key.view()))
    finally:
        ffi.memmove(result[0].buffer, bytes(result[0].size), result[0].size)
        lib.Esys_Free(result[0])
