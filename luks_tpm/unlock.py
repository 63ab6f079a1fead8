"""Getting a volume key back from a volume's luks-tpm tokens, and saying why not when it fails.

`KeyRecovery` is one pass over the TPM: one connection, one salted session per SRK, one derived primary
per policy, reused for every volume (`open --all`, `load-key DEV...`). Every recovered key is verified
against the LUKS2 digest before anyone sees it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from . import derive
from .cryptsetup import Device
from .errors import Cause, ExitCode, LuksTpmError, TokenFailure, UnlockFailed, die
from .model import FENCE_PCR, TOKEN_TYPE, Bank, DerivedToken, Parent, PcrPolicy, SealedToken, Token, is_ours, parse
from .secret import Secret
from .tpm import Tpm, TpmError
from .tpm import keys as tpm_keys
from .tpm import pcr as tpm_pcr
from .tpm import srk as tpm_srk

PinSource = Callable[[int], Secret | None]  # token id -> PIN, or None when none can be had


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
            entries.append(
                TokenEntry(
                    token_id,
                    None,
                    LuksTpmError(
                        f"luks-tpm token {token_id} is not valid JSON",
                        cause=Cause.CORRUPT_TOKEN,
                        hint=f"remove it with `luks-tpm remove --token-id {token_id}` and re-enroll",
                        code=ExitCode.DEVICE,
                    ),
                )
            )
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


class KeyRecovery:
    """Recovers volume keys from tokens through one TPM connection; close() flushes all it made."""

    def __init__(self, tpm: Tpm, pins: PinSource | None = None, *, many_volumes: bool = False) -> None:
        """`many_volumes`: sessions serve every recovery of the pass; otherwise each lets the TPM end its
        session after use, which saves a FlushContext for a single volume."""
        self.tpm = tpm
        self._pins = pins
        self._reuse = many_volumes
        self._stack = ExitStack()
        self._sessions: dict[tuple[int, bool], Any] = {}  # (id of the SRK handle, policy?) -> session
        self._pending: set[int] = set()  # policy sessions holding a policy that no successful command consumed
        self._pcrs: dict[tuple[Bank, tuple[int, ...]], dict[int, bytes]] = {}  # read once per pass
        self._primaries: dict[bytes, Any] = {}  # policy digest -> derived primary
        self.verified_pins: dict[int, Secret] = {}  # token id -> the PIN that unsealed it in this pass

    def __enter__(self) -> KeyRecovery:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for pin in self.verified_pins.values():
            pin.close()
        self._stack.close()

    def _session(self, srk: Any, *, policy: bool) -> tuple[Any, bool]:
        """(session, last use) for one command: reused across the pass, or one the TPM ends after use."""
        key = (id(srk), policy)
        if key not in self._sessions:
            session = self._stack.enter_context(tpm_keys.salted_session(self.tpm, srk, policy=policy))
            if not self._reuse:
                return session, True
            self._sessions[key] = session
        return self._sessions[key], False

    def _primary(self, policy: bytes) -> Any:
        if policy not in self._primaries:
            self._primaries[policy] = self._stack.enter_context(tpm_keys.derived_primary(self.tpm, policy))
        return self._primaries[policy]

    @contextmanager
    def _policy_session(self, srk: Any, policy: PcrPolicy) -> Iterator[tuple[Any, bool]]:
        """A salted policy session in which `policy` was just applied, for one command, and whether that is
        the session's last use. When a command succeeds with continueSession set, the TPM rolls the nonce
        and resets the session's policy itself (TPM 2.0 Part 1, policy sessions): a reused session needs
        PolicyRestart only after a failure left a policy in it."""
        session, last_use = self._session(srk, policy=True)
        if id(session) in self._pending:
            tpm_pcr.restart_policy(self.tpm, session)
        self._pending.add(id(session))
        try:
            tpm_pcr.apply_policy(self.tpm, session, policy, trial=False)
            yield session, last_use
        except TpmError:
            if last_use:  # the TPM did not end it: free its slot before the next token tries
                self.tpm.release(session)
            raise
        self._pending.discard(id(session))  # only reached when the command succeeded

    def derive(self, message: bytes, srk: Any, policy: PcrPolicy | None = None, policy_digest: bytes = b"") -> Secret:
        """The PRK for `message`: TPM2_HMAC by the derived primary (bound to `policy` when given)."""
        primary = self._primary(policy_digest)
        if policy is None:
            session, last_use = self._session(srk, policy=False)
            try:
                return tpm_keys.hmac(self.tpm, primary, message, session, last_use=last_use)
            except TpmError:
                if last_use:  # the TPM did not end it: free its slot before the next token tries
                    self.tpm.release(session)
                raise
        with self._policy_session(srk, policy) as (session, last_use):
            return tpm_keys.hmac(self.tpm, primary, message, session, last_use=last_use)

    def precheck(self, token: Token) -> Any:
        """What can be checked without the key: the SRK (which TPM, cleared?), the fence, changed PCRs.
        Returns the SRK handle."""
        srk = tpm_srk.srk_for(self.tpm, token.parent, token.endorsement)
        if token.pcrs or token.fence:
            self._check_pcrs(token)
        return srk

    def key_from_token(self, uuid: str, token_id: int, token: Token) -> Secret:
        """The volume key the token yields (not yet verified), or a LuksTpmError saying why not."""
        srk = self.precheck(token)
        if isinstance(token, DerivedToken):
            return self._derived(uuid, token, srk)
        return self._unseal(token_id, token, srk)

    def _derived(self, uuid: str, token: DerivedToken, srk: Any) -> Secret:
        policy = token.pcr_policy() if token.pcrs or token.fence else None
        length = token.key_size if token.wrapped_key is None else derive.KEK_SIZE
        with self.derive(derive.hmac_message(uuid, token.salt), srk, policy, token.policy) as prk:
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

    def _check_pcrs(self, token: Token) -> None:
        """Name what changed before asking the TPM (which would only say "policy not satisfied")."""
        if token.fence and tpm_pcr.fence_is_up(self.tpm):
            die(
                f"the fence is up (PCR {FENCE_PCR} is not zero): this key can only be recovered before boot completes",
                hint="recover it from the initramfs at the next boot, or use the recovery key",
                code=ExitCode.UNLOCK_FAILED,
                cause=Cause.FENCE_UP,
            )
        changed = changed_pcrs(self.tpm, token, self._current_pcrs(token) if token.pcr_values else None)
        if changed:
            die(
                f"PCR {', '.join(map(str, changed))} ({token.pcr_bank}) changed since the key was bound",
                hint="if the change was planned, `luks-tpm reseal` with the recovery key",
                code=ExitCode.UNLOCK_FAILED,
                cause=Cause.PCR_CHANGED,
            )

    def _current_pcrs(self, token: Token) -> dict[int, bytes]:
        """The token's PCRs now: read once per pass over many volumes, which mostly share their PCRs. They
        only name what changed before the TPM is asked; the TPM's own policy check decides."""
        key = (token.pcr_bank, token.pcrs)
        if key in self._pcrs:
            return self._pcrs[key]
        values = tpm_pcr.pcr_values(self.tpm, token.pcr_bank, token.pcrs)
        if self._reuse:
            self._pcrs[key] = values
        return values

    def _unseal(self, token_id: int, token: SealedToken, srk: Any) -> Secret:
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
            with self._policy_session(srk, token.pcr_policy(pin=token.pin)) as (session, last_use):
                key = tpm_keys.unseal(self.tpm, token.blob, srk, pin, session, last_use=last_use)
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


def changed_pcrs(tpm: Tpm, token: Token, current: dict[int, bytes] | None = None) -> list[int]:
    """Bound PCRs whose current value (read now unless given) differs from the value the token records
    (empty if unknown)."""
    if not token.pcr_values:
        return []
    if current is None:
        current = tpm_pcr.pcr_values(tpm, token.pcr_bank, token.pcrs)
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
            if entry.token is not None and _is_this_tpm(tpm, entry.token.parent, create=create)
        }
        if mine:
            return [e for e in entries if e.token_id in mine] + [e for e in entries if e.token_id not in mine]
    return entries


def _is_this_tpm(tpm: Tpm, parent: Parent, *, create: bool) -> bool:
    try:
        return tpm_srk.is_this_tpm(tpm, parent, create=create)
    except LuksTpmError:  # the token's own try says what is wrong
        return False


def recover_verified(device: Device, recovery: KeyRecovery, *, token_id: int | None = None) -> Recovered:
    """Try the volume's luks-tpm tokens in order; the first key that verifies wins."""
    entries = _order(luks_tpm_tokens(device), token_id, recovery.tpm)
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
            key = _recover_one(device, recovery, entry.token_id, entry.token, digests)
            return Recovered(entry.token_id, entry.token, key)
        except LuksTpmError as error:
            failures.append(TokenFailure(entry.token_id, error))
    raise UnlockFailed(device.path, failures)


def _recover_one(device: Device, recovery: KeyRecovery, token_id: int, token: Token, digests: set[int]) -> Secret:
    if token.digest not in digests:
        die(
            f"the token refers to digest {token.digest}, which the header does not have "
            "(the volume was re-encrypted or the header replaced)",
            hint="re-enroll with the recovery key",
            code=ExitCode.UNLOCK_FAILED,
            cause=Cause.WRONG_KEY,
        )
    key = recovery.key_from_token(device.uuid, token_id, token)
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


def srk_for_new_binding(tpm: Tpm) -> tuple[Any, Parent]:
    """The SRK new bindings are made under (and recorded in the token)."""
    return tpm_srk.current_srk(tpm)
