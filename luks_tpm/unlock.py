"""Getting a volume key back from a volume's luks-tpm tokens, and saying why not when it fails.

`KeyRecovery` is one pass over the TPM: one connection, one salted session per SRK, one derived
primary, reused for every volume (`open --all` unlocks a whole crypttab with it). Every recovered
key is verified against the LUKS2 digest before anyone sees it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from . import derive
from .cryptsetup import Device
from .errors import ExitCode, LuksTpmError, die
from .secret import Secret
from .token import TOKEN_TYPE, Mode, Token, is_ours, parse
from .tpm import Parent, Tpm, TpmError, wait_for_lockout_text

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
        if text is None or not is_ours(text):
            continue
        try:
            entries.append(TokenEntry(token_id, parse(text, token_id), None))
        except LuksTpmError as error:
            entries.append(TokenEntry(token_id, None, error))
    return entries


def digest_ids(device: Device) -> set[int]:
    return {int(digest_id) for digest_id in device.metadata().get("digests", {})}


def default_digest(device: Device) -> int:
    """The digest that verifies the key of segment 0, the one dm-crypt uses."""
    for digest_id, digest in device.metadata().get("digests", {}).items():
        if "0" in digest.get("segments", []):
            return int(digest_id)
    die(f"{device.path} has no digest for its data segment", hint="check it with `cryptsetup luksDump`")


class KeyRecovery:
    """Recovers volume keys from tokens through one TPM connection; close() flushes all it made."""

    def __init__(self, tpm: Tpm, pins: PinSource | None = None, *, many_volumes: bool = False) -> None:
        """`many_volumes`: one session serves every derivation of the pass (`open --all`); otherwise each
        derivation lets the TPM end its session, which saves a FlushContext for a single volume."""
        self.tpm = tpm
        self._pins = pins
        self._single_use = not many_volumes
        self._stack = ExitStack()
        self._parents: dict[Parent, Any] = {}
        self._sessions: dict[Parent, Any] = {}
        self._primary: Any = None

    def __enter__(self) -> KeyRecovery:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def parent(self, expected: Parent, endorsement: bytes | None) -> Any:
        if expected not in self._parents:
            try:
                self._parents[expected] = self.tpm.check_parent(expected)
            except TpmError as error:
                if not error.rc and endorsement is not None:
                    current = self.tpm.endorsement_name()
                    if current == endorsement:
                        error.message = ("the TPM owner hierarchy was cleared since this binding was made, "
                                         "which destroyed its key")
                    elif current is not None:
                        error.message = "this is a different TPM from the one this binding was made with"
                raise
        return self._parents[expected]

    def session(self, parent: Parent, endorsement: bytes | None) -> Any:
        if parent not in self._sessions:
            esys = self.parent(parent, endorsement)
            self._sessions[parent] = self._stack.enter_context(self.tpm.encrypted_session(esys))
        return self._sessions[parent]

    def derive(self, uuid: str, salt: bytes, length: int, parent: Parent, endorsement: bytes | None) -> Secret:
        session = self.session(parent, endorsement)
        if self._primary is None:
            self._primary = self._stack.enter_context(self.tpm.derived_primary())
        prk = self.tpm.hmac(self._primary, derive.hmac_message(uuid, salt), session, last_use=self._single_use)
        if self._single_use:
            del self._sessions[parent]
        with prk:
            return derive.expand(prk, uuid, length)

    def key_from_token(self, uuid: str, token_id: int, token: Token) -> Secret:
        """The volume key the token yields (not yet verified), or a LuksTpmError saying why not."""
        if token.mode is Mode.DERIVED:
            assert token.salt is not None
            if token.pcrs:
                die("PCR-bound derived tokens are not supported by this version of luks-tpm",
                    hint="upgrade luks-tpm", code=ExitCode.UNSUPPORTED)
            if token.wrapped_key is None:
                return self.derive(uuid, token.salt, token.key_size, token.parent, token.endorsement)
            with self.derive(uuid, token.salt, derive.KEK_SIZE, token.parent, token.endorsement) as kek:
                key = derive.unwrap(kek, token.wrapped_key)
            if key is None:
                die("the wrapped key does not unwrap: the token was damaged or altered",
                    hint="re-enroll with the recovery key", code=ExitCode.UNLOCK_FAILED)
            return key
        return self._unseal(token_id, token)

    def _unseal(self, token_id: int, token: Token) -> Secret:
        assert token.blob is not None
        esys = self.parent(token.parent, token.endorsement)
        changed = changed_pcrs(self.tpm, token)
        if changed:
            die(f"PCR {', '.join(map(str, changed))} ({token.pcr_bank}) changed since the key was sealed",
                hint="if the change was planned, `luks-tpm reseal` with the recovery key",
                code=ExitCode.UNLOCK_FAILED)
        pin = None
        if token.pin:
            pin = self._pins(token_id) if self._pins else None
            if pin is None:
                die("this binding needs a PIN and none was given", hint="pass --pin-file or run on a terminal",
                    code=ExitCode.UNLOCK_FAILED)
        try:
            return self.tpm.unseal(token.blob, esys, token.pcr_policy, pin)
        except TpmError as error:
            if error.wrong_auth:
                error.message += f"; {wait_for_lockout_text(self.tpm.lockout_state())}"
            elif error.code is ExitCode.LOCKED_OUT:
                state = self.tpm.lockout_state()
                error.message += (f"; it lifts after at most {state.recovery_seconds} s without failed tries"
                                  if state.recovery_seconds else "; only the lockout authorization can lift it")
            raise
        finally:
            if pin is not None:
                pin.close()


def changed_pcrs(tpm: Tpm, token: Token) -> list[int]:
    """Bound PCRs whose current value differs from the value the token records (empty if unknown)."""
    if not token.pcr_values:
        return []
    current = tpm.pcr_values(token.pcr_bank, token.pcrs)
    return [index for index in token.pcrs if token.pcr_values.get(index) not in (None, current.get(index))]


def _order(entries: list[TokenEntry], token_id: int | None) -> list[TokenEntry]:
    if token_id is not None:
        chosen = [entry for entry in entries if entry.token_id == token_id]
        if not chosen:
            die(f"there is no luks-tpm token {token_id}", hint="`luks-tpm status` lists the tokens",
                code=ExitCode.USAGE)
        return chosen
    # Derived tokens need nothing but the TPM; sealed ones may need a PIN or fail on changed PCRs.
    return sorted(entries, key=lambda entry: (entry.token is None or entry.token.mode is not Mode.DERIVED,
                                              entry.token_id))


def recover_verified(
    device: Device, recovery: KeyRecovery, *, token_id: int | None = None
) -> tuple[int, Token, Secret]:
    """Try the volume's luks-tpm tokens in order; the first key that verifies wins."""
    entries = _order(luks_tpm_tokens(device), token_id)
    if not entries:
        die(f"{device.path} has no luks-tpm token", hint="bind it first with `luks-tpm enroll`",
            code=ExitCode.UNLOCK_FAILED)
    reasons: list[str] = []
    hints: list[str] = []
    codes: set[ExitCode] = set()
    digests = digest_ids(device)
    for entry in entries:
        try:
            if entry.token is None:
                assert entry.damage is not None
                raise entry.damage
            key = _recover_one(device, recovery, entry.token_id, entry.token, digests)
            return entry.token_id, entry.token, key
        except LuksTpmError as error:
            reasons.append(f"token {entry.token_id}: {error.message}")
            if error.hint and error.hint not in hints:
                hints.append(error.hint)
            codes.add(error.code)
    # One kind of failure keeps its own exit code (lockout, unsupported version, ...); a mix is "unlock failed".
    code = codes.pop() if len(codes) == 1 else ExitCode.UNLOCK_FAILED
    raise LuksTpmError(f"cannot unlock {device.path} with the TPM: {'; '.join(reasons)}",
                       hint="; ".join([*hints, "the recovery key or passphrase still opens it (`cryptsetup open`)"]),
                       code=code)


def _recover_one(device: Device, recovery: KeyRecovery, token_id: int, token: Token, digests: set[int]) -> Secret:
    if token.digest not in digests:
        die(f"the token refers to digest {token.digest}, which the header does not have "
            "(the volume was re-encrypted or the header replaced)",
            hint="re-enroll with the recovery key", code=ExitCode.UNLOCK_FAILED)
    key = recovery.key_from_token(device.uuid or "", token_id, token)
    if len(key) != token.key_size or not device.volume_key_verify(key):
        key.close()
        die("the recovered key does not open the volume: its volume key changed since this binding was "
            "made (re-encryption?)", hint="re-enroll with the recovery key", code=ExitCode.UNLOCK_FAILED)
    return key


@contextmanager
def recovered_key(device: Device, tpm: Tpm, pins: PinSource | None = None,
                  token_id: int | None = None) -> Iterator[tuple[int, Token, Secret]]:
    with KeyRecovery(tpm, pins) as recovery:
        found = recover_verified(device, recovery, token_id=token_id)
    try:
        yield found
    finally:
        found[2].close()
