"""Decommissioning: `wipe` clears the TPM owner hierarchy, `erase` crypto-erases single volumes.

Both first list what they destroy, ask (YES typed on a terminal) unless told not to, and afterwards prove
the result instead of trusting the return code: wipe runs recovery again for every token it said would
die and requires each to fail as destroyed; erase reads the header back and requires that no keyslot
and no token is left. Neither overwrites the data area: it is ciphertext under a key that no longer
exists anywhere, which is the point of a crypto-erase (see README, "Decommissioning").

wipe changes nothing before TPM2_Clear, and holds no TPM object while it waits for the answer, so an
interruption before the clear leaves everything as it was. erase removes one thing per header write
(libcryptsetup writes both header copies with a sequence number, so each write is whole or absent),
the ways in that need no secret first: luks-tpm tokens, other tools' tokens, then the keyslots. Any
interruption leaves a subset of what was there, every remaining part unchanged, and running erase
again finishes the job.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import crypttab
from .cryptsetup import CryptsetupError, Device, header_facts, open_device
from .errors import Cause, ExitCode, LuksTpmError, UnlockFailed, die
from .model import TOKEN_TYPE, parse
from .output import Report, progress
from .prompt import read_file
from .secret import Secret

# erase needs no TPM: the TPM stack is imported by wipe's functions alone, so that erase also works where
# the TSS is missing or broken (a rescue system), and starts faster.
if TYPE_CHECKING:
    from .tpm import Tpm, owner
    from .unlock import KeyRecovery, TokenEntry

# Shows the listing, asks the question; True to go on. Dies (exit 7) when there is no one to ask.
Confirm = Callable[[list[str], str], bool]

DEFAULT_CRYPTTAB = Path("/etc/crypttab")
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


# ---- which volumes -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Found:
    path: str
    found_by: list[str]  # "argument", "crypttab NAME", "scan"
    error: str | None = None  # e.g. a crypttab entry whose device is not there


def known_volumes(
    devices: Sequence[Path],
    crypttab_path: Path | None,
    *,
    scan: bool = True,
    sys_block: Path = Path("/sys/class/block"),
    dev: Path = Path("/dev"),
) -> list[Found]:
    """The DEVICEs given, the crypttab entries marked x-luks-tpm (`crypttab_path` None: /etc/crypttab if
    it exists), and every block device whose LUKS2 header carries a luks-tpm token; each once."""
    found: dict[str, Found] = {}

    def add(path: str, how: str) -> None:
        entry = found.setdefault(os.path.realpath(path), Found(path, []))
        if how not in entry.found_by:
            entry.found_by.append(how)

    for path in devices:
        add(str(path), "argument")
    for entry in _crypttab_entries(crypttab_path):
        how = f"crypttab {entry.name}"
        try:
            add(crypttab.resolve(entry, dev, sys_block).device, how)
        except LuksTpmError as error:
            found[how] = Found(entry.device, [how], error.message)
    if scan:
        for path in _block_devices_with_tokens(sys_block, dev):
            add(str(path), "scan")
    return list(found.values())


def _crypttab_entries(path: Path | None) -> list[crypttab.Entry]:
    if path is None:
        if not DEFAULT_CRYPTTAB.exists():
            return []
        path = DEFAULT_CRYPTTAB
    return crypttab.read(path)


def _block_devices_with_tokens(sys_block: Path, dev: Path) -> Iterator[Path]:
    for block in sorted(sys_block.glob("*")) if sys_block.exists() else []:
        path = dev / block.name.replace("!", "/")  # sysfs writes "/" in device names as "!"
        facts = header_facts(path)
        if facts is None or facts.version != 2:
            continue
        try:
            with open_device(path) as device:
                if any(kind == TOKEN_TYPE for _, kind in device.tokens()):
                    yield path
        except LuksTpmError:
            continue  # not ours to judge here: a header luks-tpm cannot read carries no usable token


# ---- what dies ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Survey:
    volumes: list[dict[str, Any]]
    state: owner.ClearState
    evicted: list[owner.PersistentObject]
    platform_persistent: list[int]
    deleted_nv: list[owner.NvIndex]
    kept_nv: list[owner.NvIndex]
    endorsement: bytes | None


def survey(tpm: Tpm, found: Sequence[Found]) -> Survey:
    from .tpm import owner
    from .tpm.srk import endorsement_name

    volumes = [_survey_volume(tpm, entry) for entry in found]
    evicted, platform = owner.persistent_objects(tpm)
    deleted, kept = owner.nv_indices(tpm)
    return Survey(volumes, owner.clear_state(tpm), evicted, platform, deleted, kept, endorsement_name(tpm))


def _survey_volume(tpm: Tpm, found: Found) -> dict[str, Any]:
    from .unlock import luks_tpm_tokens

    volume: dict[str, Any] = {
        "device": found.path,
        "found_by": found.found_by,
        "uuid": None,
        "keyslots": [],
        "tokens": [],
        "other_tokens": [],
        "error": found.error,
        "affected": False,
    }
    if found.error is None:
        try:
            with open_device(found.path) as device:
                volume["uuid"] = device.uuid
                volume["keyslots"] = device.keyslots()
                volume["tokens"] = [_token_fate(tpm, entry) for entry in luks_tpm_tokens(device)]
                volume["other_tokens"] = [
                    {"id": token_id, "type": kind} for token_id, kind in device.tokens() if kind != TOKEN_TYPE
                ]
        except LuksTpmError as error:
            if "argument" in found.found_by:  # the operator named it: that is an error, not a footnote
                raise
            volume["error"] = error.message
    volume["affected"] = any(token["fate"] == Fate.DIES for token in volume["tokens"])
    volume["after"] = _after(volume)
    return volume


def _token_fate(tpm: Tpm, entry: TokenEntry) -> dict[str, Any]:
    from .tpm.srk import srk_for

    if entry.token is None:
        assert entry.damage is not None
        return {"id": entry.token_id, "summary": "damaged", "fate": str(Fate.DAMAGED), "reason": entry.damage.message}
    token = entry.token
    info: dict[str, Any] = {
        "id": entry.token_id,
        "mode": str(token.mode),
        "summary": f"{token.describe()}, created {token.created}",
        "parent": token.parent.name.hex(),
    }
    # The SRK's name says which owner seed the key came from: that alone decides what a clear does to it.
    try:
        srk_for(tpm, token.parent, token.endorsement)
        return {**info, "fate": str(Fate.DIES), "reason": None}
    except LuksTpmError as error:
        fate = {Cause.CLEARED: Fate.DEAD, Cause.OTHER_TPM: Fate.OTHER_TPM, Cause.SRK_CHANGED: Fate.UNAFFECTED}.get(
            error.cause, Fate.UNKNOWN
        )
        return {**info, "fate": str(fate), "reason": error.message}


def _after(volume: dict[str, Any]) -> str:
    """What opens the volume after the clear."""
    fates = {token["fate"] for token in volume["tokens"]}
    if volume["error"] is not None:
        return "unknown"
    if volume["keyslots"]:
        return "recoverable"
    if fates & {Fate.OTHER_TPM, Fate.UNAFFECTED, Fate.UNKNOWN, Fate.DAMAGED}:
        return "other-tpm-only"
    return "unrecoverable"


def _volume_lines(volume: dict[str, Any]) -> list[str]:
    head = f"  {volume['device']}"
    if volume["uuid"]:
        head += f" (LUKS2 {volume['uuid']})"
    lines = [f"{head}, found as {', '.join(volume['found_by'])}"]
    if volume["error"] is not None:
        return [*lines, f"    cannot be read: {volume['error']}"]
    for token in volume["tokens"]:
        fate = Fate(token["fate"])
        words = _FATE_WORDS.get(fate) or f"{fate}: {token['reason']}"
        lines.append(f"    token {token['id']}: {token['summary']}: {words}")
    for token in volume["other_tokens"]:
        lines.append(f"    token {token['id']} ({token['type']}): another tool's; if it uses this TPM, it dies too")
    if not volume["tokens"]:
        lines.append("    no luks-tpm token")
    slots = ", ".join(map(str, volume["keyslots"]))
    survivors = [str(t["id"]) for t in volume["tokens"] if t["fate"] not in _VERIFIED]
    if not volume["affected"]:
        already = " (it has no way in left already)" if volume["after"] == "unrecoverable" else ""
        return [*lines, f"    afterwards: nothing of it changes{already}"]
    lines.append(
        "    afterwards: "
        + {
            "recoverable": f"keyslot {slots} stays: its recovery key or passphrase still opens the volume",
            "other-tpm-only": f"no keyslot; only token {', '.join(survivors)} (made elsewhere) can still open it",
            "unrecoverable": "no keyslot and no other binding: the volume becomes UNRECOVERABLE",
        }[volume["after"]]
    )
    return lines


def listing(tcti: str, found: Survey) -> list[str]:
    lines = [f"Clearing the owner hierarchy of the TPM at {tcti} destroys what is marked below.", "Volumes:"]
    for volume in found.volumes:
        lines += _volume_lines(volume)
    if not found.volumes:
        lines.append(
            "  none known (DEVICE arguments, crypttab x-luks-tpm entries, block devices with a luks-tpm token)"
        )
    lines.append("Persistent objects, evicted:")
    lines += [f"  {item.handle:#x}: {item.kind}" + (f", {item.role}" if item.role else "") for item in found.evicted]
    if not found.evicted:
        lines.append("  none")
    if found.platform_persistent:
        lines.append(f"  ({len(found.platform_persistent)} persisted by the platform stay)")
    lines.append("Owner NV indices, deleted:")
    lines += [
        f"  {nv.index:#010x}: {nv.type}, {nv.size} bytes" + (f" ({', '.join(nv.attributes)})" if nv.attributes else "")
        for nv in found.deleted_nv
    ]
    if not found.deleted_nv:
        lines.append("  none")
    if found.kept_nv:
        lines.append(f"  ({len(found.kept_nv)} created by the platform stay, e.g. EK certificates)")
    lines.append(
        "Also reset to empty: the owner, endorsement and lockout authorizations. Other software's keys in "
        "this TPM's owner hierarchy die too."
    )
    return lines


def _survey_data(tcti: str, found: Survey) -> dict[str, Any]:
    return {
        "tpm": {
            "tcti": tcti,
            "endorsement": found.endorsement.hex() if found.endorsement else None,
            "disable_clear": found.state.disable_clear,
            "lockout_auth_set": found.state.lockout_auth_set,
        },
        "volumes": found.volumes,
        "persistent": [
            {"handle": f"{item.handle:#x}", "name": item.name.hex(), "kind": item.kind, "role": item.role}
            for item in found.evicted
        ],
        "nv_indices": [
            {
                "index": f"{nv.index:#010x}",
                "name": nv.name.hex(),
                "size": nv.size,
                "type": nv.type,
                "attributes": list(nv.attributes),
            }
            for nv in found.deleted_nv
        ],
    }


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
    from .tpm import Tpm, owner

    found = known_volumes(devices, crypttab_path)
    auth = _lockout_auth(lockout_auth_file)  # a bad file fails before anything is looked at
    try:
        with Tpm(tcti) as tpm:
            surveyed = survey(tpm, found)
            warnings = list(tpm.warnings)
        # The connection is closed: nothing of ours stays loaded in the TPM while the operator decides.
        lines = listing(tcti, surveyed)
        data = _survey_data(tcti, surveyed)
        if auth is not None and not surveyed.state.lockout_auth_set:
            warnings.append(
                "the TPM's lockout authorization was never set (it is empty): --lockout-auth-file is not used"
            )
            auth.close()
            auth = None
        refusal = owner.clear_refusal(surveyed.state, auth_given=auth is not None)
        if dry_run:
            outcome = "dry run: nothing was cleared" + (f"; the wipe would fail: {refusal.message}" if refusal else "")
            return Report(
                {
                    **data,
                    "dry_run": True,
                    "cleared": False,
                    "problem": None
                    if refusal is None
                    else {"message": refusal.message, "hint": refusal.hint, "code": int(refusal.code)},
                },
                [*lines, outcome],
                warnings=warnings,
                exit_code=ExitCode.OK if refusal is None else refusal.code,
            )
        if refusal is not None:
            raise refusal
        if confirm is not None and not confirm(lines, "Clear the TPM owner hierarchy, destroying all of the above?"):
            die("not clearing: the TPM was left as it was", code=ExitCode.REFUSED, cause=Cause.REFUSED)
        with Tpm(tcti) as tpm:
            owner.clear(tpm, auth, surveyed.state)
            try:
                results, verified = _verify_wipe(tpm, surveyed)
            except LuksTpmError as error:  # cleared all the same: say so, and that it is not proven
                results = ["The TPM owner hierarchy was cleared.", f"NOT VERIFIED: the check failed: {error.message}"]
                verified = False
            warnings += [warning for warning in tpm.warnings if warning not in warnings]
    finally:
        if auth is not None:
            auth.close()
    data = {**_survey_data(tcti, surveyed), "dry_run": False, "cleared": True, "verified": verified}
    return Report(
        data,
        ([] if confirm is not None else lines) + results,
        warnings=warnings,
        exit_code=ExitCode.OK if verified else ExitCode.INCOMPLETE,
    )


def _verify_wipe(tpm: Tpm, surveyed: Survey) -> tuple[list[str], bool]:
    """After the clear: every token said to die must fail as destroyed, every listed object be gone.
    Fills in the survey's token and object records ("destroyed", "check"), returns lines and the verdict."""
    from .tpm import owner
    from .unlock import KeyRecovery

    lines = ["The TPM owner hierarchy was cleared."]
    checked = failed = 0
    with KeyRecovery(tpm, many_volumes=True) as recovery:
        for volume in surveyed.volumes:
            targets = [token for token in volume["tokens"] if token["fate"] in _VERIFIED]
            if not targets:
                continue
            try:
                with open_device(volume["device"]) as device:
                    for token in targets:
                        _verify_token(device, recovery, token)
            except LuksTpmError as error:
                for token in targets:
                    token.setdefault("destroyed", False)
                    token.setdefault("check", f"could not check: {error.message}")
            for token in targets:
                checked += 1
                failed += not token["destroyed"]
                state = "destroyed" if token["destroyed"] else "NOT DESTROYED"
                lines.append(f"{volume['device']} token {token['id']}: {state}: {token['check']}")
    left, _ = owner.persistent_objects(tpm)
    remaining = {item.handle for item in left}
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
    lines.append(
        f"verified: all {checked} listed tokens are destroyed"
        if verified and checked
        else "verified: no luks-tpm token was bound to this TPM"
        if verified
        else f"NOT VERIFIED: {failed} of {checked} tokens not shown destroyed"
        + (f", {len(not_gone)} objects still there" if not_gone else "")
    )
    return lines, verified


def _verify_token(device: Device, recovery: KeyRecovery, token: dict[str, Any]) -> None:
    from .unlock import recover_verified

    try:
        recover_verified(device, recovery, token_id=token["id"]).key.close()
    except UnlockFailed as error:
        failure = error.failures[0].error
        token["destroyed"] = failure.cause in _DESTROYED
        token["check"] = failure.message
        token["check_cause"] = str(failure.cause)
        return
    token["destroyed"] = False
    token["check"] = "it still recovers the volume key"
    token["check_cause"] = None


# ---- erase -------------------------------------------------------------------------------------------


def _holders(path: str) -> list[str]:
    """What has the device (or, for an image, the loop device over it) open as a dm or md member."""
    try:
        info = os.stat(path)
    except OSError:
        return []
    blocks: list[Path] = []
    if stat.S_ISBLK(info.st_mode):
        blocks.append(Path(f"/sys/dev/block/{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"))
    else:
        real = os.path.realpath(path)
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                if backing.read_text().strip() == real:
                    blocks.append(backing.parent.parent)
            except OSError:
                continue
    return sorted(holder.name for block in blocks for holder in (block / "holders").glob("*"))


def _erase_plan(device: Device) -> dict[str, Any]:
    tokens = device.tokens()
    return {
        "device": device.path,
        "uuid": device.uuid,
        "keyslots": device.keyslots_in_header(),
        "luks_tpm_tokens": [
            {"id": token_id, "summary": _token_summary(device, token_id)}
            for token_id, kind in tokens
            if kind == TOKEN_TYPE
        ],
        "other_tokens": [{"id": token_id, "type": kind} for token_id, kind in tokens if kind != TOKEN_TYPE],
        "in_use_by": _holders(device.path),
    }


def _token_summary(device: Device, token_id: int) -> str:
    try:
        token = parse(device.token_json_get(token_id) or "", token_id)
    except LuksTpmError as error:
        return f"damaged ({error.message})"
    return f"{token.describe()}, created {token.created}"


def _erase_lines(plan: dict[str, Any]) -> list[str]:
    lines = [f"  {plan['device']} (LUKS2 {plan['uuid']}):"]
    lines += [f"    token {t['id']} (luks-tpm): {t['summary']}" for t in plan["luks_tpm_tokens"]]
    lines += [f"    token {t['id']} ({t['type']})" for t in plan["other_tokens"]]
    if plan["keyslots"]:
        lines.append(f"    keyslot {', '.join(map(str, plan['keyslots']))}: passphrases and recovery keys stop working")
    if not (plan["keyslots"] or plan["luks_tpm_tokens"] or plan["other_tokens"]):
        lines.append("    nothing left to destroy: no keyslot, no token")
    if plan["in_use_by"]:
        lines.append(
            f"    in use by {', '.join(plan['in_use_by'])}: the open mapping keeps its key in the kernel "
            "until it is closed"
        )
    return lines


def erase(devices: Sequence[Path], *, dry_run: bool, confirm: Confirm | None) -> Report:
    plans = []
    for path in devices:
        with open_device(path) as device:
            plans.append(_erase_plan(device))
    lines = [
        "Erasing destroys every keyslot and every token; afterwards nothing opens these volumes (no passphrase, "
        "no recovery key, no TPM). The data area is not overwritten: without the key it is noise."
    ]
    for plan in plans:
        lines += _erase_lines(plan)
    if dry_run:
        return Report({"volumes": plans, "dry_run": True}, [*lines, "dry run: nothing was erased"])
    if confirm is not None and not confirm(lines, "Erase these volumes for good?"):
        die("not erasing: the volumes were left as they were", code=ExitCode.REFUSED, cause=Cause.REFUSED)
    results = []
    out: list[str] = [] if confirm is not None else lines
    for plan in plans:
        result = _erase_one(plan["device"])
        results.append({**plan, **result})
        out.append(
            f"{plan['device']}: "
            + ("erased: no keyslot and no token left" if result["verified"] else f"NOT ERASED: left {result['left']}")
        )
    every = all(result["verified"] for result in results)
    return Report(
        {"volumes": results, "dry_run": False, "verified": every},
        out,
        exit_code=ExitCode.OK if every else ExitCode.INCOMPLETE,
    )


def _erase_one(path: str) -> dict[str, Any]:
    """Destroy in an order that only ever removes, one thing per write: the tokens that need no secret to
    open the volume (ours first), then the keyslots. What is there now is what gets destroyed, so a second
    run after an interruption finishes the first one's work."""
    tokens_removed: list[int] = []
    keyslots_destroyed: list[int] = []
    with open_device(path, write=True) as device:
        tokens = device.tokens()
        order = [t for t, kind in tokens if kind == TOKEN_TYPE] + [t for t, kind in tokens if kind != TOKEN_TYPE]
        try:
            for token_id in order:
                device.token_remove(token_id)
                tokens_removed.append(token_id)
            for keyslot in device.keyslots_in_header():
                device.keyslot_destroy(keyslot)
                keyslots_destroyed.append(keyslot)
        except CryptsetupError as error:
            from .provision import write_error

            raise write_error(device, error) from None
    progress(f"{path}: removed token(s) {_ids(tokens_removed)}, destroyed keyslot(s) {_ids(keyslots_destroyed)}")
    with open_device(path) as fresh:  # read back from the disk, not from what libcryptsetup holds in memory
        left = {"keyslots": fresh.keyslots_in_header(), "tokens": [token_id for token_id, _ in fresh.tokens()]}
    return {
        "tokens_removed": tokens_removed,
        "keyslots_destroyed": keyslots_destroyed,
        "left": left,
        "verified": not left["keyslots"] and not left["tokens"],
    }


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) or "none"
