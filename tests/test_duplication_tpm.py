"""luks_tpm.duplication against a real TPM (swtpm): blobs sealed without any TPM call import, load and
unseal like any sealed token; another TPM and damaged blobs are refused (the codes are pinned); and
what an imported object, whose fixedTPM is clear, lets others do: TPM2_Duplicate (refused) and
TPM2_Rewrap of the blob itself (allowed under the standard SRK: it reveals the key), with the fix.

The "build host" steps run outside any TPM connection: they get the target's SRK public area as bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from contextlib import closing
from typing import Any

import pytest

from luks_tpm import duplication
from luks_tpm.ecdh import EphemeralKey
from luks_tpm.errors import Cause
from luks_tpm.model import Bank, PcrPolicy, SealedBlob
from luks_tpm.secret import Secret
from luks_tpm.tpm import Tpm, TpmError, keys, templates
from luks_tpm.tpm import srk as tpm_srk
from luks_tpm.tpm.esys import TssError, ffi, lib
from luks_tpm.tpm.pcr import apply_policy, pcr_values, raise_fence
from luks_tpm.tpm.responses import translate
from luks_tpm.tpm.sessions import Sessions

from . import duplication_reference as ref
from . import tpm_import as ti
from .fixtures_tpm import Swtpm
from .test_duplication import BLOBS, IN_SYM_SEED, PIN, POLICIES, SRK_PRIVATE, VOLUME_KEY


def secret(data: bytes) -> Secret:
    return Secret.copy_of(bytearray(data), zero_source=True)


def target_srk_public(swtpm: Swtpm) -> bytes:
    """What the target exports for provisioning: its standard SRK's TPM2B_PUBLIC."""
    with Tpm(swtpm.tcti) as tpm:
        handle, _ = tpm_srk.current_srk(tpm)
        return ti.parent_of(tpm, handle).public


def current_policy(swtpm: Swtpm, pcrs: tuple[int, ...], *, pin: bool = False, fence: bool = False) -> PcrPolicy:
    with Tpm(swtpm.tcti) as tpm:
        return PcrPolicy(Bank.SHA256, pcrs, pcr_values(tpm, Bank.SHA256, pcrs), pin=pin, fence=fence)


def import_and_unseal(swtpm: Swtpm, blob: duplication.ImportBlob, policy: PcrPolicy, pin: Secret | None) -> Secret:
    """The target's side: TPM2_Import under the SRK, then the sealed token's own load and unseal path."""
    with Tpm(swtpm.tcti) as tpm:
        srk, _ = tpm_srk.current_srk(tpm)
        sealed = ti.imported(tpm, srk, blob)
        with closing(Sessions(tpm, reuse=False)) as sessions, sessions.policy(srk, policy) as session:
            return keys.unseal(tpm, sealed, srk, pin, session)


# ---- it works -----------------------------------------------------------------------------------------


def test_a_pcr_bound_blob_made_without_the_tpm_unseals_on_it(swtpm: Swtpm) -> None:
    srk_public = target_srk_public(swtpm)
    policy = current_policy(swtpm, (0, 7))
    key = secret(os.urandom(64))
    blob = duplication.seal_for_import(
        duplication.parse_srk_public(srk_public), key, policy.digest()
    )  # the build host: no TPM here
    with Tpm(swtpm.tcti) as tpm:
        assert duplication.parse_srk_public(srk_public).name == tpm_srk.current_srk(tpm)[1].name
    with import_and_unseal(swtpm, blob, policy, None) as unsealed:
        assert unsealed.equals(key)


def test_a_pin_blob_for_the_persistent_srk_unseals_with_its_pin_only(fresh_swtpm: Swtpm) -> None:
    with Tpm(fresh_swtpm.tcti) as tpm:
        assert tpm_srk.persist_srk(tpm).handle == tpm_srk.SRK_PERSISTENT_HANDLE  # as the target provisions it
    srk_public = target_srk_public(fresh_swtpm)
    policy = current_policy(fresh_swtpm, (7,), pin=True)
    key = secret(os.urandom(32))
    blob = duplication.seal_for_import(duplication.parse_srk_public(srk_public), key, policy.digest(), secret(PIN))
    with import_and_unseal(fresh_swtpm, blob, policy, secret(PIN)) as unsealed:
        assert unsealed.equals(key)
    with pytest.raises(TpmError) as raised:
        import_and_unseal(fresh_swtpm, blob, policy, secret(b"1357"))
    assert raised.value.cause is Cause.WRONG_PIN


def test_a_fenced_blob_unseals_until_the_fence_goes_up(fresh_swtpm: Swtpm) -> None:
    policy = current_policy(fresh_swtpm, (7,), fence=True)
    key = secret(os.urandom(64))
    blob = duplication.seal_for_import(
        duplication.parse_srk_public(target_srk_public(fresh_swtpm)), key, policy.digest()
    )
    with import_and_unseal(fresh_swtpm, blob, policy, None) as unsealed:
        assert unsealed.equals(key)
    with Tpm(fresh_swtpm.tcti) as tpm:
        raise_fence(tpm)
    with pytest.raises(TpmError) as raised:
        import_and_unseal(fresh_swtpm, blob, policy, None)
    assert raised.value.cause is Cause.POLICY


def test_the_fixed_vectors_import_on_the_tpm(fresh_swtpm: Swtpm) -> None:
    """The pinned blobs of test_duplication.py, byte for byte, opened by the TPM itself: the test SRK (whose
    private key the vectors use) is imported into swtpm first, as a storage key with fixedTPM and
    fixedParent clear (TPM2_LoadExternal refuses restricted keys with a private part). Their policy is
    "sha256 PCR 7 at reset" (then PolicyAuthValue with the PIN), which a fresh swtpm satisfies."""
    with Tpm(fresh_swtpm.tcti) as tpm:
        srk, _ = tpm_srk.current_srk(tpm)
        real = ti.parent_of(tpm, srk)
        public, sensitive = ref.storage_key(SRK_PRIVATE, bytes(range(0x80, 0xA0)))
        wrapped = ref.wrap_area(
            (real.point.x, real.point.y), hashlib.sha256(b"ephemeral 2").digest(), public, sensitive
        )
        test_srk = ti.load(
            tpm, srk, ti.imported(tpm, srk, duplication.ImportBlob(public, wrapped.duplicate, wrapped.in_sym_seed, b""))
        )
        for pin, (_, vector_public, vector_duplicate, name) in BLOBS.items():
            blob = duplication.ImportBlob(
                bytes.fromhex(vector_public), bytes.fromhex(vector_duplicate), bytes.fromhex(IN_SYM_SEED), b""
            )
            sealed = ti.imported(tpm, test_srk, blob)
            policy = PcrPolicy(Bank.SHA256, (7,), {7: bytes(32)}, pin=bool(pin))
            assert policy.digest() == POLICIES[pin]
            with (
                closing(Sessions(tpm, reuse=False)) as sessions,
                sessions.policy(srk, policy) as session,
                keys.unseal(tpm, sealed, test_srk, secret(pin) if pin else None, session) as key,
            ):
                assert bytes(key.view()) == VOLUME_KEY, f"vector with PIN {pin!r}"
            assert bytes.fromhex(name) == duplication.tpm_name(blob.public[2:])


# ---- it is refused ------------------------------------------------------------------------------------


def test_another_tpm_refuses_the_blob(swtpm: Swtpm, second_swtpm: Swtpm) -> None:
    """Another TPM's SRK derives another seed from the ephemeral point, so the outer HMAC fails."""
    blob = duplication.seal_for_import(
        duplication.parse_srk_public(target_srk_public(swtpm)), secret(os.urandom(64)), bytes(32)
    )
    with Tpm(second_swtpm.tcti) as tpm:
        srk, _ = tpm_srk.current_srk(tpm)
        rc, _ = ti.tpm_import(tpm, srk, blob)
    assert rc == ti.RC_INTEGRITY_DUPLICATE
    assert translate(TssError(rc), "importing").cause is Cause.SRK_CHANGED  # what luks-tpm would say today


def _flip(offset: int) -> Callable[[bytes], bytes]:
    return lambda data: data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def _set_attributes(bits: int) -> Callable[[bytes], bytes]:
    """TPM2B_PUBLIC: size(2) type(2) nameAlg(2) objectAttributes(4)."""
    return lambda data: data[:6] + struct.pack(">I", struct.unpack(">I", data[6:10])[0] | bits) + data[10:]


# (case, blob part, mutation, the TPM's response code)
DAMAGE = [
    ("public-authpolicy", "public", _flip(12), ti.RC_INTEGRITY_DUPLICATE),
    ("public-unique", "public", _flip(-1), ti.RC_INTEGRITY_DUPLICATE),
    ("public-fixedtpm-fixedparent", "public", _set_attributes(0x12), ti.RC_ATTRIBUTES_OBJECT_PUBLIC),
    ("public-encryptedduplication", "public", _set_attributes(0x800), ti.RC_ATTRIBUTES_ENCRYPTION_KEY),
    ("duplicate-hmac", "duplicate", _flip(4), ti.RC_INTEGRITY_DUPLICATE),
    ("duplicate-encrypted-first", "duplicate", _flip(36), ti.RC_INTEGRITY_DUPLICATE),
    ("duplicate-encrypted-last", "duplicate", _flip(-1), ti.RC_INTEGRITY_DUPLICATE),
    ("seed-x-off-curve", "seed", _flip(10), ti.RC_ECC_POINT_SEED),
    ("seed-y-off-curve", "seed", _flip(-1), ti.RC_ECC_POINT_SEED),
]


@pytest.mark.parametrize(("part", "mutate", "rc"), [case[1:] for case in DAMAGE], ids=[case[0] for case in DAMAGE])
def test_a_damaged_blob_is_refused(swtpm: Swtpm, part: str, mutate: Callable[[bytes], bytes], rc: int) -> None:
    blob = duplication.seal_for_import(
        duplication.parse_srk_public(target_srk_public(swtpm)), secret(os.urandom(64)), bytes(32)
    )
    parts = {"public": blob.public, "duplicate": blob.duplicate, "seed": blob.seed}
    parts[part] = mutate(parts[part])
    with Tpm(swtpm.tcti) as tpm:
        srk, _ = tpm_srk.current_srk(tpm)
        assert ti.tpm_import(tpm, srk, duplication.ImportBlob(name=blob.name, **parts))[0] == rc
        assert ti.tpm_import(tpm, srk, blob)[0] == 0  # and the undamaged one imports


def test_a_valid_point_from_another_blob_is_refused(swtpm: Swtpm) -> None:
    srk_public = target_srk_public(swtpm)
    blob, other = (
        duplication.seal_for_import(duplication.parse_srk_public(srk_public), secret(os.urandom(64)), bytes(32))
        for _ in range(2)
    )
    with Tpm(swtpm.tcti) as tpm:
        srk, _ = tpm_srk.current_srk(tpm)
        rc, _ = ti.tpm_import(tpm, srk, duplication.ImportBlob(blob.public, blob.duplicate, other.seed, blob.name))
    assert rc == ti.RC_INTEGRITY_DUPLICATE


# ---- can the imported object leave the TPM again? --------------------------------------------------------

KINDS = {
    "pcr": PcrPolicy(Bank.SHA256, (7,), {}),
    "pcr-fence": PcrPolicy(Bank.SHA256, (7,), {}, fence=True),
    "pcr-pin": PcrPolicy(Bank.SHA256, (7,), {}, pin=True),
    "empty": PcrPolicy(Bank.SHA256, (), {}),
}


def _with_values(swtpm: Swtpm, kind: str) -> PcrPolicy:
    shape = KINDS[kind]
    return current_policy(swtpm, shape.pcrs, pin=shape.pin, fence=shape.fence) if shape.pcrs else shape


def _loaded_import(tpm: Tpm, srk: Any, policy_digest: bytes, key: Secret, pin: Secret | None) -> Any:
    blob = duplication.seal_for_import(
        duplication.parse_srk_public(ti.parent_of(tpm, srk).public), key, policy_digest, pin
    )
    item = ti.load(tpm, srk, ti.imported(tpm, srk, blob))
    if pin is not None:
        ti.set_auth(tpm, item, pin)
    return item


@pytest.mark.parametrize("new_parent", ["null", "other-tpm", "same-srk"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_imported_object_cannot_be_duplicated(
    swtpm: Swtpm, second_swtpm: Swtpm, kind: str, new_parent: str
) -> None:
    """A session that satisfies the object's policy does not authorize TPM2_Duplicate: the DUP role needs
    the session's commandCode set (PolicyCommandCode or PolicyDuplicationSelect; libtpms SessionProcess.c,
    CheckPolicyAuthSession), and adding that assertion changes the digest away from the authPolicy. The
    same session then unseals: it did satisfy the policy."""
    policy, key = _with_values(swtpm, kind), secret(os.urandom(64))
    pin = secret(PIN) if policy.pin else None
    other_public = target_srk_public(second_swtpm)
    with Tpm(swtpm.tcti) as tpm:
        srk, _ = tpm_srk.current_srk(tpm)
        item = _loaded_import(tpm, srk, policy.digest(), key, pin)
        target = {"null": lib.ESYS_TR_RH_NULL, "same-srk": srk}.get(new_parent)
        target = target if target is not None else ti.load_external_public(tpm, other_public)
        with tpm.session(lib.TPM2_SE_POLICY) as session:
            apply_policy(tpm, session, policy, trial=False)
            ti.policy_command_code(tpm, session, ti.CC_DUPLICATE)
            assert ti.duplicate(tpm, item, target, session) == (ti.RC_POLICY_FAIL_SESSION_1, b"")
        with tpm.session(lib.TPM2_SE_POLICY) as session:
            apply_policy(tpm, session, policy, trial=False)
            assert ti.duplicate(tpm, item, target, session) == (ti.RC_POLICY_FAIL_SESSION_1, b"")
            assert ti.unseals_to(tpm, item, session, key)


def test_control_an_object_whose_policy_names_duplicate_does_leave_in_clear(swtpm: Swtpm) -> None:
    """The check above can see a duplication: with PolicyCommandCode(TPM_CC_Duplicate) in its authPolicy
    an imported object duplicates to TPM_RH_NULL, and that blob holds the sealed key in clear."""
    policy, key = current_policy(swtpm, (7,)), secret(os.urandom(64))
    digest = ti.extend_policy(policy.digest(), struct.pack(">II", ti.CC_POLICY_COMMAND_CODE, ti.CC_DUPLICATE))
    with Tpm(swtpm.tcti) as tpm:
        srk, _ = tpm_srk.current_srk(tpm)
        item = _loaded_import(tpm, srk, digest, key, None)
        with tpm.session(lib.TPM2_SE_POLICY) as session:
            apply_policy(tpm, session, policy, trial=False)
            ti.policy_command_code(tpm, session, ti.CC_DUPLICATE)
            rc, out = ti.duplicate(tpm, item, lib.ESYS_TR_RH_NULL, session)
    assert rc == 0 and bytes(key.view()) in out


def test_finding_rewrap_under_the_standard_srk_reveals_key_and_pin(swtpm: Swtpm) -> None:
    """THE PROBLEM. TPM2_Rewrap needs only the USER role on the old parent (the SRK: empty auth,
    userWithAuth), never the object's policy: with newParent TPM_RH_NULL and no inner wrapper it returns
    the blob's TPM2B_SENSITIVE in clear. Anyone who can read the LUKS header and send commands to the
    target TPM (root, or any OS booted on that machine) gets the key, whatever the PCRs, fence and PIN."""
    unreachable = PcrPolicy(Bank.SHA256, (7,), {7: b"\x55" * 32}, pin=True)
    key = secret(os.urandom(64))
    blob = duplication.seal_for_import(
        duplication.parse_srk_public(target_srk_public(swtpm)), key, unreachable.digest(), secret(PIN)
    )
    with Tpm(swtpm.tcti) as tpm:
        srk, _ = tpm_srk.current_srk(tpm)
        rc, out = ti.rewrap_to_null(tpm, srk, blob)
    assert rc == 0
    assert bytes(key.view()) in out and PIN in out


# The fix proposed: a dedicated import parent that only a policy session naming TPM2_Import or TPM2_Load
# can use (the standard SRK's template, userWithAuth cleared, adminWithPolicy set, authPolicy = PolicyOR of
# PolicyCommandCode(Import) and PolicyCommandCode(Load)).
IMPORT_PARENT_BRANCHES = (ti.command_code_branch(ti.CC_IMPORT), ti.command_code_branch(ti.CC_LOAD))
IMPORT_PARENT_POLICY = ti.extend_policy(bytes(32), struct.pack(">I", ti.CC_POLICY_OR), *IMPORT_PARENT_BRANCHES)


def _import_parent(tpm: Tpm) -> Any:
    template = templates.srk()
    area = template.publicArea
    area.objectAttributes = (area.objectAttributes & ~lib.TPMA_OBJECT_USERWITHAUTH) | lib.TPMA_OBJECT_ADMINWITHPOLICY
    area.authPolicy.size = len(IMPORT_PARENT_POLICY)
    ffi.memmove(area.authPolicy.buffer, IMPORT_PARENT_POLICY, len(IMPORT_PARENT_POLICY))
    return tpm.track(tpm.esys.create_primary(lib.ESYS_TR_RH_OWNER, template))


def _branch(tpm: Tpm, session: Any, code: int) -> None:
    ti.policy_command_code(tpm, session, code)
    assert ti.policy_or(tpm, session, IMPORT_PARENT_BRANCHES) == 0


def test_fix_a_policy_only_import_parent_refuses_rewrap_and_still_imports(swtpm: Swtpm) -> None:
    key = secret(os.urandom(64))
    with Tpm(swtpm.tcti) as tpm:
        parent = ti.parent_of(tpm, _import_parent(tpm))
        target = duplication.SrkPublic(parent.public, duplication.tpm_name(parent.public[2:]), parent.point)
        with EphemeralKey() as ephemeral, secret(os.urandom(32)) as seed_value:
            blob = duplication.wrap_for_import(target, key, bytes(32), None, ephemeral=ephemeral, seed_value=seed_value)
        assert ti.rewrap_to_null(tpm, parent.handle, blob)[0] == ti.RC_AUTH_UNAVAILABLE
        for code in (ti.CC_IMPORT, ti.CC_LOAD):
            with tpm.session(lib.TPM2_SE_POLICY) as session:
                _branch(tpm, session, code)
                assert ti.rewrap_to_null(tpm, parent.handle, blob, session)[0] == ti.RC_POLICY_CC_SESSION_1
        with tpm.session(lib.TPM2_SE_POLICY) as session:
            ti.policy_command_code(tpm, session, ti.CC_REWRAP)
            assert ti.policy_or(tpm, session, IMPORT_PARENT_BRANCHES) != 0  # no branch for Rewrap
        with tpm.session(lib.TPM2_SE_POLICY) as session:
            _branch(tpm, session, ti.CC_IMPORT)
            rc, private = ti.tpm_import(tpm, parent.handle, blob, session)
        assert rc == 0
        with tpm.session(lib.TPM2_SE_POLICY) as session:
            _branch(tpm, session, ti.CC_LOAD)
            item = ti.load(tpm, parent.handle, SealedBlob(blob.public, private), session)
        with tpm.session(lib.TPM2_SE_POLICY, salt_key=parent.handle) as session:
            assert ti.unseals_to(tpm, item, session, key)
