"""`luks-tpm wipe`: clear the TPM owner hierarchy (TPM2_Clear), after listing what dies, and prove it.

It lists the volumes it knows (discovery.py), each token's fate and what opens the volume afterwards, and
every other owner object that dies; asks (YES typed) unless told not to; clears with the lockout
authorization; then runs recovery again for every token it said would die and requires each to fail as
destroyed. It changes nothing before TPM2_Clear, and holds no TPM object while it waits for the answer,
so an interruption before the clear leaves everything as it was (docs/decommission.md).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path

from .cryptsetup import Device, open_device
from .discovery import Found, known_volumes
from .errors import Cause, ExitCode, LuksTpmError, UnlockFailed, die
from .model import Mode
from .output import ABSENT, OMIT_IF_NONE, TEXT_ONLY, Absent, ErrorInfo, Report
from .prompt import Confirm, read_file
from .secret import Secret
from .tokenformat import TOKEN_TYPE, Token
from .tpm import Tpm, owner
from .tpm.srk import endorsement_name, srk_for
from .unlock import Recovery, TokenEntry, luks_tpm_tokens

# How a token of a cleared TPM fails: its owner hierarchy was cleared, or (no EK recorded to tell which)
# its SRK is gone.
_DESTROYED = frozenset({Cause.CLEARED, Cause.SRK_CHANGED})


class Fate(enum.StrEnum):
    """What TPM2_Clear on this TPM does to a luks-tpm token."""

    DIES = "dies"  # bound to this TPM's owner hierarchy
    DEAD = "dead"  # already destroyed: this TPM's owner hierarchy was cleared since it was made
    OTHER_TPM = "other-tpm"  # made on another TPM: survives
    UNAFFECTED = "unaffected"  # not bound to this TPM's owner hierarchy now; whose it is cannot be told
    UNKNOWN = "unknown"  # could not be checked
    DAMAGED = "damaged"


_FATE_WORDS = {
    Fate.DIES: "DIES (bound to this TPM's owner hierarchy)",
    Fate.DEAD: "already destroyed (this TPM's owner hierarchy was cleared since it was made)",
    Fate.OTHER_TPM: "survives (another TPM's binding)",
    Fate.UNAFFECTED: "survives here (not bound to this TPM's current owner hierarchy)",
}
_VERIFIED = (Fate.DIES, Fate.DEAD)  # checked after the clear: each must fail as destroyed
_FATE_OF_CAUSE = {Cause.CLEARED: Fate.DEAD, Cause.OTHER_TPM: Fate.OTHER_TPM, Cause.SRK_CHANGED: Fate.UNAFFECTED}


@dataclasses.dataclass(frozen=True)
class TokenFate:
    id: int
    mode: Mode | None  # None: damaged
    summary: str
    parent: str | None  # the SRK's name, hex; None: damaged
    fate: Fate
    reason: str | None
    # after the clear: whether recovery now fails as destroyed, and what it says
    destroyed: bool | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)
    check: str | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)
    check_cause: str | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)

    def check_line(self, device: str) -> str:
        return f"{device} token {self.id}: {'destroyed' if self.destroyed else 'NOT DESTROYED'}: {self.check}"

    def line(self) -> str:
        words = _FATE_WORDS.get(self.fate) or f"{self.fate}: {self.reason}"
        if self.fate is Fate.DIES and self.reason:
            words = f"DIES ({self.reason})"
        return f"    token {self.id}: {self.summary}: {words}"


@dataclasses.dataclass(frozen=True)
class OtherToken:
    id: int
    type: str


@dataclasses.dataclass(frozen=True)
class VolumeFate:
    device: str
    found_by: tuple[str, ...]
    uuid: str | None
    keyslots: tuple[int, ...]
    tokens: tuple[TokenFate, ...]
    other_tokens: tuple[OtherToken, ...]
    error: str | None
    affected: bool  # the clear destroys one of its tokens
    after: str  # what opens it afterwards: recoverable, other-tpm-only, unrecoverable, unknown

    def lines(self) -> list[str]:
        head = f"  {self.device}" + (f" (LUKS2 {self.uuid})" if self.uuid else "")
        lines = [f"{head}, found as {', '.join(self.found_by)}"]
        if self.error is not None:
            return [*lines, f"    cannot be read: {self.error}"]
        lines += [token.line() for token in self.tokens]
        lines += [
            f"    token {token.id} ({token.type}): another tool's; if it uses this TPM, it dies too"
            for token in self.other_tokens
        ]
        if not self.tokens:
            lines.append("    no luks-tpm token")
        if not self.affected:
            if any(token.fate is Fate.UNKNOWN for token in self.tokens):
                return [*lines, "    afterwards: unknown: a token could not be checked (see above), and may die"]
            already = " (it has no way in left already)" if self.after == "unrecoverable" else ""
            return [*lines, f"    afterwards: nothing of it changes{already}"]
        slots = ", ".join(map(str, self.keyslots))
        survivors = ", ".join(str(token.id) for token in self.tokens if token.fate not in _VERIFIED)
        after = {
            "recoverable": f"keyslot {slots} stays: its recovery key or passphrase still opens the volume",
            "other-tpm-only": f"no keyslot; only token {survivors} (made elsewhere) can still open it",
            "unrecoverable": "no keyslot and no other binding: the volume becomes UNRECOVERABLE",
        }[self.after]
        return [*lines, f"    afterwards: {after}"]


@dataclasses.dataclass(frozen=True)
class PersistentObjectInfo:
    handle: str
    name: str
    kind: str
    role: str | None


@dataclasses.dataclass(frozen=True)
class NvIndexInfo:
    index: str
    name: str
    size: int
    type: str
    attributes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TpmInfo:
    tcti: str
    endorsement: str | None
    disable_clear: bool
    lockout_auth_set: bool


@dataclasses.dataclass(frozen=True)
class WipeReport:
    tpm: TpmInfo
    volumes: tuple[VolumeFate, ...]
    persistent: tuple[PersistentObjectInfo, ...]
    nv_indices: tuple[NvIndexInfo, ...]
    dry_run: bool
    cleared: bool
    verified: bool | Absent = ABSENT  # after a clear
    problem: ErrorInfo | Absent | None = ABSENT  # a dry run: why the wipe would fail, or null
    text: tuple[str, ...] = dataclasses.field(default=(), metadata=TEXT_ONLY)

    def lines(self) -> list[str]:
        return list(self.text)


@dataclasses.dataclass(frozen=True)
class Survey:
    """What the clear destroys, found before it (and with the TPM's state that decides whether it can)."""

    tcti: str
    volumes: tuple[VolumeFate, ...]
    state: owner.ClearState
    evicted: tuple[owner.PersistentObject, ...]
    platform_persistent: tuple[int, ...]
    deleted_nv: tuple[owner.NvIndex, ...]
    kept_nv: tuple[owner.NvIndex, ...]
    endorsement: bytes | None

    def report(
        self,
        *,
        dry_run: bool,
        cleared: bool,
        text: tuple[str, ...],
        verified: bool | Absent = ABSENT,
        problem: ErrorInfo | Absent | None = ABSENT,
    ) -> WipeReport:
        tpm = TpmInfo(
            self.tcti,
            self.endorsement.hex() if self.endorsement else None,
            self.state.disable_clear,
            self.state.lockout_auth_set,
        )
        persistent = tuple(PersistentObjectInfo(f"{o.handle:#x}", o.name.hex(), o.kind, o.role) for o in self.evicted)
        nv = tuple(NvIndexInfo(f"{n.index:#010x}", n.name.hex(), n.size, n.type, n.attributes) for n in self.deleted_nv)
        return WipeReport(tpm, self.volumes, persistent, nv, dry_run, cleared, verified, problem, text)

    def lines(self) -> list[str]:
        lines = [f"Clearing the owner hierarchy of the TPM at {self.tcti} destroys what is marked below.", "Volumes:"]
        lines += [line for volume in self.volumes for line in volume.lines()]
        if not self.volumes:
            lines.append(
                "  none known (DEVICE arguments, crypttab x-luks-tpm entries, block devices with a luks-tpm token)"
            )
        lines.append("Persistent objects, evicted:")
        lines += [f"  {o.handle:#x}: {o.kind}" + (f", {o.role}" if o.role else "") for o in self.evicted] or ["  none"]
        if self.platform_persistent:
            lines.append(f"  ({len(self.platform_persistent)} persisted by the platform stay)")
        lines.append("Owner NV indices, deleted:")
        lines += [
            f"  {nv.index:#010x}: {nv.type}, {nv.size} bytes"
            + (f" ({', '.join(nv.attributes)})" if nv.attributes else "")
            for nv in self.deleted_nv
        ] or ["  none"]
        if self.kept_nv:
            lines.append(f"  ({len(self.kept_nv)} created by the platform stay, e.g. EK certificates)")
        lines.append(
            "Also reset to empty: the owner, endorsement and lockout authorizations. Other software's keys in "
            "this TPM's owner hierarchy die too."
        )
        return lines


# ---- what dies ---------------------------------------------------------------------------------------


def survey(tpm: Tpm, tcti: str, found: Sequence[Found]) -> Survey:
    volumes = tuple(_survey_volume(tpm, entry) for entry in found)
    evicted, platform = owner.persistent_objects(tpm)
    deleted, kept = owner.nv_indices(tpm)
    state = owner.clear_state(tpm)
    return Survey(
        tcti, volumes, state, tuple(evicted), tuple(platform), tuple(deleted), tuple(kept), endorsement_name(tpm)
    )


def _survey_volume(tpm: Tpm, found: Found) -> VolumeFate:
    uuid: str | None = None
    keyslots: tuple[int, ...] = ()
    tokens: tuple[TokenFate, ...] = ()
    others: tuple[OtherToken, ...] = ()
    error = found.error
    if error is None:
        try:
            with open_device(found.path) as device:
                uuid, keyslots = device.uuid, tuple(device.keyslots())
                tokens = tuple(_token_fate(tpm, entry) for entry in luks_tpm_tokens(device))
                others = tuple(OtherToken(token_id, kind) for token_id, kind in device.tokens() if kind != TOKEN_TYPE)
        except LuksTpmError as failure:
            if "argument" in found.found_by:  # the operator named it: that is an error, not a footnote
                raise
            error = failure.message
    affected = any(token.fate is Fate.DIES for token in tokens)
    return VolumeFate(found.path, found.found_by, uuid, keyslots, tokens, others, error, affected,
                      _after(error, keyslots, tokens))  # fmt: skip


def _token_fate(tpm: Tpm, entry: TokenEntry) -> TokenFate:
    if entry.token is None:
        assert entry.damage is not None
        return TokenFate(entry.token_id, None, "damaged", None, Fate.DAMAGED, entry.damage.message)
    token = entry.token
    fate = TokenFate(
        entry.token_id, token.mode, f"{token.describe()}, created {token.created}", token.parent.name.hex(),
        Fate.DIES, None,
    )  # fmt: skip
    # The SRK's name says which owner seed the key came from: that alone decides what a clear does to it.
    try:
        srk_for(tpm, token.parent, token.endorsement)
        return fate
    except LuksTpmError as error:
        if error.cause in (Cause.NO_TPM, Cause.TPM_FAILED):  # no list can be made without a working TPM
            raise
        if error.cause in (Cause.OWNER_AUTH, Cause.HIERARCHY_DISABLED):
            return _fate_by_endorsement(tpm, fate, token, error)
        return dataclasses.replace(fate, fate=_FATE_OF_CAUSE.get(error.cause, Fate.UNKNOWN), reason=error.message)


def _fate_by_endorsement(tpm: Tpm, fate: TokenFate, token: Token, error: LuksTpmError) -> TokenFate:
    """When the owner hierarchy cannot give the SRK (an owner authorization is set, or the hierarchy is
    disabled), the endorsement key still tells whose token it is: one made on this TPM dies with the clear
    (unless a clear killed it already: dead either way), another TPM's survives."""
    current = endorsement_name(tpm)
    if token.endorsement is None or current is None:
        return dataclasses.replace(fate, fate=Fate.UNKNOWN, reason=error.message)
    if current != token.endorsement:
        return dataclasses.replace(fate, fate=Fate.OTHER_TPM, reason="its endorsement key is another TPM's")
    return dataclasses.replace(
        fate, reason=f"made on this TPM (its endorsement key); its SRK cannot be checked ({error.message})"
    )


def _after(error: str | None, keyslots: tuple[int, ...], tokens: tuple[TokenFate, ...]) -> str:
    """What opens the volume after the clear."""
    if error is not None:
        return "unknown"
    if keyslots:
        return "recoverable"
    if {token.fate for token in tokens} & {Fate.OTHER_TPM, Fate.UNAFFECTED, Fate.UNKNOWN, Fate.DAMAGED}:
        return "other-tpm-only"
    return "unrecoverable"


# ---- wipe --------------------------------------------------------------------------------------------


def _lockout_auth(path: Path | None) -> Secret | None:
    """The lockout authorization's exact bytes; an empty file is the empty authorization."""
    if path is None:
        return None
    if str(path) != "-" and path.is_file() and path.stat().st_size == 0:
        return None
    return read_file(path, what="lockout authorization", option="--lockout-auth-file", limit=64)


def wipe(
    tcti: str,
    devices: Sequence[Path],
    *,
    crypttab_path: Path | None,
    lockout_auth_file: Path | None,
    dry_run: bool,
    confirm: Confirm | None,
) -> Report:
    """`confirm` None: the operator said --yes (the listing goes into the report instead)."""
    found = known_volumes(devices, crypttab_path)
    auth = _lockout_auth(lockout_auth_file)  # a bad file fails before anything is looked at
    try:
        with Tpm(tcti) as tpm:
            surveyed = survey(tpm, tcti, found)
            warnings = list(tpm.warnings)
        # The connection is closed: nothing of ours stays loaded in the TPM while the operator decides.
        if auth is not None and not surveyed.state.lockout_auth_set:
            warnings.append(
                "the TPM's lockout authorization was never set (it is empty): --lockout-auth-file is not used"
            )
            auth.close()
            auth = None
        refusal = owner.clear_refusal(surveyed.state, auth_given=auth is not None)
        if dry_run:
            return _dry_run(surveyed, refusal, tuple(warnings))
        if refusal is not None:
            raise refusal
        if confirm is not None and not confirm(
            surveyed.lines(), "Clear the TPM owner hierarchy, destroying all of the above?"
        ):
            die("not clearing: the TPM was left as it was", code=ExitCode.REFUSED, cause=Cause.REFUSED)
        return _clear_and_verify(tcti, surveyed, auth, warnings, listed=confirm is not None)
    finally:
        if auth is not None:
            auth.close()


def _dry_run(surveyed: Survey, refusal: LuksTpmError | None, warnings: tuple[str, ...]) -> Report:
    outcome = "dry run: nothing was cleared" + (f"; the wipe would fail: {refusal.message}" if refusal else "")
    problem = None if refusal is None else dataclasses.replace(ErrorInfo.of(refusal), failures=None)
    report = surveyed.report(dry_run=True, cleared=False, problem=problem, text=(*surveyed.lines(), outcome))
    return Report(report, warnings, exit_code=ExitCode.OK if refusal is None else refusal.code)


def _clear_and_verify(tcti: str, surveyed: Survey, auth: Secret | None, warnings: list[str], *, listed: bool) -> Report:
    with Tpm(tcti) as tpm:
        owner.clear(tpm, auth, surveyed.state)
        try:
            surveyed, results, verified = _verify_wipe(tpm, surveyed)
        except LuksTpmError as error:  # cleared all the same: say so, and that it is not proven
            results = ["The TPM owner hierarchy was cleared.", f"NOT VERIFIED: the check failed: {error.message}"]
            verified = False
        warnings += [warning for warning in tpm.warnings if warning not in warnings]
    text = ([] if listed else surveyed.lines()) + results
    report = surveyed.report(dry_run=False, cleared=True, verified=verified, text=tuple(text))
    return Report(report, tuple(warnings), exit_code=ExitCode.OK if verified else ExitCode.INCOMPLETE)


def _verify_wipe(tpm: Tpm, surveyed: Survey) -> tuple[Survey, list[str], bool]:
    """After the clear: every token said to die must fail as destroyed, every listed object be gone.
    Returns the survey with each token's check filled in, the lines saying so, and the verdict."""
    lines = ["The TPM owner hierarchy was cleared."]
    volumes = []
    with Recovery(tpm, many_volumes=True) as recovery:
        for volume in surveyed.volumes:
            checked = _verify_volume(recovery, volume)
            volumes.append(checked)
            lines += [token.check_line(volume.device) for token in checked.tokens if token.fate in _VERIFIED]
    tokens = [token for volume in volumes for token in volume.tokens if token.fate in _VERIFIED]
    failed = sum(not token.destroyed for token in tokens)
    remaining = {item.handle for item in owner.persistent_objects(tpm)[0]}
    nv_left = {nv.index for nv in owner.nv_indices(tpm)[0]}
    not_gone = [f"{item.handle:#x}" for item in surveyed.evicted if item.handle in remaining]
    not_gone += [f"NV {nv.index:#010x}" for nv in surveyed.deleted_nv if nv.index in nv_left]
    if surveyed.evicted or surveyed.deleted_nv:
        state = f"still there: {', '.join(not_gone)}" if not_gone else "gone"
        lines.append(
            f"listed persistent objects ({len(surveyed.evicted)}) and owner NV indices "
            f"({len(surveyed.deleted_nv)}): {state}"
        )
    verified = not failed and not not_gone
    if verified:
        lines.append(f"verified: all {len(tokens)} listed tokens are destroyed" if tokens else
                     "verified: no luks-tpm token was bound to this TPM")  # fmt: skip
    else:
        left = f", {len(not_gone)} objects still there" if not_gone else ""
        lines.append(f"NOT VERIFIED: {failed} of {len(tokens)} tokens not shown destroyed{left}")
    return dataclasses.replace(surveyed, volumes=tuple(volumes)), lines, verified


def _verify_volume(recovery: Recovery, volume: VolumeFate) -> VolumeFate:
    if not any(token.fate in _VERIFIED for token in volume.tokens):
        return volume
    try:
        with open_device(volume.device) as device:
            tokens = tuple(
                _verify_token(device, recovery, token) if token.fate in _VERIFIED else token for token in volume.tokens
            )
    except LuksTpmError as error:
        tokens = tuple(
            dataclasses.replace(token, destroyed=False, check=f"could not check: {error.message}")
            if token.fate in _VERIFIED
            else token
            for token in volume.tokens
        )
    return dataclasses.replace(volume, tokens=tokens)


def _verify_token(device: Device, recovery: Recovery, token: TokenFate) -> TokenFate:
    try:
        recovery.recover(device, token_id=token.id).key.close()
    except UnlockFailed as error:
        failure = error.failures[0].error
        return dataclasses.replace(
            token, destroyed=failure.cause in _DESTROYED, check=failure.message, check_cause=str(failure.cause)
        )
    return dataclasses.replace(token, destroyed=False, check="it still recovers the volume key")
