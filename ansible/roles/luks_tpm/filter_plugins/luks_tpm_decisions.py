"""Filters of the luks_tpm role: decisions made from luks-tpm's --json output (docs/json.md), nothing else.

The role's tasks run the command line; these functions only read what it printed and say what to do:
which volumes need a binding (`luks_tpm_plan`), the crypttab with the x-luks-tpm marks
(`luks_tpm_crypttab`), the facts the role publishes (`luks_tpm_facts`), whether a rebind or an erase
changed anything, and a failed command's one-line error. No key material passes through them: volume
entries are copied without `unlock_key` and `recovery_passphrase`, and a command's error object holds
none (the command line's rule). Plain Python, no Ansible import, so tests can call them directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MODES = ("derived", "sealed")
BOOT_CHAIN_PCRS = (4, 7, 8, 9)  # enroll --boot-chain without --pcrs (luks_tpm/settings.py)
BOOT_CHAIN_VERSION = 2  # token format version of --boot-chain bindings (docs/token-format.md)
MARK = "x-luks-tpm"
SECRET_KEYS = frozenset({"unlock_key", "recovery_passphrase"})


class RoleError(ValueError):
    """A variable the role cannot use; Ansible shows the message as the task's failure."""


def _pcrs(value: object) -> list[int]:
    """PCRs as inventories write them: [7, 11], "7,11", 7, or nothing."""
    if value is None or value == "":
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        items: list[object] = [value]
    elif isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise RoleError(f"pcrs: expected a list of PCR indices, not {type(value).__name__}")
    try:
        pcrs = sorted({int(str(item)) for item in items})
    except ValueError:
        raise RoleError(f"pcrs: {value!r} is not a list of PCR indices") from None
    if any(not 0 <= pcr <= 23 for pcr in pcrs):
        raise RoleError(f"pcrs: {value!r}: PCR indices are 0 to 23")
    return pcrs


def luks_tpm_binding(volume: Mapping[str, Any]) -> dict[str, Any]:
    """The binding a volume entry asks for, with the role's defaults, and no secret."""
    device = volume.get("device")
    if not isinstance(device, str) or not device:
        raise RoleError("luks_tpm_volumes: every entry needs a device")
    mode = volume.get("mode", "derived")
    if mode not in MODES:
        raise RoleError(f"{device}: mode must be derived or sealed, not {mode!r}")
    boot_chain = bool(volume.get("boot_chain", False))
    given = volume.get("pcrs")
    pcrs = _pcrs(given) if given is not None else list(BOOT_CHAIN_PCRS) if boot_chain else []
    return {
        "device": device,
        "mode": mode,
        "pcrs": pcrs,
        "pcr_bank": volume.get("pcr_bank", "sha256"),
        "fence": bool(volume.get("fence", False)),
        "boot_chain": boot_chain,
    }


def luks_tpm_public(volumes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The volume entries without their secrets: what loops and messages may show."""
    return [{k: v for k, v in volume.items() if k not in SECRET_KEYS} for volume in volumes]


def _works(token: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """A token of the wanted kind that recovers the key now (or would, but for the fence being up)."""
    if token.get("damaged") or token.get("other_tpm") or token.get("pin"):
        return False
    same = (
        token.get("mode") == wanted["mode"]
        and sorted(token.get("pcrs", [])) == wanted["pcrs"]
        and token.get("pcr_bank") == wanted["pcr_bank"]
        and bool(token.get("fence")) == wanted["fence"]
        and (token.get("version") == BOOT_CHAIN_VERSION) == wanted["boot_chain"]
    )
    fenced_off = wanted["fence"] and token.get("cause") == "fence-up"
    return same and (token.get("unlocks") is True or fenced_off)


def _volume_status(status: Mapping[str, Any], device: str) -> Mapping[str, Any] | None:
    for volume in status.get("volumes", []):
        if volume.get("device") == device:
            found: Mapping[str, Any] = volume
            return found
    return None


def _binding_args(wanted: Mapping[str, Any], approver: str) -> list[str]:
    """The binding options `enroll` and `format` share (--boot-chain's PCRs are spelled out: the same)."""
    args = ["--pcr-bank", wanted["pcr_bank"]]
    if wanted["pcrs"]:
        args += ["--pcrs", ",".join(map(str, wanted["pcrs"]))]
    if wanted["fence"]:
        args.append("--fence")
    if wanted["boot_chain"]:
        args += ["--boot-chain", "--approver", approver]
    return args


def luks_tpm_format_args(volume: Mapping[str, Any], approver: str = "/var/lib/luks-tpm/approver.json") -> list[str]:
    """`luks-tpm format` options for a volume entry, without the recovery choice (the tasks add that).
    `format` makes a derived binding only, so a volume to format must ask for mode derived."""
    wanted = luks_tpm_binding(volume)
    if wanted["mode"] != "derived":
        raise RoleError(
            f"{wanted['device']}: format makes a derived binding; mode {wanted['mode']} cannot be formatted"
        )
    extra = volume.get("format_options") or []
    if isinstance(extra, str) or not all(isinstance(arg, str | int) for arg in extra):
        raise RoleError(f"{wanted['device']}: format_options must be a list of arguments")
    return _binding_args(wanted, approver) + [str(arg) for arg in extra]


def luks_tpm_plan(
    volumes: Sequence[Mapping[str, Any]],
    status: Mapping[str, Any],
    approver: str = "/var/lib/luks-tpm/approver.json",
    skip: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """The volumes that need `enroll`: those without a working token of the kind asked for. Each entry
    has the volume's `index` in `volumes` (to find its key), `device`, `args` and `has_key`; no secret.
    A device that status could not read fails here with the command line's own message. `skip`: devices
    formatted in this run (in check mode not formatted yet, so status cannot read them)."""
    plan = []
    for index, volume in enumerate(volumes):
        wanted = luks_tpm_binding(volume)
        device = wanted["device"]
        if device in skip:
            continue
        seen = _volume_status(status, device)
        if seen is None:
            raise RoleError(f"{device}: not in the output of luks-tpm status")
        if seen.get("error"):
            error = seen["error"]
            raise RoleError(f"{device}: {error.get('message')} [luks-tpm exit {error.get('code')}]")
        if any(_works(token, wanted) for token in seen.get("tokens", [])):
            continue
        has_key = bool(volume.get("unlock_key"))
        plan.append(
            {
                "index": index,
                "device": device,
                "args": ["--mode", wanted["mode"], *_binding_args(wanted, approver)],
                "has_key": has_key,
            }
        )
    return plan


def luks_tpm_generated_keys(volumes: Sequence[Mapping[str, Any]], devices: Sequence[str]) -> list[str]:
    """Of `devices` (to be formatted), those whose entry asks for a generated recovery key: neither a
    recovery_passphrase nor no_recovery."""
    return [
        str(volume["device"])
        for volume in volumes
        if volume.get("device") in devices and not volume.get("recovery_passphrase") and not volume.get("no_recovery")
    ]


def luks_tpm_failures(results: Sequence[Mapping[str, Any]], command: str) -> list[str]:
    """One line per failed run of a loop over volumes (registered results; `item` is the device or a plan
    entry), from the command's own JSON error; no_log tasks report their failures through this."""
    lines = []
    for result in results:
        if result.get("skipped") or result.get("rc", 0) == 0:
            continue
        item = result.get("item")
        device = item.get("device") if isinstance(item, Mapping) else item
        line = f"{device}: {luks_tpm_error(result, command)}"
        if isinstance(item, Mapping) and item.get("has_key") is False:
            line += " (the volume has no unlock_key in the inventory)"
        lines.append(line)
    return lines


def luks_tpm_crypttab_entries(volumes: Sequence[Mapping[str, Any]], status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """{name, uuid, options} of the volumes with a crypttab_name, their UUIDs from status; volumes status
    could not read (still blank in check mode) are left out."""
    entries = []
    for volume in volumes:
        seen = _volume_status(status, str(volume["device"]))
        if seen is not None and seen.get("uuid"):
            options = volume.get("crypttab_options", "luks")
            entries.append({"name": volume["crypttab_name"], "uuid": seen["uuid"], "options": options})
    return entries


def _fields(line: str) -> list[str]:
    return line.split()


def _marked(options: str) -> str:
    parts = [part for part in options.split(",") if part]
    return ",".join(parts if MARK in parts else [*parts, MARK])


def luks_tpm_crypttab(content: str, entries: Sequence[Mapping[str, Any]]) -> str:
    """`content` (a crypttab) with every entry ({name, uuid, options}) marked x-luks-tpm: an existing line
    of that name (or for that UUID) gets the option added to its 4th field, keeping the rest of the line;
    a missing one is appended as `NAME UUID=... none OPTIONS,x-luks-tpm`. Comments and other lines stay."""
    lines = content.splitlines()
    before = list(lines)
    for entry in entries:
        name, uuid = str(entry["name"]), str(entry["uuid"])
        for number, line in enumerate(lines):
            fields = _fields(line)
            if not fields or fields[0].startswith("#"):
                continue
            if fields[0] == name or (len(fields) > 1 and fields[1] in (f"UUID={uuid}", f"/dev/disk/by-uuid/{uuid}")):
                while len(fields) < 4:
                    fields.append("none")
                if MARK not in fields[3].split(","):
                    lines[number] = _replace_field(line, 3, _marked(fields[3] if fields[3] != "none" else ""))
                break
        else:
            lines.append(f"{name} UUID={uuid} none {_marked(str(entry.get('options') or 'luks'))}")
    return content if lines == before else "\n".join(lines) + "\n"


def _replace_field(line: str, index: int, value: str) -> str:
    """`line` with its whitespace-separated field `index` replaced (appended when missing), spacing kept."""
    spans = [match.span() for match in re.finditer(r"\S+", line)]
    if index < len(spans):
        start, end = spans[index]
        return line[:start] + value + line[end:]
    missing = ["none"] * (index - len(spans))
    return " ".join([line.rstrip(), *missing, value])


def luks_tpm_facts(status: Mapping[str, Any]) -> dict[str, Any]:
    """What the role publishes about a host: per volume, whether it unlocks now, whether it is ready for
    the next boot, and its tokens (status --json, reduced to what a fleet report needs)."""
    volumes = {}
    for volume in status.get("volumes", []):
        tokens = [
            {
                key: token.get(key)
                for key in ("id", "mode", "pcrs", "pcr_bank", "fence", "pin", "unlocks", "next_boot", "cause")
            }
            | {"other_tpm": token.get("other_tpm", False), "damaged": token.get("damaged", False)}
            for token in volume.get("tokens", [])
        ]
        volumes[volume["device"]] = {
            "uuid": volume.get("uuid"),
            "unlocks": volume.get("unlocks"),
            "next_boot": volume.get("next_boot"),
            "keyslots": volume.get("keyslots", []),
            "tokens": tokens,
            "error": (volume.get("error") or {}).get("message"),
        }
    return {
        "unlocks": status.get("unlocks"),
        "next_boot": status.get("next_boot"),
        "fence_up": status.get("fence_up"),
        "volumes": volumes,
    }


def luks_tpm_error(result: Mapping[str, Any], command: str = "luks-tpm") -> str:
    """A failed luks-tpm run as one line: its JSON error's message and hint, and the exit code. Falls back
    to the last line of stderr when it printed no JSON (it was not luks-tpm that failed, or a crash)."""
    rc = result.get("rc")
    try:
        error = json.loads(result.get("stdout") or "")
    except ValueError:
        error = None
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        error = error["error"]
    elif isinstance(error, dict) and isinstance(error.get("problem"), dict):  # rebind: partial result
        error = error["problem"]
    else:
        stderr = (result.get("stderr") or result.get("msg") or "").strip().splitlines()
        return f"{command}: {stderr[-1] if stderr else 'failed'} [exit {rc}]"
    hint = f" (hint: {error['hint']})" if error.get("hint") else ""
    return f"{command}: {error.get('message')}{hint} [exit {rc}, cause {error.get('cause')}]"


def luks_tpm_rebind_changed(output: Mapping[str, Any]) -> bool:
    """A rebind changed a header: some token was rewritten (new id) or gained or dropped a state."""
    return any(
        token.get("added", 0) or token.get("dropped", 0) or token.get("id") != token.get("was")
        for volume in output.get("volumes", [])
        for token in volume.get("tokens", [])
    )


def luks_tpm_erase_pending(output: Mapping[str, Any]) -> bool:
    """An erase (its --dry-run listing, or what it did) has something to destroy, or destroyed something."""
    return any(
        volume.get(key)
        for volume in output.get("volumes", [])
        for key in ("keyslots", "luks_tpm_tokens", "other_tokens", "tokens_removed", "keyslots_destroyed")
    )


def luks_tpm_wipe_pending(output: Mapping[str, Any]) -> bool:
    """A wipe --dry-run listing shows something the clear would destroy: a token that dies, a persistent
    object, an owner NV index."""
    dies = any(
        token.get("fate") == "dies" for volume in output.get("volumes", []) for token in volume.get("tokens", [])
    )
    return dies or bool(output.get("persistent")) or bool(output.get("nv_indices"))


class FilterModule:
    """Ansible's entry point for filter plugins."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {
            "luks_tpm_binding": luks_tpm_binding,
            "luks_tpm_public": luks_tpm_public,
            "luks_tpm_plan": luks_tpm_plan,
            "luks_tpm_format_args": luks_tpm_format_args,
            "luks_tpm_generated_keys": luks_tpm_generated_keys,
            "luks_tpm_failures": luks_tpm_failures,
            "luks_tpm_crypttab_entries": luks_tpm_crypttab_entries,
            "luks_tpm_crypttab": luks_tpm_crypttab,
            "luks_tpm_facts": luks_tpm_facts,
            "luks_tpm_error": luks_tpm_error,
            "luks_tpm_rebind_changed": luks_tpm_rebind_changed,
            "luks_tpm_erase_pending": luks_tpm_erase_pending,
            "luks_tpm_wipe_pending": luks_tpm_wipe_pending,
        }
