"""Plain values shared by every layer: PCR banks, the SRK a binding uses, policies, and the `luks-tpm`
LUKS2 token (docs/token-format.md, a contract): parse, validate, serialize.

Nothing here imports a C binding, so the token format can be read without a TPM stack. Unknown token
fields are kept and written back unchanged; a higher `version` is refused. Nothing in a token is
secret: derived tokens hold a salt and a wrapped key, sealed tokens a TPM-bound blob.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import json
import struct
from typing import Any

from .errors import Cause, ExitCode, LuksTpmError, die

TOKEN_TYPE = "luks-tpm"
VERSION = 1
PCR_COUNT = 24
FENCE_PCR = 15  # docs/policy.md: fenced tokens require sha256 PCR 15 to be all zeros
FENCE_MESSAGE = b"luks-tpm fence v1"  # what `luks-tpm fence` extends PCR 15 with (hashed per bank)
PERSISTENT_FIRST, PERSISTENT_LAST = 0x81000000, 0x81FFFFFF


class Bank(enum.StrEnum):
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA384 = "sha384"

    @property
    def algorithm(self) -> int:
        """The TPM_ALG_ID of the bank's hash."""
        return {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C}[self.value]

    @property
    def size(self) -> int:
        return hashlib.new(self.value).digest_size

    def hash(self, data: bytes) -> bytes:
        return hashlib.new(self.value, data).digest()


FENCE_BANK = Bank.SHA256


class Mode(enum.StrEnum):
    DERIVED = "derived"
    SEALED = "sealed"


@dataclasses.dataclass(frozen=True)
class Parent:
    """The SRK that salts sessions and parents sealed objects; its name pins the TPM and owner seed."""

    handle: int | None  # persistent handle, or None when created transiently from the template
    name: bytes


@dataclasses.dataclass(frozen=True)
class SealedBlob:
    public: bytes  # a marshalled TPM2B_PUBLIC
    private: bytes  # a marshalled TPM2B_PRIVATE


@dataclasses.dataclass(frozen=True)
class PcrPolicy:
    """What a binding's policy requires: PCR values of one bank, the fence, a PIN (docs/policy.md)."""

    bank: Bank
    pcrs: tuple[int, ...]
    values: dict[int, bytes]  # the expected value of each PCR in `pcrs`
    pin: bool = False
    fence: bool = False

    @property
    def pcr_digest(self) -> bytes:
        """PolicyPCR's pcrDigest: hashed with the policy session's algorithm (SHA-256), whatever the bank."""
        return hashlib.sha256(b"".join(self.values[index] for index in self.pcrs)).digest()

    @property
    def empty(self) -> bool:
        return not (self.pcrs or self.pin or self.fence)

    def digest(self) -> bytes:
        """The policy digest, computed in software (docs/policy.md): what the TPM's trial session gives,
        used to tell a token whose fields disagree with its `policy` (a damaged token) without a TPM."""
        digest = bytes(32)
        parts = ([self] if self.pcrs else []) + ([FENCE_DOWN] if self.fence else [])
        for part in parts:
            bitmap = bytearray(3)
            for index in part.pcrs:
                bitmap[index // 8] |= 1 << (index % 8)
            selection = struct.pack(">IHB", 1, part.bank.algorithm, len(bitmap)) + bytes(bitmap)
            digest = hashlib.sha256(digest + struct.pack(">I", _CC_POLICY_PCR) + selection + part.pcr_digest).digest()
        if self.pin:
            digest = hashlib.sha256(digest + struct.pack(">I", _CC_POLICY_AUTH_VALUE)).digest()
        return digest


_CC_POLICY_PCR, _CC_POLICY_AUTH_VALUE = 0x0000017F, 0x0000016B  # TPM_CC values (Part 2)
FENCE_DOWN = PcrPolicy(FENCE_BANK, (FENCE_PCR,), {FENCE_PCR: bytes(FENCE_BANK.size)})  # fenced: PCR 15 = zeros


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
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # unknown fields, written back as read

    def pcr_policy(self, *, pin: bool = False) -> PcrPolicy:
        return PcrPolicy(self.pcr_bank, self.pcrs, self.pcr_values, pin, self.fence)

    def _bound_to(self) -> str:
        parts = [f"{self.pcr_bank} PCRs {','.join(map(str, self.pcrs))}"] if self.pcrs else []
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


@dataclasses.dataclass(frozen=True)
class SealedToken(_Common):
    blob: SealedBlob = SealedBlob(b"", b"")
    pin: bool = False

    mode = Mode.SEALED

    def describe(self) -> str:
        bound = self._bound_to() or " to the TPM only"
        return f"sealed{bound}" + (" + PIN" if self.pin else "")


Token = DerivedToken | SealedToken


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def to_json(token: Token) -> str:
    fields: dict[str, Any] = {
        **token.extra,
        "type": TOKEN_TYPE,
        "keyslots": [],
        "version": VERSION,
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
    else:
        fields["blob"] = {"public": _b64(token.blob.public), "private": _b64(token.blob.private)}
    if token.pcr_values:
        fields["pcr_values"] = {str(index): value.hex() for index, value in sorted(token.pcr_values.items())}
    if token.fence:
        fields["fence"] = True
    if token.endorsement is not None:
        fields["endorsement"] = token.endorsement.hex()
    return json.dumps(fields, separators=(",", ":"))


def utc_now() -> str:
    import datetime  # here: only enrolling writes a date

    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def is_ours(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") == TOKEN_TYPE


# ---- parsing: every field checked for type and range, so a damaged token fails alone, here ----------

_KNOWN = {
    "type",
    "keyslots",
    "version",
    "mode",
    "digest",
    "key_size",
    "pcr_bank",
    "pcrs",
    "policy",
    "pin",
    "parent",
    "created",
    "salt",
    "wrapped_key",
    "blob",
    "pcr_values",
    "endorsement",
    "fence",
}


class _Damage(ValueError):
    pass


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
            f"{where} has version {version}; this luks-tpm understands version {VERSION}",
            hint="upgrade luks-tpm",
            code=ExitCode.UNSUPPORTED,
            cause=Cause.UNSUPPORTED,
        )
    try:
        return _parse_fields(raw)
    except (_Damage, binascii.Error) as error:
        raise LuksTpmError(
            f"{where} is damaged: {error}", hint=hint, cause=Cause.CORRUPT_TOKEN, code=ExitCode.DEVICE
        ) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
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
    if not isinstance(value, str):
        raise _Damage(f"field '{key}' must be a hex string")
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise _Damage(f"field '{key}' must be a hex string") from None
    if sizes is not None and len(data) not in sizes:
        raise _Damage(f"field '{key}' must hold {' or '.join(map(str, sizes))} bytes")
    return data


def _base64(value: object, key: str) -> bytes:
    if not isinstance(value, str):
        raise _Damage(f"field '{key}' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _Damage(f"field '{key}' is not valid base64") from None


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
        if not isinstance(handle, str) or not handle.lower().startswith("0x"):
            raise _Damage("field 'parent.handle' must be null or a hex string like 0x81000001")
        try:
            handle = int(handle, 16)
        except ValueError:
            raise _Damage("field 'parent.handle' must be null or a hex string like 0x81000001") from None
        if not PERSISTENT_FIRST <= int(handle) <= PERSISTENT_LAST:
            raise _Damage("field 'parent.handle' must be a persistent handle (0x81000000-0x81ffffff)")
    # A name is the nameAlg (2 bytes) and a digest: sha1, sha256 or sha384 here.
    name = _hex(parent["name"], "parent.name", (22, 34, 50))
    return Parent(handle, name)


def _pcrs(raw: dict[str, Any]) -> tuple[int, ...]:
    pcrs = _field(raw, "pcrs", list, "a list of PCR indices")
    if not all(_is_int(i) and 0 <= i < PCR_COUNT for i in pcrs) or len(set(pcrs)) != len(pcrs):
        raise _Damage(f"field 'pcrs' must list distinct PCR indices 0-{PCR_COUNT - 1}")
    return tuple(sorted(pcrs))


def _pcr_values(raw: dict[str, Any], bank: Bank, pcrs: tuple[int, ...]) -> dict[int, bytes]:
    values = raw.get("pcr_values", {})
    if not isinstance(values, dict):
        raise _Damage("field 'pcr_values' must be an object")
    parsed = {}
    for index, value in values.items():
        if not (isinstance(index, str) and index.isdigit() and int(index) in pcrs):
            raise _Damage("field 'pcr_values' must map bound PCR indices to values")
        parsed[int(index)] = _hex(value, f"pcr_values.{index}", (bank.size,))
    return parsed


def _parse_fields(raw: dict[str, Any]) -> Token:
    if _field(raw, "version", int, f"the integer {VERSION}") != VERSION:
        raise _Damage(f"field 'version' must be {VERSION}")
    if _field(raw, "keyslots", list, "an empty list") != []:
        raise _Damage("field 'keyslots' must be empty")
    mode = _field(raw, "mode", str, "'derived' or 'sealed'")
    if mode not in set(Mode):
        raise _Damage("field 'mode' must be 'derived' or 'sealed'")
    bank_name = _field(raw, "pcr_bank", str, "a PCR bank name")
    if bank_name not in set(Bank):
        raise _Damage(f"field 'pcr_bank' must be one of {', '.join(Bank)}")
    bank = Bank(bank_name)
    pcrs = _pcrs(raw)
    pin = _field(raw, "pin", bool, "true or false")
    fence = raw.get("fence", False)
    if not isinstance(fence, bool):
        raise _Damage("field 'fence' must be true or false")
    policy = _hex(_field(raw, "policy", str, "a hex string"), "policy", (0, 32))
    # A sealed object always has an authPolicy (all zeros for the empty policy); a derived primary has
    # one exactly when it is bound to PCRs or the fence (docs/derivation.md).
    if bool(policy) != (mode == Mode.SEALED or bool(pcrs or fence)):
        raise _Damage("field 'policy' does not fit the token's mode, PCRs and fence")
    endorsement = raw.get("endorsement")
    common: dict[str, Any] = {
        "digest": _integer(raw, "digest", 0, 31),
        "key_size": _integer(raw, "key_size", 16, 128),
        "parent": _parent(raw),
        "created": _field(raw, "created", str, "a string"),
        "pcr_bank": bank,
        "pcrs": pcrs,
        "pcr_values": _pcr_values(raw, bank, pcrs),
        "fence": fence,
        "policy": policy,
        "endorsement": None if endorsement is None else _hex(endorsement, "endorsement", (34, 50, 22)),
        "extra": {key: value for key, value in raw.items() if key not in _KNOWN},
    }
    if set(common["pcr_values"]) == set(pcrs) and (policy or mode == Mode.SEALED):
        expected = PcrPolicy(bank, pcrs, common["pcr_values"], pin, fence).digest()
        if policy != expected:
            raise _Damage("field 'policy' does not match the token's PCRs, PCR values, fence and PIN")
    if mode == Mode.DERIVED:
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
    blob = _field(raw, "blob", dict, "an object")
    if "public" not in blob or "private" not in blob:
        raise _Damage("field 'blob' needs 'public' and 'private'")
    return SealedToken(
        **common,
        pin=pin,
        blob=SealedBlob(_tpm2b(blob["public"], "blob.public"), _tpm2b(blob["private"], "blob.private")),
    )
