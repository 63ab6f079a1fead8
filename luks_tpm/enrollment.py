"""Making bindings: a new token for a volume key, written, read back and proven; enroll, remove, persist-srk.

Every write goes through libcryptsetup, in an order that leaves at least the old ways in after an
interruption at any point; every new token is read back and made to recover the key before success
is reported; a token that cannot be verified is kept beside the working ones and says so; and nothing
removes the last way into a volume unless forced.
"""

from __future__ import annotations

import dataclasses
import errno
import secrets
from pathlib import Path
from typing import Any

from . import approver, derive, nextboot
from .cryptsetup import CryptsetupError, Device, open_device, write_error
from .errors import DEAD_CAUSES, Cause, ExitCode, LuksTpmError, die
from .model import FENCE_PCR, Approval, ApprovedState, Approver, Mode, Parent, PcrPolicy
from .output import TEXT_ONLY, Report, progress
from .prompt import NewPinSource, PassphraseSource, PinSource
from .secret import Secret
from .settings import Enrollment
from .tokenformat import DerivedToken, SealedToken, Token, to_json, utc_now
from .tpm import Tpm, TpmError
from .tpm import keys as tpm_keys
from .tpm import pcr as tpm_pcr
from .tpm import srk as tpm_srk
from .tpm.keyuse import KeyUse
from .tpm.owner import owner_authorization
from .unlock import Recovery, luks_tpm_tokens

# ---- header writes ------------------------------------------------------------------------------------


def write_token(device: Device, token: Token) -> int:
    if len(device.tokens()) >= 32:
        die(
            f"{device.path}: the LUKS2 header already holds 32 tokens, the most it can",
            hint="remove unused tokens (`luks-tpm status`, `luks-tpm remove`)",
            code=ExitCode.DEVICE,
            cause=Cause.HEADER_FULL,
        )
    try:
        return device.token_json_set(to_json(token))
    except CryptsetupError as error:
        raise write_error(device, error) from None


def remove_token(device: Device, token_id: int) -> None:
    try:
        device.token_remove(token_id)
    except CryptsetupError as error:
        raise write_error(device, error) from None


# ---- making tokens: one place per mode ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Binding:
    """What a new token is made under: the SRK, and the policy with its digest (None: TPM-only derived);
    bound to the boot chain, the approver and the states it approved (the current one among them, when
    the PCRs are in one now: what the key is computed and verified with)."""

    srk: Any
    parent: Parent
    policy: PcrPolicy | None
    digest: bytes
    endorsement: bytes | None
    approver: Approver | None = None
    approvals: tuple[Approval, ...] = ()

    @property
    def approved_now(self) -> ApprovedState | None:
        if self.approver is None or self.policy is None:
            return None
        current = self.policy.values
        found = next((a for a in self.approvals if a.values == current), None)
        return None if found is None else ApprovedState(self.approver, found)

    def fields(self, *, digest: int, key_size: int) -> dict[str, Any]:
        """The token fields every mode shares."""
        policy = self.policy
        return {
            "digest": digest,
            "key_size": key_size,
            "parent": self.parent,
            "created": utc_now(),
            "endorsement": self.endorsement,
            "policy": self.digest,
            "pcr_bank": policy.bank if policy else Enrollment(Mode.DERIVED).bank,
            "pcrs": policy.pcrs if policy else (),
            "pcr_values": dict(policy.values) if policy and not self.approver else {},
            "fence": bool(policy and policy.fence),
            "approver": self.approver,
            "approvals": self.approvals,
        }

    def derived_key(self, keys: KeyUse, uuid: str, salt: bytes, length: int) -> Secret:
        if self.approver is not None and self.approved_now is None:
            die(
                "a derived key bound to the boot chain can only be computed while the PCRs are in an approved "
                "state: the given --pcr-value state is not the current one",
                hint="use --mode sealed, or enroll on the machine itself, before the fence (initramfs, installer)",
                code=ExitCode.USAGE,
                cause=Cause.USAGE,
            )
        message = derive.hmac_message(uuid, salt)
        with keys.hmac(self.srk, message, self.policy, self.digest, self.approved_now) as prk:
            return derive.expand(prk, uuid, length)


def prepare(tpm: Tpm, enrollment: Enrollment) -> Binding:
    if enrollment.mode is Mode.DERIVED and enrollment.fence and tpm_pcr.fence_is_up(tpm):
        die(
            f"the fence is up (PCR {FENCE_PCR} is not zero), so the TPM cannot compute a fenced derived key now",
            hint="enroll from the installer or the initramfs before the fence is raised, or use --mode sealed "
            "--fence (sealed to PCR 15 = zeros, verified at the next boot)",
            code=ExitCode.REFUSED,
            cause=Cause.FENCE_UP,
        )
    if enrollment.persist_srk:
        _persist_srk_if_free(tpm)
    srk, parent = tpm_srk.current_srk(tpm)
    values = tpm_pcr.pcr_values(tpm, enrollment.bank, enrollment.pcrs) if enrollment.pcrs else {}
    values.update(enrollment.pcr_values)
    policy = PcrPolicy(enrollment.bank, enrollment.pcrs, values, enrollment.pin, enrollment.fence)
    endorsement = tpm_srk.endorsement_name(tpm)
    if enrollment.mode is Mode.DERIVED and policy.empty:
        return Binding(srk, parent, None, b"", endorsement)
    if enrollment.approver is None:
        return Binding(srk, parent, policy, _policy_digest(tpm, policy), endorsement)
    key = approver.load_or_create(tpm, enrollment.approver)
    policy = dataclasses.replace(policy, approver=key.approver.name)
    states = [values] if enrollment.pcr_values else approvable_states(tpm, policy)
    approvals = tuple(key.sign(tpm, dataclasses.replace(policy, values=state)) for state in states)
    return Binding(srk, parent, policy, _policy_digest(tpm, policy), endorsement, key.approver, approvals)


def approvable_states(tpm: Tpm, policy: PcrPolicy) -> list[dict[int, bytes]]:
    """The boot chain's states to approve on the running system: the current one, and the next boot's
    when it differs (a kernel installed and not yet booted). The next boot is left out, with a warning,
    when it cannot be predicted (`luks-tpm rebind` says why and tries again)."""
    states = [dict(policy.values)]
    try:
        predicted = nextboot.predict_next_boot(tpm).state(policy.bank, policy.pcrs)
    except LuksTpmError as error:
        if error.cause is not Cause.NO_EVENT_LOG:
            progress(f"warning: the next boot is not approved: {error.message}")
        return states
    return states if predicted == states[0] else [*states, predicted]


def _policy_digest(tpm: Tpm, policy: PcrPolicy) -> bytes:
    """The policy's digest, as the TPM computes it; a token is read back with the software computation's
    check (tokenformat), so a TPM that computes another one (or skips a command) writes no token."""
    digest = tpm_pcr.policy_digest(tpm, policy)
    if digest != policy.digest():
        raise TpmError(
            "the TPM computed another policy digest than its inputs give (computing the policy digest)",
            hint="the TPM, or what is between luks-tpm and it, is not working right: `luks-tpm doctor`",
            code=ExitCode.TPM_UNAVAILABLE,
            cause=Cause.TPM_FAILED,
        )
    return digest


def _persist_srk_if_free(tpm: Tpm) -> None:
    """Store the standard SRK at 0x81000001 when that handle is free (as systemd-cryptenroll does), so
    unlocking needs a ReadPublic instead of a CreatePrimary. Best effort: a TPM that refuses keeps
    working with a transient SRK."""
    if tpm_srk.persistent_handle_free(tpm):
        try:
            parent = tpm_srk.persist_srk(tpm)
            progress(f"stored the standard SRK at {parent.handle:#x} (faster unlocks; --transient-srk avoids this)")
        except LuksTpmError as error:
            progress(f"could not store the SRK persistently ({error.message}); using a transient one")


def _new_token(
    tpm: Tpm, binding: Binding, mode: Mode, device: Device, key: Secret, pin: Secret | None, extra: dict[str, Any]
) -> Token:
    """A new token that yields `key` (derived: `key` wrapped under a fresh TPM-derived KEK)."""
    fields = {**binding.fields(digest=device.default_digest(), key_size=len(key)), "extra": extra}
    if mode is Mode.DERIVED:
        salt = secrets.token_bytes(32)
        with KeyUse(tpm) as keys, binding.derived_key(keys, device.uuid, salt, derive.KEK_SIZE) as kek:
            return DerivedToken(**fields, salt=salt, wrapped_key=derive.wrap(kek, key))
    blob = tpm_keys.seal(tpm, key, binding.srk, binding.digest, pin)
    return SealedToken(**fields, pin=pin is not None, blob=blob)


def verifiable_now(tpm: Tpm, token: Token, enrollment: Enrollment) -> bool:
    """Whether the new token can be tested by recovering the key now: not when it is bound to given
    (future) PCR values, nor when it is fenced and the fence is already up."""
    if enrollment.pcr_values:
        return False
    return not (token.fence and tpm_pcr.fence_is_up(tpm))


def add_verified(device: Device, tpm: Tpm, token: Token, key: Secret, pin: Secret | None, *, verify: bool) -> int:
    """Write the token; when `verify`, prove it recovers `key` from a fresh read of the header, or take it
    back. An unverifiable token is kept (it is an additional way in, not a replacement) and says so."""
    token_id = write_token(device, token)
    if not verify:
        return token_id
    pins: PinSource | None = None if pin is None else (lambda _token_id: Secret.copy_of(pin.view()))
    try:
        with open_device(device.path) as fresh, Recovery(tpm, pins) as recovery:
            recovered = recovery.recover(fresh, token_id=token_id)
            with recovered.key:
                if not recovered.key.equals(key):
                    die("the new binding recovered a different key", code=ExitCode.BUG)
    except BaseException:
        remove_token(device, token_id)
        raise
    return token_id


@dataclasses.dataclass(frozen=True)
class Bound:
    token: Token
    token_id: int
    verified: bool


def bind(
    device: Device,
    tpm: Tpm,
    key: Secret,
    enrollment: Enrollment,
    pin: Secret | None,
    extra: dict[str, Any] | None = None,
) -> Bound:
    """Create, write and (when possible) verify a token for `key`. `extra`: unknown fields of the token
    this one replaces, kept as the contract says."""
    binding = prepare(tpm, enrollment)
    token = _new_token(tpm, binding, enrollment.mode, device, key, pin, dict(extra or {}))
    verify = verifiable_now(tpm, token, enrollment)
    return Bound(token, add_verified(device, tpm, token, key, pin, verify=verify), verify)


def unverified_note(enrollment: Enrollment) -> str:
    if enrollment.pcr_values:
        return "not verified: it is bound to the given PCR values, not the current ones"
    return f"not verified: the fence is up (PCR {FENCE_PCR}); it will be usable before the fence at the next boot"


def _no_keyslot(device: Device) -> LuksTpmError:
    return LuksTpmError(
        f"no keyslot opens with that key: {device.path} has no keyslot (formatted with --no-recovery, or erased)",
        hint="such a volume opens only with its luks-tpm tokens (`luks-tpm status`); `luks-tpm reseal` re-binds one",
        code=ExitCode.UNLOCK_FAILED,
        cause=Cause.WRONG_KEY,
    )


def volume_key_with_passphrase(device: Device, passphrase: PassphraseSource) -> Secret:
    if not device.keyslots():  # before asking for a passphrase that nothing could check
        raise _no_keyslot(device)
    with passphrase() as secret:
        try:
            _, key = device.volume_key_get(secret)
        except CryptsetupError as error:
            if error.errno == errno.EPERM:
                die(
                    "no keyslot opens with that passphrase or key file",
                    code=ExitCode.UNLOCK_FAILED,
                    cause=Cause.WRONG_KEY,
                )
            if error.errno == errno.ENOENT:  # the last keyslot went meanwhile (an erase)
                raise _no_keyslot(device) from None
            raise
    return key


# ---- enroll -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Enrolled:
    device: str
    token: int
    mode: Mode
    pcrs: tuple[int, ...]
    fence: bool
    verified: bool
    summary: str = dataclasses.field(metadata=TEXT_ONLY)  # what the token is, and how it was checked

    def lines(self) -> list[str]:
        return [self.summary]


def enroll(
    tcti: str,
    device_path: Path,
    enrollment: Enrollment,
    passphrase: PassphraseSource,
    pin: NewPinSource,
    owner_auth: Secret | None = None,
) -> Report:
    """`owner_auth`: the owner hierarchy's authorization, when it has one (proving the persistent SRK
    re-creates the SRK there); closed here."""
    path = str(device_path)
    try:
        with open_device(path, write=True) as device:
            key = volume_key_with_passphrase(device, passphrase)
            pin_secret = pin() if enrollment.pin else None
            try:
                with key, Tpm(tcti) as tpm, owner_authorization(tpm, owner_auth):
                    bound = bind(device, tpm, key, enrollment, pin_secret)
                    warnings = tuple(tpm.warnings)
            finally:
                if pin_secret is not None:
                    pin_secret.close()
    finally:
        if owner_auth is not None:
            owner_auth.close()
    token = bound.token
    checked = "verified by recovering the key" if bound.verified else unverified_note(enrollment)
    line = f"{path}: token {bound.token_id} ({token.describe()}) enrolled, {checked}"
    result = Enrolled(path, bound.token_id, token.mode, token.pcrs, token.fence, bound.verified, line)
    return Report(result, warnings)


# ---- remove -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Removed:
    device: str
    removed: int

    def lines(self) -> list[str]:
        return [f"{self.device}: token {self.removed} removed"]


def ways_in(device: Device, tcti: str | None, *, except_token: int | None = None) -> tuple[list[int], list[int]]:
    """(keyslots, luks-tpm tokens) that open the volume, or at least are not known to be dead."""
    keyslots = device.keyslots()
    entries = [e for e in luks_tpm_tokens(device) if e.token_id != except_token]
    alive = []
    tpm = None
    try:
        tpm = Tpm(tcti) if tcti is not None and any(e.token for e in entries) else None
    except LuksTpmError as error:  # no TPM now: tokens cannot be tried, so none is known to be dead
        if error.code is ExitCode.USAGE:  # but a TCTI that is refused is the command line's mistake
            raise
    try:
        for entry in entries:
            if entry.token is None:
                continue
            if tpm is None or _token_alive(device, tpm, entry.token_id):
                alive.append(entry.token_id)
    finally:
        if tpm is not None:
            tpm.close()
    return keyslots, alive


def _token_alive(device: Device, tpm: Tpm, token_id: int) -> bool:
    try:
        with Recovery(tpm) as recovery:
            recovery.recover(device, token_id=token_id).key.close()
    except LuksTpmError as error:
        failures = getattr(error, "failures", [])
        cause = failures[0].error.cause if failures else error.cause
        return cause not in DEAD_CAUSES
    return True


def remove(tcti: str, device_path: Path, token_id: int, force: bool) -> Report:
    path = str(device_path)
    with open_device(path, write=True) as device:
        if token_id not in [entry.token_id for entry in luks_tpm_tokens(device)]:
            die(
                f"{path} has no luks-tpm token {token_id}",
                hint="`luks-tpm status` lists the tokens",
                code=ExitCode.USAGE,
                cause=Cause.USAGE,
            )
        keyslots, alive = ways_in(device, tcti, except_token=token_id)
        if not keyslots and not alive and not force:
            die(
                f"token {token_id} is the last way into {path}: no keyslot, and no other token that can still "
                "recover the key",
                hint="add a passphrase first (`cryptsetup luksAddKey`), or pass --force to lose the data",
                code=ExitCode.REFUSED,
                cause=Cause.REFUSED,
            )
        remove_token(device, token_id)
    return Report(Removed(path, token_id))


# ---- persist-srk --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SrkPersisted:
    handle: str
    name: str

    def lines(self) -> list[str]:
        return [f"SRK persistent at {self.handle}, name {self.name}"]


def persist_srk(tcti: str, owner_auth: Secret | None = None) -> Report:
    """`owner_auth`: the owner hierarchy's authorization, when it has one (creating and persisting the
    SRK need it; nothing else of luks-tpm's sealed bindings does afterwards)."""
    try:
        with Tpm(tcti) as tpm, owner_authorization(tpm, owner_auth):
            parent = tpm_srk.persist_srk(tpm)
            warnings = tuple(tpm.warnings)
    finally:
        if owner_auth is not None:
            owner_auth.close()
    assert parent.handle is not None
    return Report(SrkPersisted(f"{parent.handle:#x}", parent.name.hex()), warnings)
