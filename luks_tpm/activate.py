"""Using bindings: load-key, open, open --all and status.

The volume key goes from the TPM into a `Secret`, is verified against the LUKS2 digest, and then
only into the kernel: a logon key `cryptsetup:<uuid>-d<digest>` (load-key) or a dm-crypt table
that references such a key (open). It never reaches a file, pipe, argv or the environment.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cryptsetup, keyring
from .cryptsetup import Device, open_device
from .errors import Cause, ExitCode, LuksTpmError, UnlockFailed, die
from .model import FENCE_BANK, FENCE_PCR, Token
from .output import Report, error_data, progress
from .secret import Secret
from .settings import Activation
from .tpm import Tpm
from .tpm import pcr as tpm_pcr
from .unlock import KeyRecovery, PinSource, changed_pcrs, luks_tpm_tokens, recover_verified

if TYPE_CHECKING:
    from .crypttab import Entry


def key_description(device: Device, digest: int) -> str:
    return f"cryptsetup:{device.uuid}-d{digest}"


def dm_table(device: Device, digest: int, key_size: int) -> str:
    """The dm-crypt table line libcryptsetup would load, with the key referenced from the keyring."""
    segment = device.metadata()["segments"]["0"]
    offset = int(segment["offset"]) // 512
    size = segment["size"]
    if size == "dynamic":
        with open(device.path, "rb") as handle:
            sectors = handle.seek(0, 2) // 512 - offset
    else:
        sectors = int(size) // 512
    sector_size = int(segment.get("sector_size", 512))
    iv_offset = int(segment.get("iv_tweak", "0"))
    options = [] if sector_size == 512 else [f"sector_size:{sector_size}"]
    if sector_size != 512:
        options.append("iv_large_sectors")
        iv_offset = iv_offset * 512 // sector_size
    key = f":{key_size}:logon:{key_description(device, digest)}"
    line = f"0 {sectors} crypt {segment['encryption']} {key} {iv_offset} {device.path} {offset}"
    return line + (f" {len(options)} {' '.join(options)}" if options else "")


def load_keys(
    tcti: str,
    device_paths: Sequence[Path],
    target: int,
    timeout: int | None,
    table: bool,
    token_id: int | None,
    pins: PinSource,
) -> Report:
    """Recover each device's key in one TPM pass and add it as a logon key; every device is tried, and the
    command fails (exit 5 or the single failure's own code) if any could not be loaded."""
    results: list[dict[str, Any]] = []
    lines: list[str] = []
    failures: list[LuksTpmError] = []
    with Tpm(tcti) as tpm, KeyRecovery(tpm, pins, many_volumes=len(device_paths) > 1) as recovery:
        for path in device_paths:
            try:
                with open_device(path) as device:
                    result = _load_one(device, recovery, target, timeout, table, token_id)
                results.append(result)
                lines += [str(result["serial"])] + ([result["table"]] if table else [])
            except LuksTpmError as error:
                if len(device_paths) == 1:
                    raise
                failures.append(error)
                results.append({"device": str(path), "error": error_data(error)})
                progress(f"{path}: {error.message}")
        warnings = list(tpm.warnings)
    data: dict[str, Any] = results[0] if len(device_paths) == 1 else {"volumes": results}
    code = ExitCode.OK if not failures else failures[0].code if len(failures) == 1 else ExitCode.UNLOCK_FAILED
    return Report(data, lines, warnings=warnings, exit_code=code)


def _load_one(
    device: Device, recovery: KeyRecovery, target: int, timeout: int | None, table: bool, token_id: int | None
) -> dict[str, Any]:
    found = recover_verified(device, recovery, token_id=token_id)
    description = key_description(device, found.token.digest)
    with found.key:
        serial = _add_replacing(description, found.key, target)
    keyring.set_permissions(serial, keyring.logon_key_permissions())
    if timeout:
        keyring.set_timeout(serial, timeout)
    # The keyring's own serial, not a special id such as -3 (@s), which means another keyring to each process.
    result: dict[str, Any] = {
        "device": device.path,
        "serial": serial,
        "description": description,
        "keyring": keyring.keyring_id(target),
        "token": found.token_id,
    }
    if table:
        result["table"] = dm_table(device, found.token.digest, found.token.key_size)
    return result


def _add_replacing(description: str, key: Secret, target: int) -> int:
    """Add the logon key, replacing one of the same name: ours have no WRITE permission, so they cannot be
    updated in place. Another luks-tpm may add the same key between our unlink and our add (two unlocks of
    one volume at once): then unlink and add again."""
    for _attempt in range(5):
        existing = keyring.search(target, "logon", description)
        if existing is not None:
            # (the search also finds keys in keyrings nested in `target`, which stay where they are)
            with contextlib.suppress(keyring.KeyringError):
                keyring.unlink(existing, target)
        try:
            return keyring.add_logon_key(description, key, target)
        except keyring.KeyringError as error:
            if error.errno != errno.EACCES:
                die(f"cannot add the logon key {description}: {error}", code=ExitCode.DEVICE, cause=Cause.GENERIC)
    die(
        f"cannot add the logon key {description}: another process keeps adding it",
        hint="run the command again",
        cause=Cause.GENERIC,
        code=ExitCode.DEVICE,
    )


def _activate(device: Device, name: str, key: Secret, options: Activation) -> None:
    """Activate from a thread of its own: libcryptsetup leaves the logon key in the thread keyring,
    which the kernel drops when the thread exits."""
    flags = cryptsetup.ACTIVATE_KEYRING_KEY
    if options.readonly:
        flags |= cryptsetup.ACTIVATE_READONLY
    if options.allow_discards:
        flags |= cryptsetup.ACTIVATE_ALLOW_DISCARDS
    failure: list[BaseException] = []

    def run() -> None:
        try:
            device.activate_by_volume_key(name, key, flags)
        except BaseException as error:  # re-raised in the caller
            failure.append(error)

    worker = threading.Thread(target=run, name="luks-tpm-activate")
    worker.start()
    worker.join()
    if failure:
        error = failure[0]
        if isinstance(error, cryptsetup.CryptsetupError):
            die(
                f"activating {name} failed: {error}",
                hint="is the name already in use? (`dmsetup ls`)",
                code=ExitCode.DEVICE,
            )
        raise error


def _require_device_mapper() -> None:
    if not cryptsetup.device_mapper_available():
        die(
            "device-mapper is not available here; use load-key",
            hint="load the dm_crypt module, or load the key with `luks-tpm load-key --table`",
            code=ExitCode.UNSUPPORTED,
        )


def open_volume(
    tcti: str, device_path: Path, name: str, options: Activation, token_id: int | None, pins: PinSource
) -> Report:
    _require_device_mapper()
    with open_device(device_path) as device, Tpm(tcti) as tpm, KeyRecovery(tpm, pins) as recovery:
        found = recover_verified(device, recovery, token_id=token_id)
        with found.key:
            _activate(device, name, found.key, options)
        warnings = list(tpm.warnings)
    return Report(
        {"device": str(device_path), "name": name, "token": found.token_id},
        [f"{device_path}: opened as /dev/mapper/{name} (token {found.token_id})"],
        warnings=warnings,
    )


def open_all(tcti: str, entries: Sequence[Entry], pins: PinSource) -> Report:
    """Unlock every entry in one TPM pass; failures are reported and left for the passphrase path."""
    from . import crypttab

    _require_device_mapper()
    results: list[dict[str, Any]] = []
    with Tpm(tcti) as tpm, KeyRecovery(tpm, pins, many_volumes=True) as recovery:
        for entry in entries:
            try:
                resolved = crypttab.resolve(entry)
                with open_device(resolved.device) as device:
                    found = recover_verified(device, recovery)
                    with found.key:
                        _activate(
                            device,
                            entry.name,
                            found.key,
                            Activation(readonly=entry.readonly, allow_discards=entry.discard),
                        )
                results.append({"name": entry.name, "device": entry.device, "opened": True, "token": found.token_id})
                progress(f"{entry.name}: opened")
            except LuksTpmError as error:
                results.append(
                    {"name": entry.name, "device": entry.device, "opened": False, "error": error_data(error)}
                )
                progress(f"{entry.name}: {error.message}; falling back to passphrase")
    failed = [result for result in results if not result["opened"]]
    if failed:
        progress(
            f"{len(failed)} of {len(results)} volumes could not be opened with the TPM; they are left for "
            "the passphrase prompt"
        )
    return Report({"volumes": results}, [], exit_code=ExitCode.UNLOCK_FAILED if failed else ExitCode.OK)


def status(tcti: str, devices: Sequence[Path]) -> Report:
    """Per volume and token: what it is, and whether it would unlock now (tried, then zeroed). Exit 5
    when some volume would not unlock now, so fleets can ask "will this machine boot unattended?"."""
    volumes: list[dict[str, Any]] = []
    lines: list[str] = []
    tpm: Tpm | None = None
    tpm_error: LuksTpmError | None = None
    try:
        tpm = Tpm(tcti)
    except LuksTpmError as error:
        tpm_error = error
    try:
        fence_up = tpm_pcr.fence_is_up(tpm) if tpm is not None else None
        for path in devices:
            volume = _volume_status(path, tpm, tpm_error, alone=len(devices) == 1)
            volumes.append(volume)
            lines += volume.pop("_lines")
        warnings = list(tpm.warnings) if tpm is not None else []
    finally:
        if tpm is not None:
            tpm.close()
    if fence_up is not None:
        state = "up: fenced tokens cannot be recovered until reboot" if fence_up else "down"
        lines.append(f"fence (PCR {FENCE_PCR}): {state}")
    every = all(volume["unlocks"] for volume in volumes)
    return Report(
        {"volumes": volumes, "fence_up": fence_up, "unlocks": every},
        lines,
        warnings=warnings,
        exit_code=ExitCode.OK if every else ExitCode.UNLOCK_FAILED,
    )


def _volume_status(path: Path, tpm: Tpm | None, tpm_error: LuksTpmError | None, *, alone: bool) -> dict[str, Any]:
    try:
        with open_device(path) as device:
            volume: dict[str, Any] = {
                "device": str(path),
                "uuid": device.uuid,
                "keyslots": device.keyslots(),
                "tokens": [],
                "error": None,
            }
            lines = [f"{path}: LUKS2 {device.uuid}, keyslots {volume['keyslots'] or 'none'}"]
            for entry in luks_tpm_tokens(device):
                info = _token_status(device, tpm, tpm_error, entry.token_id, entry.token, entry.damage)
                volume["tokens"].append(info)
                lines.append(f"  token {entry.token_id}: {info['summary']}")
                if info.get("pcrs") or info.get("fence"):
                    lines.append(f"    {_bound_line(info)}")
                lines.append("    " + _verdict(info))
            if not volume["tokens"]:
                lines.append("  no luks-tpm token")
    except LuksTpmError as error:
        if alone:  # the one device asked about cannot be read: that is the answer, with its own exit code
            raise
        volume = {"device": str(path), "uuid": None, "keyslots": [], "tokens": [], "error": error_data(error)}
        lines = [f"{path}: {error.message}"]
    volume["unlocks"] = any(token["unlocks"] for token in volume["tokens"])
    volume["_lines"] = lines
    return volume


def _verdict(info: dict[str, Any]) -> str:
    if info["unlocks"]:
        return "unlocks now" + (" (needs the PIN)" if info.get("note") else "")
    if info.get("other_tpm"):
        return "another TPM's binding: not for this machine (it works where it was made)"
    return f"would NOT unlock: {info['reason']}"


def _bound_line(info: dict[str, Any]) -> str:
    pcrs = ",".join(map(str, info["pcrs"])) or "none"
    matching = info.get("pcrs_matching")
    now = "unknown" if matching is None else ",".join(map(str, matching)) or "none"
    return (
        f"bank {info['pcr_bank']}, PCRs {pcrs}, matching now: {now}, fence: {'yes' if info['fence'] else 'no'}"
        f", PIN: {'yes' if info['pin'] else 'no'}"
    )


def _token_status(
    device: Device,
    tpm: Tpm | None,
    tpm_error: LuksTpmError | None,
    token_id: int,
    token: Token | None,
    damage: LuksTpmError | None,
) -> dict[str, Any]:
    if token is None:
        assert damage is not None
        return {
            "id": token_id,
            "damaged": True,
            "summary": "damaged",
            "unlocks": False,
            "reason": damage.message,
            "cause": str(damage.cause),
            "other_tpm": False,
        }
    info: dict[str, Any] = {
        "id": token_id,
        "damaged": False,
        "mode": str(token.mode),
        "pcr_bank": str(token.pcr_bank),
        "pcrs": list(token.pcrs),
        "pin": token.pin,
        "fence": token.fence,
        "created": token.created,
        "parent": token.parent.name.hex(),
        "parent_handle": None if token.parent.handle is None else f"{token.parent.handle:#x}",
        "summary": f"{token.describe()}, created {token.created}",
        "other_tpm": False,
    }
    if tpm is None:
        assert tpm_error is not None
        return {**info, "unlocks": False, "reason": tpm_error.message, "cause": str(tpm_error.cause)}
    try:
        if token.pcrs:
            changed = changed_pcrs(tpm, token)
            info["pcrs_matching"] = [index for index in token.pcrs if index not in changed]
        if token.pin:  # not unsealed without the PIN: check what can be checked, in unseal's order
            with KeyRecovery(tpm) as recovery:
                recovery.precheck(token)
            from .tpm.info import lockout_state

            if lockout_state(tpm).in_lockout:  # a PIN object is DA-protected: no try is accepted now
                raise LuksTpmError(
                    "the TPM is in dictionary-attack lockout", code=ExitCode.LOCKED_OUT, cause=Cause.LOCKED_OUT
                )
            return {**info, "unlocks": True, "reason": None, "cause": None, "note": "needs the PIN"}
        with KeyRecovery(tpm) as recovery:
            recover_verified(device, recovery, token_id=token_id).key.close()
        return {**info, "unlocks": True, "reason": None, "cause": None}
    except UnlockFailed as error:
        return _would_not_unlock(info, error.failures[0].error)
    except LuksTpmError as error:
        return _would_not_unlock(info, error)


def _would_not_unlock(info: dict[str, Any], error: LuksTpmError) -> dict[str, Any]:
    """Another TPM's token is not a failure here: it is marked as such, and the volume's verdict rests on
    this TPM's tokens (a volume with only other TPMs' tokens does not unlock here, and says so)."""
    other = error.cause is Cause.OTHER_TPM
    return {
        **info,
        "unlocks": False,
        "reason": error.message,
        "cause": str(error.cause),
        "other_tpm": other,
        **({"summary": f"{info['summary']} (another TPM)"} if other else {}),
    }


def raise_fence(tcti: str) -> Report:
    with Tpm(tcti) as tpm:
        banks = tpm_pcr.raise_fence(tpm)
        value = tpm_pcr.pcr_values(tpm, FENCE_BANK, [FENCE_PCR])[FENCE_PCR]
    return Report(
        {"fence": "up", "pcr": FENCE_PCR, "banks": [str(bank) for bank in banks], "sha256": value.hex()},
        [
            f"fence raised: PCR {FENCE_PCR} extended in {', '.join(map(str, banks))}; fenced tokens cannot be "
            "recovered until the next boot"
        ],
    )
