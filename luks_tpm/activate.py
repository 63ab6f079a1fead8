"""Using bindings: load-key, open, open --all and status.

The volume key goes from the TPM into a `Secret`, is verified against the LUKS2 digest, and then
only into the kernel: a logon key `cryptsetup:<uuid>-d<digest>` (load-key) or a dm-crypt table
that references such a key (open). It never reaches a file, pipe, argv or the environment.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import cryptsetup, keyring
from .cryptsetup import Device, open_device
from .crypttab import Entry
from .errors import ExitCode, LuksTpmError, die
from .output import Report, progress
from .secret import Secret
from .settings import Activation
from .token import Mode, Token
from .tpm import Tpm, TpmError
from .unlock import KeyRecovery, PinSource, changed_pcrs, luks_tpm_tokens, recover_verified


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


def load_key(tcti: str, device_path: Path, target: int, timeout: int | None, table: bool,
             token_id: int | None, pins: PinSource) -> Report:
    with open_device(device_path) as device, Tpm(tcti) as tpm, KeyRecovery(tpm, pins) as recovery:
        found_id, token, key = recover_verified(device, recovery, token_id=token_id)
        description = key_description(device, token.digest)
        with key:
            existing = keyring.search(target, "logon", description)
            if existing is not None:  # our keys have no WRITE permission: replace, not update
                # (the search also finds keys in keyrings nested in `target`, which stay where they are)
                with contextlib.suppress(keyring.KeyringError):
                    keyring.unlink(existing, target)
            serial = keyring.add_logon_key(description, key, target)
        keyring.set_permissions(serial, keyring.logon_key_permissions())
        if timeout:
            keyring.set_timeout(serial, timeout)
        data: dict[str, Any] = {"device": str(device_path), "serial": serial, "description": description,
                                "keyring": target, "token": found_id}
        lines = [f"{serial}"]
        if table:
            data["table"] = dm_table(device, token.digest, token.key_size)
            lines.append(data["table"])
    return Report(data, lines)


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
            die(f"activating {name} failed: {error}", hint="is the name already in use? (`dmsetup ls`)")
        raise error


def _require_device_mapper() -> None:
    if not cryptsetup.device_mapper_available():
        die("device-mapper is not available here; use load-key",
            hint="load the dm_crypt module, or load the key with `luks-tpm load-key --table`",
            code=ExitCode.UNSUPPORTED)


def open_volume(tcti: str, device_path: Path, name: str, options: Activation, token_id: int | None,
                pins: PinSource) -> Report:
    _require_device_mapper()
    with open_device(device_path) as device, Tpm(tcti) as tpm, KeyRecovery(tpm, pins) as recovery:
        found_id, _, key = recover_verified(device, recovery, token_id=token_id)
        with key:
            _activate(device, name, key, options)
    return Report({"device": str(device_path), "name": name, "token": found_id},
                  [f"{device_path}: opened as /dev/mapper/{name} (token {found_id})"])


def open_all(tcti: str, entries: Sequence[Entry], pins: PinSource) -> Report:
    """Unlock every entry in one TPM pass; failures are reported and left for the passphrase path."""
    _require_device_mapper()
    results: list[dict[str, Any]] = []
    with Tpm(tcti) as tpm, KeyRecovery(tpm, pins, many_volumes=True) as recovery:
        for entry in entries:
            try:
                with open_device(entry.device) as device:
                    found_id, _, key = recover_verified(device, recovery)
                    with key:
                        _activate(device, entry.name, key, Activation(readonly=entry.readonly,
                                                                      allow_discards=entry.discard))
                results.append({"name": entry.name, "device": entry.device, "opened": True, "token": found_id})
                progress(f"{entry.name}: opened")
            except LuksTpmError as error:
                results.append({"name": entry.name, "device": entry.device, "opened": False,
                                "error": error.message})
                progress(f"{entry.name}: {error.message}; falling back to passphrase")
    failed = [result for result in results if not result["opened"]]
    report = Report({"volumes": results}, [])
    if failed:
        raise _PartialFailure(report, len(failed), len(results))
    return report


class _PartialFailure(LuksTpmError):
    def __init__(self, report: Report, failed: int, total: int) -> None:
        super().__init__(f"{failed} of {total} volumes could not be opened with the TPM",
                         hint="they are left for the passphrase prompt", code=ExitCode.UNLOCK_FAILED)
        self.report = report


def status(tcti: str, devices: Sequence[Path]) -> Report:
    """Per volume and token: what it is, and whether it would unlock now (tried, then zeroed)."""
    volumes: list[dict[str, Any]] = []
    lines: list[str] = []
    tpm: Tpm | None = None
    tpm_error: LuksTpmError | None = None
    try:
        tpm = Tpm(tcti)
    except LuksTpmError as error:
        tpm_error = error
    try:
        for path in devices:
            with open_device(path) as device:
                volume: dict[str, Any] = {"device": str(path), "uuid": device.uuid,
                                          "keyslots": device.keyslots(), "tokens": []}
                lines.append(f"{path}: LUKS2 {device.uuid}, keyslots {volume['keyslots'] or 'none'}")
                for entry in luks_tpm_tokens(device):
                    info = _token_status(device, tpm, tpm_error, entry.token_id, entry.token, entry.damage)
                    volume["tokens"].append(info)
                    lines.append(f"  token {entry.token_id}: {info['summary']}")
                    if info.get("mode") == str(Mode.SEALED):
                        lines.append(f"    {_sealed_line(info)}")
                    lines.append(f"    {'unlocks now' if info['unlocks'] else 'would NOT unlock: ' + info['reason']}")
                if not volume["tokens"]:
                    lines.append("  no luks-tpm token")
            volumes.append(volume)
    finally:
        if tpm is not None:
            tpm.close()
    return Report({"volumes": volumes}, lines)


def _sealed_line(info: dict[str, Any]) -> str:
    pcrs = ",".join(map(str, info["pcrs"])) or "none"
    matching = info.get("pcrs_matching")
    now = "unknown" if matching is None else ",".join(map(str, matching)) or "none"
    return f"bank {info['pcr_bank']}, PCRs {pcrs}, matching now: {now}, PIN: {'yes' if info['pin'] else 'no'}"


def _token_status(device: Device, tpm: Tpm | None, tpm_error: LuksTpmError | None, token_id: int,
                  token: Token | None, damage: LuksTpmError | None) -> dict[str, Any]:
    if token is None:
        assert damage is not None
        return {"id": token_id, "summary": "damaged", "unlocks": False, "reason": damage.message}
    info: dict[str, Any] = {
        "id": token_id, "mode": str(token.mode), "pcr_bank": str(token.pcr_bank), "pcrs": list(token.pcrs),
        "pin": token.pin, "created": token.created, "parent": token.parent.name.hex(),
        "parent_handle": None if token.parent.handle is None else f"{token.parent.handle:#x}",
        "summary": f"{token.describe()}, created {token.created}",
    }
    if tpm is None:
        assert tpm_error is not None
        return {**info, "unlocks": False, "reason": tpm_error.message}
    try:
        if token.mode is Mode.SEALED:
            changed = changed_pcrs(tpm, token)
            info["pcrs_matching"] = [index for index in token.pcrs if index not in changed]
            if token.pin:  # not unsealed without the PIN: check what can be checked, in unseal's order
                with KeyRecovery(tpm) as recovery:
                    recovery.parent(token.parent, token.endorsement)  # says "cleared" or "different TPM"
                if changed:
                    raise LuksTpmError(f"PCR {', '.join(map(str, changed))} ({token.pcr_bank}) changed since the "
                                       "key was sealed", code=ExitCode.UNLOCK_FAILED)
                if tpm.lockout_state().in_lockout:  # a PIN object is DA-protected: no try is accepted now
                    raise LuksTpmError("the TPM is in dictionary-attack lockout", code=ExitCode.LOCKED_OUT)
                return {**info, "unlocks": True, "reason": None, "note": "needs the PIN"}
        with KeyRecovery(tpm) as recovery:
            _, _, key = recover_verified(device, recovery, token_id=token_id)
            key.close()
        return {**info, "unlocks": True, "reason": None}
    except TpmError as error:
        return {**info, "unlocks": False, "reason": error.message}
    except LuksTpmError as error:
        reason = error.message.split(": token ", 1)[-1].split(": ", 1)[-1]
        return {**info, "unlocks": False, "reason": reason}
