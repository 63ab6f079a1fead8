"""The `luks-tpm` LUKS2 token (docs/token-format.md, a contract): its fields, parsing and writing.

A token that fails any check is damaged, and says which field; it fails alone (the volume's other tokens
and the other volumes still work). Text is read strictly: ASCII digits only (Python's int() and \\d take
any script's digits), base64 and hex in ASCII, numbers as JSON writes them. Unknown fields are kept and
written back unchanged (their numbers as written, their strings byte for byte, even bytes that are not
UTF-8, which json-c stores as they are). Version 1 is the token as first defined; version 2 adds the
approver and its approved states (docs/policy.md); version 3 is a sealed token made for a TPM that was
not there, its blob in TPM2_Import's form (docs/sealing.md); a higher version is refused. Nothing in a token is
secret: derived tokens hold a salt and a wrapped key, sealed tokens a TPM-bound blob, approvals signatures.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from typing import Any

from .errors import Cause, ExitCode, LuksTpmError, die
from .model import (
    PCR_COUNT,
    PERSISTENT_FIRST,
    PERSISTENT_LAST,
    Approval,
    Approver,
    Bank,
    ImportedSeal,
    Mode,
    Parent,
    PcrPolicy,
    SealedBlob,
)

TOKEN_TYPE = "luks-tpm"
VERSION = 3  # the highest this release reads and writes
VERSIONS = (1, 2, 3)
MAX_APPROVALS = 8


@dataclasses.dataclass(frozen=True)
class _Common:
    digest: int  # the LUKS2 digest id the key verifies against
    key_size: int  # the volume key's length (LUKS2 without keyslots does not record it)
    parent: Parent
    created: str
    pcr_bank: Bank = Bank.SHA256
    pcrs: tuple[int, ...] = ()
    pcr_values: dict[int, bytes] = dataclasses.field(default_factory=dict)  # optional: to name changed PCRs
    fence: bool = False
    policy: bytes = b""  # the policy digest the object or primary was created with
    endorsement: bytes | None = None  # optional: the EK name, tells "cleared" from "another TPM"
    approver: Approver | None = None  # version 2: PCR states are approved by this key's signatures
    approvals: tuple[Approval, ...] = ()
    extra: dict[str, str] = dataclasses.field(default_factory=dict)  # unknown fields: name -> JSON text as read

    def pcr_policy(self, *, pin: bool = False, values: dict[int, bytes] | None = None) -> PcrPolicy:
        """The policy to satisfy; with an approver, for the approved state `values`."""
        approver = self.approver.name if self.approver else None
        chosen = self.pcr_values if values is None else values
        return PcrPolicy(self.pcr_bank, self.pcrs, chosen, pin, self.fence, approver)

    def _bound_to(self) -> str:
        parts = [f"{self.pcr_bank} PCRs {','.join(map(str, self.pcrs))}"] if self.pcrs else []
        if self.approver is not None:
            parts[-1:] = [f"{parts[-1]} in {len(self.approvals)} approved state(s)"] if parts else []
        if self.fence:
            parts.append("fence")
        return (" to " + " + ".join(parts)) if parts else ""


@dataclasses.dataclass(frozen=True)
class DerivedToken(_Common):
    salt: bytes = b""  # 32 random bytes: the volume's own input to the derivation
    wrapped_key: bytes | None = None  # AES-KW of the volume key (enroll), or None: the derived key is it

    mode = Mode.DERIVED
    pin = False

    def describe(self) -> str:
        return (
            "derived"
            + (" (wrapped volume key)" if self.wrapped_key else "")
            + (f", bound{self._bound_to()}" if self._bound_to() else "")
        )


_NO_BLOB = SealedBlob(b"", b"")


@dataclasses.dataclass(frozen=True)
class SealedToken(_Common):
    blob: SealedBlob | ImportedSeal = _NO_BLOB
    pin: bool = False

    mode = Mode.SEALED

    def describe(self) -> str:
        bound = self._bound_to() or " to the TPM only"
        made = " (made elsewhere for this TPM's import parent)" if isinstance(self.blob, ImportedSeal) else ""
        return f"sealed{bound}" + (" + PIN" if self.pin else "") + made


Token = DerivedToken | SealedToken


# ---- writing -----------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _values(values: dict[int, bytes]) -> dict[str, str]:
    return {str(index): value.hex() for index, value in sorted(values.items())}


def to_json(token: Token) -> str:
    fields: dict[str, Any] = {
        "type": TOKEN_TYPE,
        "keyslots": [],
        "version": _version(token),
        "mode": str(token.mode),
        "digest": token.digest,
        "key_size": token.key_size,
        "pcr_bank": str(token.pcr_bank),
        "pcrs": list(token.pcrs),
        "policy": token.policy.hex(),
        "pin": token.pin,
        "parent": {
            "handle": None if token.parent.handle is None else f"{token.parent.handle:#x}",
            "name": token.parent.name.hex(),
        },
        "created": token.created,
    }
    if isinstance(token, DerivedToken):
        fields["salt"] = _b64(token.salt)
        fields["wrapped_key"] = None if token.wrapped_key is None else _b64(token.wrapped_key)
    elif isinstance(token.blob, ImportedSeal):
        imported = {"duplicate": _b64(token.blob.duplicate), "seed": _b64(token.blob.seed)}
        fields["blob"] = {"public": _b64(token.blob.public), "import": imported}
    else:
        fields["blob"] = {"public": _b64(token.blob.public), "private": _b64(token.blob.private)}
    if token.pcr_values:
        fields["pcr_values"] = _values(token.pcr_values)
    if token.fence:
        fields["fence"] = True
    if token.endorsement is not None:
        fields["endorsement"] = token.endorsement.hex()
    if token.approver is not None:
        fields["approver"] = {"public": _b64(token.approver.public), "name": token.approver.name.hex()}
        fields["approvals"] = [
            {"pcr_values": _values(a.values), "signature": _b64(a.signature)} for a in token.approvals
        ]
    known = [json.dumps(key) + ":" + json.dumps(value, separators=(",", ":")) for key, value in fields.items()]
    # Unknown fields as they were read: their JSON text, numbers and bytes unchanged.
    unknown = [json.dumps(key, ensure_ascii=False) + ":" + text for key, text in token.extra.items()]
    return "{" + ",".join(unknown + known) + "}"


def _version(token: Token) -> int:
    if isinstance(token, SealedToken) and isinstance(token.blob, ImportedSeal):
        return 3
    return 2 if token.approver is not None else 1


def utc_now() -> str:
    import datetime  # here: only enrolling writes a date

    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# ---- reading: every field checked for type and range, so a damaged token fails alone, here -----------

_KNOWN = {
    "type", "keyslots", "version", "mode", "digest", "key_size", "pcr_bank", "pcrs", "policy", "pin", "parent",
    "created", "salt", "wrapped_key", "blob", "pcr_values", "endorsement", "fence", "approver", "approvals",
}  # fmt: skip
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_HANDLE = re.compile(r"0[xX][0-9a-fA-F]{1,8}")
_INDEX = re.compile(r"[0-9]{1,2}")


class _Damage(ValueError):
    pass


class _Raw(str):
    """A JSON value kept as the text it was written as."""


def _raw_json(value: Any) -> str:
    """JSON text of a value parsed with numbers kept as written (_Raw) and strings as read."""
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, dict):
        members = (json.dumps(key, ensure_ascii=False) + ":" + _raw_json(item) for key, item in value.items())
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_raw_json(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # strings (any bytes, as surrogates), true, false, null


def _unknown_fields(text: str) -> dict[str, str]:
    raw = json.loads(text, parse_int=_Raw, parse_float=_Raw, parse_constant=_Raw)
    return {key: _raw_json(value) for key, value in raw.items() if key not in _KNOWN}


def is_ours(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") == TOKEN_TYPE


def parse(text: str, token_id: int) -> Token:
    """A validated token, or a one-line error naming the token and what is wrong with it (exit 3)."""
    where = f"luks-tpm token {token_id}"
    hint = f"remove it with `luks-tpm remove --token-id {token_id}` and re-enroll"
    try:
        raw = json.loads(text)
    except ValueError:
        die(f"{where} is not valid JSON", hint=hint, cause=Cause.CORRUPT_TOKEN, code=ExitCode.DEVICE)
    if not isinstance(raw, dict) or raw.get("type") != TOKEN_TYPE:
        die(
            f"token {token_id} is not a luks-tpm token",
            hint="pick a luks-tpm token (`luks-tpm status`)",
            cause=Cause.USAGE,
            code=ExitCode.DEVICE,
        )
    version = raw.get("version")
    if isinstance(version, int) and _is_int(version) and version > VERSION:
        die(
            f"{where} has version {version}; this luks-tpm understands versions up to {VERSION}",
            hint="upgrade luks-tpm",
            code=ExitCode.UNSUPPORTED,
            cause=Cause.UNSUPPORTED,
        )
    try:
        return _token(raw, _unknown_fields(text))
    except _Damage as error:
        raise LuksTpmError(
            f"{where} is damaged: {error}", hint=hint, cause=Cause.CORRUPT_TOKEN, code=ExitCode.DEVICE
        ) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(raw: dict[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in raw:
        raise _Damage(f"field '{key}' is missing")
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Damage(f"field '{key}' must be {what}")
    return value


def _integer(raw: dict[str, Any], key: str, low: int, high: int) -> int:
    value: int = _field(raw, key, int, f"an integer from {low} to {high}")
    if not low <= value <= high:
        raise _Damage(f"field '{key}' must be an integer from {low} to {high}")
    return value


def _hex(value: object, key: str, sizes: tuple[int, ...] | None = None) -> bytes:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise _Damage(f"field '{key}' must be a hex string")
    data = bytes.fromhex(value)
    if sizes is not None and len(data) not in sizes:
        raise _Damage(f"field '{key}' must hold {' or '.join(map(str, sizes))} bytes")
    return data


def _base64(value: object, key: str) -> bytes:
    if not isinstance(value, str) or len(value) % 4 or not _BASE64.fullmatch(value):
        raise _Damage(f"field '{key}' is not valid base64")
    return base64.b64decode(value)


def _tpm2b(value: object, key: str) -> bytes:
    """A marshalled TPM2B_*: a 2-byte big-endian size and that many bytes, nothing more."""
    data = _base64(value, key)
    if len(data) < 3 or int.from_bytes(data[:2], "big") != len(data) - 2:
        raise _Damage(f"field '{key}' is not a TPM2B structure")
    return data


def _parent(raw: dict[str, Any]) -> Parent:
    parent = _field(raw, "parent", dict, "an object")
    if "handle" not in parent or "name" not in parent:
        raise _Damage("field 'parent' needs 'handle' and 'name'")
    handle = parent["handle"]
    if handle is not None:
        if not isinstance(handle, str) or not _HANDLE.fullmatch(handle):
            raise _Damage("field 'parent.handle' must be null or a hex string like 0x81000001")
        handle = int(handle, 16)
        if not PERSISTENT_FIRST <= handle <= PERSISTENT_LAST:
            raise _Damage("field 'parent.handle' must be a persistent handle (0x81000000-0x81ffffff)")
    # A name is the nameAlg (2 bytes) and a digest: sha1, sha256 or sha384 here.
    return Parent(handle, _hex(parent["name"], "parent.name", (22, 34, 50)))


def _pcrs(raw: dict[str, Any]) -> tuple[int, ...]:
    pcrs = _field(raw, "pcrs", list, "a list of PCR indices")
    if not all(_is_int(i) and 0 <= i < PCR_COUNT for i in pcrs) or len(set(pcrs)) != len(pcrs):
        raise _Damage(f"field 'pcrs' must list distinct PCR indices 0-{PCR_COUNT - 1}")
    return tuple(sorted(pcrs))


def _pcr_values(values: object, key: str, bank: Bank, pcrs: tuple[int, ...]) -> dict[int, bytes]:
    if not isinstance(values, dict):
        raise _Damage(f"field '{key}' must be an object")
    parsed = {}
    for index, value in values.items():
        if not (_INDEX.fullmatch(index) and int(index) in pcrs):
            raise _Damage(f"field '{key}' must map bound PCR indices (ASCII digits) to values")
        parsed[int(index)] = _hex(value, f"{key}.{index}", (bank.size,))
    return parsed


def _approver(raw: dict[str, Any], bank: Bank, pcrs: tuple[int, ...]) -> tuple[Approver | None, tuple[Approval, ...]]:
    if raw["version"] != 2:
        if "approver" in raw or "approvals" in raw:
            raise _Damage("fields 'approver' and 'approvals' need version 2")
        return None, ()
    given = _field(raw, "approver", dict, "an object")
    public = _tpm2b(given.get("public"), "approver.public")
    approver = Approver(public, _hex(given.get("name"), "approver.name", (34,)))
    if approver.name != Approver.name_of(public):
        raise _Damage("field 'approver.name' is not the name of 'approver.public'")
    if not pcrs:
        raise _Damage("an approved token must be bound to PCRs")
    listed = _field(raw, "approvals", list, "a list")
    if len(listed) > MAX_APPROVALS or not all(isinstance(item, dict) for item in listed):
        raise _Damage(f"field 'approvals' must list at most {MAX_APPROVALS} objects")
    approvals = []
    for number, item in enumerate(listed):
        values = _pcr_values(item.get("pcr_values"), f"approvals.{number}.pcr_values", bank, pcrs)
        if set(values) != set(pcrs):
            raise _Damage(f"field 'approvals.{number}.pcr_values' must give every bound PCR")
        approvals.append(Approval(values, _base64(item.get("signature"), f"approvals.{number}.signature")))
    return approver, tuple(approvals)


def _token(raw: dict[str, Any], extra: dict[str, str]) -> Token:
    if _field(raw, "version", int, "an integer") not in VERSIONS:
        raise _Damage(f"field 'version' must be one of {', '.join(map(str, VERSIONS))}")
    if _field(raw, "keyslots", list, "an empty list") != []:
        raise _Damage("field 'keyslots' must be empty")
    mode = _field(raw, "mode", str, "'derived' or 'sealed'")
    if mode not in set(Mode):
        raise _Damage("field 'mode' must be 'derived' or 'sealed'")
    bank_name = _field(raw, "pcr_bank", str, "a PCR bank name")
    if bank_name not in set(Bank):
        raise _Damage(f"field 'pcr_bank' must be one of {', '.join(Bank)}")
    bank, pcrs = Bank(bank_name), _pcrs(raw)
    fence = raw.get("fence", False)
    if not isinstance(fence, bool):
        raise _Damage("field 'fence' must be true or false")
    endorsement = raw.get("endorsement")
    approver, approvals = _approver(raw, bank, pcrs)
    common: dict[str, Any] = {
        "digest": _integer(raw, "digest", 0, 31),
        "key_size": _integer(raw, "key_size", 16, 128),
        "parent": _parent(raw),
        "created": _field(raw, "created", str, "a string"),
        "pcr_bank": bank,
        "pcrs": pcrs,
        "pcr_values": _pcr_values(raw.get("pcr_values", {}), "pcr_values", bank, pcrs),
        "fence": fence,
        "policy": _hex(_field(raw, "policy", str, "a hex string"), "policy", (0, 32)),
        "endorsement": _hex(endorsement, "endorsement", (34, 50, 22)) if endorsement not in (None, "") else None,
        "approver": approver,
        "approvals": approvals,
        "extra": extra,
    }
    pin = _field(raw, "pin", bool, "true or false")
    _check_policy(Mode(mode), common, pin)
    if mode == Mode.DERIVED:
        if raw["version"] == 3:
            raise _Damage("version 3 is for sealed tokens only")
        return _derived(raw, common, pin)
    return SealedToken(**common, pin=pin, blob=_blob(raw))


def _blob(raw: dict[str, Any]) -> SealedBlob | ImportedSeal:
    blob = _field(raw, "blob", dict, "an object")
    public = _tpm2b(blob.get("public"), "blob.public")
    if raw["version"] != 3:
        if "private" not in blob or "import" in blob:
            raise _Damage("field 'blob' needs 'public' and 'private'")
        return SealedBlob(public, _tpm2b(blob["private"], "blob.private"))
    imported = blob.get("import")
    if "private" in blob or not isinstance(imported, dict):
        raise _Damage("field 'blob' of a version 3 token needs 'public' and 'import'")
    duplicate = _tpm2b(imported.get("duplicate"), "blob.import.duplicate")
    return ImportedSeal(public, duplicate, _tpm2b(imported.get("seed"), "blob.import.seed"))


def _check_policy(mode: Mode, common: dict[str, Any], pin: bool) -> None:
    """A sealed object always has an authPolicy (all zeros for the empty policy); a derived primary has one
    exactly when it is bound to PCRs or the fence (docs/derivation.md). Where the fields fix the policy
    (the PCR values of all bound PCRs, or an approver), it must be the one they give."""
    policy, pcrs, fence = common["policy"], common["pcrs"], common["fence"]
    if bool(policy) != (mode == Mode.SEALED or bool(pcrs or fence)):
        raise _Damage("field 'policy' does not fit the token's mode, PCRs and fence")
    approver: Approver | None = common["approver"]
    known = approver is not None or set(common["pcr_values"]) == set(pcrs)
    if known and policy:
        name = approver.name if approver else None
        expected = PcrPolicy(common["pcr_bank"], pcrs, common["pcr_values"], pin, fence, name).digest()
        if policy != expected:
            raise _Damage("field 'policy' does not match the token's PCRs, PCR values or approver, fence and PIN")


def _derived(raw: dict[str, Any], common: dict[str, Any], pin: bool) -> DerivedToken:
    if pin:
        raise _Damage("field 'pin' must be false for a derived token")
    salt = _base64(_field(raw, "salt", str, "a base64 string"), "salt")
    if len(salt) != 32:
        raise _Damage("field 'salt' must hold 32 bytes")
    if "wrapped_key" not in raw:
        raise _Damage("field 'wrapped_key' is missing")
    wrapped = raw["wrapped_key"]
    if wrapped is not None:
        wrapped = _base64(wrapped, "wrapped_key")
        if len(wrapped) != common["key_size"] + 8 or common["key_size"] % 8:
            raise _Damage("field 'wrapped_key' does not fit 'key_size'")
    return DerivedToken(**common, salt=salt, wrapped_key=wrapped)
