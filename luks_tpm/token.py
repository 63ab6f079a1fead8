"""The `luks-tpm` LUKS2 token (docs/token-format.md, a contract): parse, validate, serialize.

Unknown fields are kept and written back unchanged; a higher `version` is refused. Nothing in a
token is secret: derived tokens hold a salt and a wrapped key, sealed tokens a TPM-bound blob.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import enum
import json
from typing import Any

from .errors import ExitCode, die
from .tpm import Bank, Parent, PcrPolicy, SealedBlob

TOKEN_TYPE = "luks-tpm"
VERSION = 1
_KNOWN = {
    "type", "keyslots", "version", "mode", "digest", "key_size", "pcr_bank", "pcrs", "policy", "pin",
    "parent", "created", "salt", "wrapped_key", "blob", "pcr_values", "endorsement",
}


class Mode(enum.StrEnum):
    DERIVED = "derived"
    SEALED = "sealed"


@dataclasses.dataclass(frozen=True)
class Token:
    mode: Mode
    digest: int
    key_size: int
    pcr_bank: Bank
    pcrs: tuple[int, ...]
    policy: bytes
    pin: bool
    parent: Parent
    created: str
    salt: bytes | None = None  # derived
    wrapped_key: bytes | None = None  # derived, enrolled on an existing volume
    blob: SealedBlob | None = None  # sealed
    # Not secret, beyond the version-1 field list (readers ignore unknown fields): the PCR values a
    # sealed key expects, to name the PCRs that changed; and the EK name, to tell a cleared owner
    # hierarchy from another TPM.
    pcr_values: dict[int, bytes] = dataclasses.field(default_factory=dict)
    endorsement: bytes | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def pcr_policy(self) -> PcrPolicy:
        values = b"".join(self.pcr_values.get(index, b"") for index in self.pcrs)
        return PcrPolicy(self.pcr_bank, self.pcrs, self.pcr_bank.hash(values), self.pin)

    def describe(self) -> str:
        if self.mode is Mode.DERIVED:
            return "derived" + (" (wrapped volume key)" if self.wrapped_key else "")
        pcrs = ",".join(map(str, self.pcrs)) or "none"
        return f"sealed to {self.pcr_bank} PCRs {pcrs}" + (" + PIN" if self.pin else "")

    def to_json(self) -> str:
        fields: dict[str, Any] = {
            **self.extra,
            "type": TOKEN_TYPE,
            "keyslots": [],
            "version": VERSION,
            "mode": str(self.mode),
            "digest": self.digest,
            "key_size": self.key_size,
            "pcr_bank": str(self.pcr_bank),
            "pcrs": list(self.pcrs),
            "policy": self.policy.hex(),
            "pin": self.pin,
            "parent": {
                "handle": None if self.parent.handle is None else f"{self.parent.handle:#x}",
                "name": self.parent.name.hex(),
            },
            "created": self.created,
        }
        if self.mode is Mode.DERIVED:
            assert self.salt is not None
            fields["salt"] = base64.b64encode(self.salt).decode()
            fields["wrapped_key"] = None if self.wrapped_key is None else base64.b64encode(self.wrapped_key).decode()
        else:
            assert self.blob is not None
            fields["blob"] = {
                "public": base64.b64encode(self.blob.public).decode(),
                "private": base64.b64encode(self.blob.private).decode(),
            }
            fields["pcr_values"] = {str(index): value.hex() for index, value in sorted(self.pcr_values.items())}
        if self.endorsement is not None:
            fields["endorsement"] = self.endorsement.hex()
        return json.dumps(fields, separators=(",", ":"))


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def is_ours(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") == TOKEN_TYPE


def parse(text: str, token_id: int) -> Token:
    """A validated token, or a one-line error naming the token and what is wrong with it."""
    where = f"luks-tpm token {token_id}"
    hint = f"remove it with `luks-tpm remove --token-id {token_id}` and re-enroll"
    try:
        raw = json.loads(text)
    except ValueError:
        die(f"{where} is not valid JSON", hint=hint)
    if not isinstance(raw, dict) or raw.get("type") != TOKEN_TYPE:
        die(f"token {token_id} is not a luks-tpm token", hint="pick a luks-tpm token (`luks-tpm status`)")
    version = raw.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        die(f"{where} has version {version}; this luks-tpm understands version {VERSION}",
            hint="upgrade luks-tpm", code=ExitCode.UNSUPPORTED)
    try:
        return _parse_fields(raw)
    except (KeyError, TypeError, ValueError, binascii.Error) as error:
        die(f"{where} is damaged: {_field_error(error)}", hint=hint)


def _field_error(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"field {error} is missing"
    return str(error) or type(error).__name__


def _integer(raw: dict[str, Any], key: str, low: int, high: int) -> int:
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"field '{key}' must be an integer from {low} to {high}")
    return value


def _parse_fields(raw: dict[str, Any]) -> Token:
    if raw["version"] != VERSION:
        raise ValueError(f"field 'version' must be {VERSION}")
    if raw["keyslots"] != []:
        raise ValueError("field 'keyslots' must be empty")
    mode = Mode(raw["mode"])
    pcrs = raw["pcrs"]
    if not isinstance(pcrs, list) or not all(isinstance(i, int) and 0 <= i < 24 for i in pcrs):
        raise ValueError("field 'pcrs' must list PCR indices 0-23")
    parent = raw["parent"]
    handle = parent["handle"]
    if not isinstance(raw["pin"], bool):
        raise ValueError("field 'pin' must be true or false")
    token = Token(
        mode=mode,
        digest=_integer(raw, "digest", 0, 31),
        key_size=_integer(raw, "key_size", 16, 128),
        pcr_bank=Bank(raw["pcr_bank"]),
        pcrs=tuple(pcrs),
        policy=bytes.fromhex(raw["policy"]),
        pin=raw["pin"],
        parent=Parent(None if handle is None else int(handle, 16), bytes.fromhex(parent["name"])),
        created=str(raw["created"]),
        extra={key: value for key, value in raw.items() if key not in _KNOWN},
        endorsement=bytes.fromhex(raw["endorsement"]) if raw.get("endorsement") else None,
    )
    if mode is Mode.DERIVED:
        salt = base64.b64decode(raw["salt"], validate=True)
        if len(salt) != 32:
            raise ValueError("field 'salt' must hold 32 bytes")
        wrapped = raw["wrapped_key"]
        return dataclasses.replace(
            token,
            salt=salt,
            wrapped_key=None if wrapped is None else base64.b64decode(wrapped, validate=True),
        )
    blob = raw["blob"]
    values = {int(index): bytes.fromhex(value) for index, value in raw.get("pcr_values", {}).items()}
    return dataclasses.replace(
        token,
        blob=SealedBlob(base64.b64decode(blob["public"], validate=True),
                        base64.b64decode(blob["private"], validate=True)),
        pcr_values=values,
    )
