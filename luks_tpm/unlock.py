"""Recovering a volume's key from its luks-tpm tokens: which tokens, in which order, what each yields, and
whether that key really opens the volume. The TPM work itself is tpm.keyuse's."""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from . import derive
from .cryptsetup import Device
from .errors import Cause, ExitCode, LuksTpmError, TokenFailure, UnlockFailed, die
from .model import FENCE_PCR, Approval, ApprovedState, ImportedSeal, PcrPolicy
from .prompt import PinSource
from .secret import Secret
from .tokenformat import TOKEN_TYPE, DerivedToken, SealedToken, Token, is_ours, parse
from .tpm import Tpm, TpmError
from .tpm import srk as tpm_srk
from .tpm.keyuse import KeyUse


@dataclasses.dataclass(frozen=True)
class TokenEntry:
    token_id: int
    token: Token | None
    damage: LuksTpmError | None  # why the token could not be parsed


def luks_tpm_tokens(device: Device) -> list[TokenEntry]:
    """Every luks-tpm token on the volume, damaged ones included (they are reported, not fatal)."""
    entries = []
    for token_id, token_type in device.tokens():
        if token_type != TOKEN_TYPE:
            continue
        text = device.token_json_get(token_id)
        if text is None:
            continue
        if not is_ours(text):
            damage = LuksTpmError(
                f"luks-tpm token {token_id} is not valid JSON",
                code=ExitCode.DEVICE,
                cause=Cause.CORRUPT_TOKEN,
                hint=f"remove it with `luks-tpm remove --token-id {token_id}` and re-enroll",
            )
            entries.append(TokenEntry(token_id, None, damage))
            continue
        try:
            entries.append(TokenEntry(token_id, parse(text, token_id), None))
        except LuksTpmError as error:
            entries.append(TokenEntry(token_id, None, error))
    return entries


@dataclasses.dataclass(frozen=True)
class Recovered:
    token_id: int
    token: Token
    key: Secret


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a token's recovery uses: the SRK's handle, and the approved state (tokens with an approver)."""

    srk: Any
    approved: ApprovedState | None

    def policy(self, token: Token, *, pin: bool = False) -> PcrPolicy:
        """The policy to satisfy now: the token's, for the approved state the PCRs are in."""
        return token.pcr_policy(pin=pin, values=self.approved.approval.values if self.approved else None)


class Recovery:
    """Recovers volume keys from tokens over one TPM connection: `many_volumes` shares the TPM's sessions,
    primaries and PCR reads across the pass. close() flushes what it made and zeroes the PINs it kept."""

    def __init__(self, tpm: Tpm, pins: PinSource | None = None, *, many_volumes: bool = False) -> None:
        self.tpm = tpm
        self.keys = KeyUse(tpm, many_volumes=many_volumes)
        self._pins = pins
        self.verified_pins: dict[int, Secret] = {}  # token id -> the PIN that unsealed it in this pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for pin in self.verified_pins.values():
            pin.close()
        self.keys.close()

    def recover(self, device: Device, *, token_id: int | None = None) -> Recovered:
        """Try the volume's luks-tpm tokens in order; the first key that verifies wins."""
        entries = _order(luks_tpm_tokens(device), token_id, self.tpm)
        if not entries:
            die(
                f"{device.path} has no luks-tpm token",
                hint="bind it first with `luks-tpm enroll`",
                code=ExitCode.UNLOCK_FAILED,
                cause=Cause.NO_TOKEN,
            )
        failures: list[TokenFailure] = []
        digests = device.digest_ids()
        for entry in entries:
            try:
                if entry.token is None:
                    assert entry.damage is not None
                    raise entry.damage
                return Recovered(
                    entry.token_id, entry.token, self._verified_key(device, entry.token_id, entry.token, digests)
                )
            except LuksTpmError as error:
                failures.append(TokenFailure(entry.token_id, error))
        raise UnlockFailed(device.path, failures)

    def precheck(self, token: Token) -> Prepared:
        """What can be checked without the key: the SRK (which TPM, cleared?), the fence, changed PCRs, and
        for a token with an approver the approved state the PCRs are in now."""
        imported = isinstance(token, SealedToken) and isinstance(token.blob, ImportedSeal)
        srk = self.keys.srk(token.parent, token.endorsement, imported=imported)
        if token.fence and self.keys.fence_is_up():
            die(
                f"the fence is up (PCR {FENCE_PCR} is not zero): this key can only be recovered before boot completes",
                hint="recover it from the initramfs at the next boot, or use the recovery key",
                code=ExitCode.UNLOCK_FAILED,
                cause=Cause.FENCE_UP,
            )
        if token.pcr_values:  # name what changed before asking the TPM, which would only say "policy"
            changed = changed_pcrs(token, self.keys.pcr_values(token.pcr_bank, token.pcrs))
            if changed:
                die(
                    f"PCR {', '.join(map(str, changed))} ({token.pcr_bank}) changed since the key was bound",
                    hint="if the change was planned, `luks-tpm reseal` with the recovery key",
                    code=ExitCode.UNLOCK_FAILED,
                    cause=Cause.PCR_CHANGED,
                )
        if token.approver is None:
            return Prepared(srk, None)
        return Prepared(srk, ApprovedState(token.approver, self._approval(token)))

    def _approval(self, token: Token) -> Approval:
        """The approval whose state the bound PCRs are in now (the TPM checks it again: this one only
        names what changed)."""
        current = self.keys.pcr_values(token.pcr_bank, token.pcrs)
        for approval in token.approvals:
            if approval.values == current:
                return approval
        differing = [i for i in token.pcrs if all(a.values.get(i) != current.get(i) for a in token.approvals)]
        die(
            f"PCR {', '.join(map(str, differing or token.pcrs))} ({token.pcr_bank}) match none of the "
            f"{len(token.approvals)} approved boot states",
            hint="`luks-tpm rebind` on the running system approves what boots next (the kernel hooks run it); "
            "this boot needs the recovery key",
            code=ExitCode.UNLOCK_FAILED,
            cause=Cause.PCR_CHANGED,
        )

    def _verified_key(self, device: Device, token_id: int, token: Token, digests: set[int]) -> Secret:
        if token.digest not in digests:
            die(
                f"the token refers to digest {token.digest}, which the header does not have "
                "(the volume was re-encrypted or the header replaced)",
                hint="re-enroll with the recovery key",
                code=ExitCode.UNLOCK_FAILED,
                cause=Cause.WRONG_KEY,
            )
        key = self.key_from_token(device.uuid, token_id, token)
        if len(key) != token.key_size or not device.volume_key_verify(key):
            key.close()
            die(
                "the recovered key does not open the volume: its volume key changed since this binding was "
                "made (re-encryption?)",
                hint="re-enroll with the recovery key",
                code=ExitCode.UNLOCK_FAILED,
                cause=Cause.WRONG_KEY,
            )
        return key

    def key_from_token(self, uuid: str, token_id: int, token: Token) -> Secret:
        """The volume key the token yields (not yet verified), or a LuksTpmError saying why not."""
        prepared = self.precheck(token)
        if isinstance(token, DerivedToken):
            return self._derived(uuid, token, prepared)
        return self._unseal(token_id, token, prepared)

    def _derived(self, uuid: str, token: DerivedToken, prepared: Prepared) -> Secret:
        policy = prepared.policy(token) if token.pcrs or token.fence else None
        length = token.key_size if token.wrapped_key is None else derive.KEK_SIZE
        message = derive.hmac_message(uuid, token.salt)
        with self.keys.hmac(prepared.srk, message, policy, token.policy, prepared.approved) as prk:
            okm = derive.expand(prk, uuid, length)
        if token.wrapped_key is None:
            return okm
        with okm:
            key = derive.unwrap(okm, token.wrapped_key)
        if key is None:
            die(
                "the wrapped key does not unwrap: the token was damaged or altered",
                hint="re-enroll with the recovery key",
                code=ExitCode.UNLOCK_FAILED,
                cause=Cause.WRONG_KEY,
            )
        return key

    def _unseal(self, token_id: int, token: SealedToken, prepared: Prepared) -> Secret:
        pin = None
        if token.pin:
            pin = self._pins(token_id) if self._pins else None
            if pin is None:
                die(
                    "this binding needs a PIN and none was given",
                    hint="pass --pin-file or run on a terminal",
                    code=ExitCode.UNLOCK_FAILED,
                    cause=Cause.NEEDS_PIN,
                )
        try:
            policy = prepared.policy(token, pin=token.pin)
            key = self.keys.unseal(prepared.srk, token.blob, policy, pin, prepared.approved)
        except TpmError as error:
            if pin is not None:
                pin.close()
            raise _with_lockout_state(self.tpm, error) from None
        if pin is not None:
            self.verified_pins[token_id] = pin
        return key


def _with_lockout_state(tpm: Tpm, error: TpmError) -> TpmError:
    """The same error, saying how many tries are left or when a lockout lifts."""
    from .tpm.info import lockout_state  # here: only a failed PIN asks

    if error.cause is Cause.WRONG_PIN:
        detail = lockout_state(tpm).describe()
    elif error.cause is Cause.LOCKED_OUT:
        state = lockout_state(tpm)
        detail = (
            f"it lifts after at most {state.recovery_seconds} s without failed tries"
            if state.recovery_seconds
            else "only the lockout authorization can lift it"
        )
    else:
        return error
    return TpmError(f"{error.message}; {detail}", hint=error.hint, code=error.code, cause=error.cause, rc=error.rc)


def changed_pcrs(token: Token, current: dict[int, bytes]) -> list[int]:
    """Bound PCRs whose current value differs from the value the token records (none when it records none)."""
    return [index for index in token.pcrs if token.pcr_values.get(index) not in (None, current.get(index))]


def _order(entries: list[TokenEntry], token_id: int | None, tpm: Tpm) -> list[TokenEntry]:
    if token_id is not None:
        chosen = [entry for entry in entries if entry.token_id == token_id]
        if not chosen:
            die(
                f"there is no luks-tpm token {token_id}",
                hint="`luks-tpm status` lists the tokens",
                code=ExitCode.USAGE,
                cause=Cause.USAGE,
            )
        return chosen
    # Derived tokens need nothing but the TPM; sealed ones may need a PIN or fail on changed PCRs.
    return _this_tpm_first(
        tpm, sorted(entries, key=lambda entry: (not isinstance(entry.token, DerivedToken), entry.token_id))
    )


def _this_tpm_first(tpm: Tpm, entries: list[TokenEntry]) -> list[TokenEntry]:
    """A volume that moves between machines carries tokens of several TPMs: try this TPM's first, known by
    SRK name alone, so that when one of them recovers the key the others' are never touched (no EK made
    to name them, no sealed object of theirs loaded). Cheap names first (a persistent SRK's), then the
    re-created SRK's; without a match the order stays and each token says why it fails."""
    parents = {entry.token.parent.name for entry in entries if entry.token is not None}
    if len(parents) < 2:  # one SRK for every token: nothing to choose
        return entries
    for create in (False, True):
        mine = {
            entry.token_id
            for entry in entries
            if entry.token is not None and _is_this_tpm(tpm, entry.token, create=create)
        }
        if mine:
            return [e for e in entries if e.token_id in mine] + [e for e in entries if e.token_id not in mine]
    return entries


def _is_this_tpm(tpm: Tpm, token: Token, *, create: bool) -> bool:
    try:
        return tpm_srk.is_this_tpm(tpm, token.parent, create=create)
    except LuksTpmError:  # the token's own try says what is wrong
        return False
