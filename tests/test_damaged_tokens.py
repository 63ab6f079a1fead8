"""Damaged luks-tpm tokens fail alone (issue 8, "Damaged tokens"), tried systematically.

Real tokens are made by `luks-tpm format` and `enroll` (derived with and without a wrapped key,
sealed to PCR 7) against swtpm. Every field of each (nested ones too) is then damaged in every way
in `damages()`: missing, null, each wrong JSON type, out of range (negative, huge, 2**64), handle
strings that are not hex or not persistent handles, PCR indices 24/-1/duplicates, unknown banks,
key sizes 0/1/129/9999, digest ids the header lacks, base64 that is not base64 or decodes to garbage,
truncated or well-formed-but-wrong TPM structures, maps where lists belong and back, unknown
versions. Each damaged token is written (as `cryptsetup token import` does) beside a good sealed
token at id 31, which sorts after every other token, so the damaged ones are read and tried first.

For every input:
- `load-key` with the good token beside it still succeeds (and leaves the header byte-identical);
- `load-key --token-id N` (only the damaged token) fails in one line naming the token, with an
  allowed exit code: 3 ("corrupt token") for anything structurally wrong; 5 also accepted where the
  token is well-formed and in range but its key does not verify (another salt, another digest id
  the header lacks, a valid TPM structure of another object): that is "no binding could recover
  the key", which a reader cannot tell from a changed TPM without trying. 8 is accepted for a higher
  version (documented), 0 for damage to fields nothing reads for unlocking (`created`, an absent
  `endorsement`, unknown fields). Never 1, never a traceback, never a hang;
- `status` exits 0 and reports that token as not unlocking (as damaged/corrupt when it is exit 3);
- `remove --token-id N` removes it and leaves the good token and the keyslot working;
- a volume holding only damaged tokens fails `load-key` in one line, never exit 1;
- `open --all` over a volume with only damaged tokens and a good volume opens the good one
  (activation itself needs device-mapper, which the host lacks: it is replaced by a recorder that
  checks the key it is handed against the header; everything before it is the real code).

Inputs libcryptsetup itself refuses to import (e.g. non-string keyslots) cannot reach luks-tpm
and are counted apart. Failures are collected per check and reported together with their count.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luks_tpm import bootpass, crypttab
from luks_tpm.secret import Secret

from . import volumes
from .fixtures_luks import file_digest
from .fixtures_tpm import Swtpm
from .forked_cli import ForkedCli
from .helpers import format_command

GOOD_ID = 31  # the good token's id: tried after every damaged one
BATCH = 30  # damaged tokens per volume (ids 0..29)
MAX_ALONE = 90  # inputs of failing batches tried again one per volume, per kind of token
MISSING = object()

ANY_FAILURE_BUT_BUG = frozenset({2, 3, 4, 5, 6, 7, 8})
CORRUPT = frozenset({3})
CORRUPT_OR_NOT_VERIFYING = frozenset({3, 5})
IGNORED_OR_CORRUPT = frozenset({0, 3})
HARMLESS = frozenset({0})


@dataclasses.dataclass(frozen=True)
class Damage:
    kind: str  # which real token was damaged
    label: str  # field path and what was done to it
    text: str  # the damaged token's JSON
    allowed: frozenset[int]  # exit codes of `load-key --token-id` that are right for it


@dataclasses.dataclass
class Tally:
    tried: int = 0
    refused_by_libcryptsetup: int = 0
    calls: int = 0
    failures: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def fail(self, check: str, what: str) -> None:
        self.failures.setdefault(check, []).append(what)

    def report(self, kind: str) -> str:
        lines = [
            f"{kind}: {self.tried} damaged tokens tried ({self.refused_by_libcryptsetup} more refused by "
            f"libcryptsetup at import), {self.calls} luks-tpm runs"
        ]
        for check, items in self.failures.items():
            lines.append(f"  {check}: {len(items)} of {self.tried} inputs failed")
            lines.extend(f"    {item}" for item in items)
        return "\n".join(lines)


# ---- the real tokens ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Real:
    tctis: list[str]  # two swtpm instances with the same state (same seeds: the tokens work on both)
    base: Path  # keyslot 0 only (the passphrase), same UUID and volume key as the tokens
    passphrase: Path
    tokens: dict[str, dict[str, Any]]  # "format", "enrolled", "sealed", "other-sealed"
    srk_public: bytes  # a valid TPM2B_PUBLIC of another object type (an ECC storage key)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, cli: ForkedCli) -> Iterator[Real]:
    """Tokens made by the CLI on a TPM of the module's own (PCR 7 stays as it is for the module)."""
    work = tmp_path_factory.mktemp("damaged")
    first = Swtpm(work / "swtpm")
    first.start()
    twins = [first]
    try:
        passphrase = volumes.passphrase_file(work)
        formatted = work / "formatted.img"
        with open(formatted, "wb") as handle:
            handle.truncate(32 << 20)
        made = cli.json(*format_command(formatted, passphrase), tcti=first.tcti)
        format_token = volumes.tokens(formatted)[made["token"]]
        # The same UUID and volume key on a small image with room for 32 tokens: the format token
        # derives the same key there.
        key_file = work / "volume.key"
        volumes.dump_volume_key(formatted, passphrase, key_file)
        base = volumes.luks_format(work / "base.img", passphrase, uuid=made["uuid"], volume_key_file=key_file)
        key_file.unlink()
        formatted.unlink()
        scratch = volumes.copy_image(base, work / "enroll.img")
        ids = [
            cli.json("enroll", scratch, "--mode", "derived", "--unlock-key-file", passphrase, tcti=first.tcti)["token"]
        ]
        for _ in range(2):
            ids.append(
                cli.json(
                    "enroll",
                    scratch,
                    "--mode",
                    "sealed",
                    "--pcrs",
                    "7",
                    "--unlock-key-file",
                    passphrase,
                    tcti=first.tcti,
                )["token"]
            )
        found = volumes.tokens(scratch)
        # a valid TPM2B_PUBLIC of another type of object (an ECC storage key), made by tpm2-tools
        first.tpm2("createprimary", "-C", "o", "-G", "ecc256:aes128cfb", "-c", str(work / "srk.ctx"))
        first.tpm2("readpublic", "-c", str(work / "srk.ctx"), "-o", str(work / "srk.pub"))
        first.tpm2("flushcontext", "-t")
        # A second TPM with the same seeds, so two cores can each drive one.
        first.stop()
        shutil.copytree(first.state, work / "twin", ignore=shutil.ignore_patterns("*.sock*", "*.log"))
        first.start()
        twin = Swtpm(work / "twin")
        twin.start()
        twins.append(twin)
        yield Real(
            [t.tcti for t in twins],
            base,
            passphrase,
            {"format": format_token, "enrolled": found[ids[0]], "sealed": found[ids[1]], "other-sealed": found[ids[2]]},
            (work / "srk.pub").read_bytes(),
        )
    finally:
        for swtpm in twins:
            swtpm.stop()


# ---- the damage ------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _garbage(size: int, seed: str) -> bytes:
    out = b""
    while len(out) < size:
        out += hashlib.sha256(f"{seed}{len(out)}".encode()).digest()
    return out[:size]


GENERIC: list[tuple[str, object]] = [
    ("missing", MISSING),
    ("null", None),
    ("string", "x"),
    ("empty string", ""),
    ("int 0", 0),
    ("int -1", -1),
    ("float", 1.5),
    ("true", True),
    ("empty list", []),
    ("object", {"a": 1}),
]


def _set(token: dict[str, Any], path: tuple[str, ...], value: object) -> dict[str, Any]:
    damaged = copy.deepcopy(token)
    target = damaged
    for key in path[:-1]:
        target = target[key]
    if value is MISSING:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = copy.deepcopy(value)
    return damaged


def _get(token: dict[str, Any], path: tuple[str, ...]) -> object:
    value: Any = token
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


def _paths(token: dict[str, Any]) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for key, value in token.items():
        if key == "type":  # another type is another tool's token, which luks-tpm leaves alone
            continue
        paths.append((key,))
        if isinstance(value, dict):
            paths.extend((key, inner) for inner in value)
    return paths


def _generic_allowed(kind: str, path: tuple[str, ...], label: str) -> frozenset[int]:
    field = path[-1] if path[0] != "pcr_values" else "pcr_values.*"
    if path[0] in {"created", "endorsement"}:
        return HARMLESS if label in {"missing", "null"} and path[0] == "endorsement" else IGNORED_OR_CORRUPT
    if path == ("pcr_values",) and label == "missing":
        # not in DESIGN's version-1 field list: a v1 reader may seal-check against current values
        return frozenset({0, 3, 5})
    if kind != "sealed" and path == ("policy",) and label == "empty string":
        return HARMLESS  # unchanged
    if kind == "enrolled" and path == ("wrapped_key",) and label == "null":
        return CORRUPT_OR_NOT_VERIFYING  # reads as a format token: derives a key that does not verify
    if kind == "format" and path == ("wrapped_key",) and label == "null":
        return HARMLESS
    if path == ("parent", "handle") and label == "null":
        return HARMLESS  # null: the SRK re-created from its template, whose name the token checks
    if kind == "sealed" and path == ("pcrs",) and label == "empty list":
        return CORRUPT_OR_NOT_VERIFYING  # a valid list, the wrong one: the policy no longer matches
    if kind == "sealed" and path == ("pin",) and label == "true":
        return CORRUPT_OR_NOT_VERIFYING  # "needs a PIN" (5) is what a reader can say without trying one
    if field == "digest" and label == "int 0":
        return HARMLESS  # unchanged (digest 0)
    if path == ("pcr_values", "7") and label == "missing":
        return frozenset({0, 3, 5})  # the recorded value is optional
    return CORRUPT


def _specific(
    kind: str, token: dict[str, Any], other: dict[str, Any], srk_public: bytes
) -> Iterator[tuple[tuple[str, ...], str, object, frozenset[int]]]:
    c, cv = CORRUPT, CORRUPT_OR_NOT_VERIFYING
    sealed = kind == "sealed"
    yield from [
        (("version",), "0", 0, c),
        (("version",), "2 without an approver", 2, c),
        (("version",), "3 without an import blob", 3, c),
        (("version",), "4 (newer)", 4, frozenset({8})),
        (("version",), "99", 99, frozenset({8})),
        (("version",), "-1", -1, c),
        (("version",), "2**31", 2**31, frozenset({3, 8})),
        (("version",), "2**64", 2**64, frozenset({3, 8})),
        (("version",), "10**40", 10**40, frozenset({3, 8})),
        (("version",), "string '1'", "1", c),
        (("version",), "float 1.0", 1.0, IGNORED_OR_CORRUPT),
        (("version",), "float 2.0", 2.0, frozenset({3, 8})),
        (("keyslots",), "['0'] (an existing keyslot)", ["0"], c),
        (("mode",), "'sealed'" if not sealed else "'derived'", "derived" if sealed else "sealed", c),
        (("mode",), "'DERIVED'", "DERIVED", c),
        (("mode",), "'other'", "other", c),
        (("digest",), "1 (absent)", 1, cv),
        (("digest",), "31 (absent)", 31, cv),
        (("digest",), "32", 32, c),
        (("digest",), "-1", -1, c),
        (("digest",), "2**64", 2**64, c),
        (("digest",), "string '0'", "0", c),
        (("digest",), "float 0.0", 0.0, IGNORED_OR_CORRUPT),
        (("key_size",), "0", 0, c),
        (("key_size",), "1", 1, c),
        (("key_size",), "15", 15, c),
        (("key_size",), "129", 129, c),
        (("key_size",), "9999", 9999, c),
        (("key_size",), "-64", -64, c),
        (("key_size",), "2**64", 2**64, c),
        (("key_size",), "string '64'", "64", c),
        (("key_size",), "16", 16, cv),
        (("key_size",), "32", 32, cv),
        (("key_size",), "63", 63, cv),
        (("key_size",), "128", 128, cv),
        (("key_size",), "float 64.0", 64.0, IGNORED_OR_CORRUPT),
        (("pcr_bank",), "'sha512' (swtpm has it, luks-tpm does not)", "sha512", c),
        (("pcr_bank",), "'md5'", "md5", c),
        (("pcr_bank",), "'SHA256'", "SHA256", c),
        (("pcr_bank",), "'sha3_256'", "sha3_256", c),
        (("pcr_bank",), "'sha256 '", "sha256 ", c),
        (("pcr_bank",), "'sha1'", "sha1", cv if sealed else IGNORED_OR_CORRUPT),
        (("pcr_bank",), "'sha384'", "sha384", cv if sealed else IGNORED_OR_CORRUPT),
        (("pcrs",), "[24]", [24], c),
        (("pcrs",), "[-1]", [-1], c),
        (("pcrs",), "[7, 7]", [7, 7], c),
        (("pcrs",), "[7, '7']", [7, "7"], c),
        (("pcrs",), "['7']", ["7"], c),
        (("pcrs",), "[1.5]", [1.5], c),
        (("pcrs",), "[true]", [True], c),
        (("pcrs",), "[2**64]", [2**64], c),
        (("pcrs",), "[null]", [None], c),
        (("pcrs",), "object instead of list", {"7": True}, c),
        (("pcrs",), "int 7", 7, c),
        (("pcrs",), "string '7'", "7", c),
        (("pcrs",), "[7, 255]", [7, 255], c),
        (("pcrs",), "[0..23]", list(range(24)), cv if sealed else frozenset({3, 5, 8})),
        (("pcrs",), "[8]", [8], cv if sealed else frozenset({3, 5, 8})),
        (("policy",), "'zz'", "zz", c),
        (("policy",), "odd length", "abc", c),
        (("policy",), "'0x' prefix", "0x" + "00" * 32, c),
        (("policy",), "int", 5, c),
        (("policy",), "1000 bytes", "00" * 1000, c),
        # a sealed object's real policy is inside its TPM object, which the TPM enforces: a reader
        # may ignore the recorded copy, or refuse the token for the mismatch
        (("policy",), "32 zero bytes", "00" * 32, cv | HARMLESS if sealed else IGNORED_OR_CORRUPT),
        (("pin",), "string 'true'", "true", c),
        (("pin",), "int 1", 1, c),
        (("pin",), "string 'false'", "false", c),
        (("pin",), "true (no PIN in the policy)", True, cv if sealed else IGNORED_OR_CORRUPT),
        (("parent",), "list [handle, name]", [token["parent"]["handle"], token["parent"]["name"]], c),
        (("parent",), "only a name", {"name": token["parent"]["name"]}, c),
        (("parent",), "only a handle", {"handle": "0x81000001"}, c),
        # another persistent handle: the SRK's name, not its handle, pins the key, and a missing
        # persistent SRK is re-created from its template (defect 6), so unlocking is right too
        (("parent", "handle"), "'0x81000001' (absent here)", "0x81000001", cv | HARMLESS),
        (("parent", "handle"), "'0x81000002'", "0x81000002", cv | HARMLESS),
        (("parent", "handle"), "'0x81800000' (platform range)", "0x81800000", cv | HARMLESS),
        (("parent", "handle"), "'0x1'", "0x1", c),
        (("parent", "handle"), "'0x40000001' (owner hierarchy)", "0x40000001", c),
        (("parent", "handle"), "'0x80000000' (transient)", "0x80000000", c),
        (("parent", "handle"), "'0x02000000' (session)", "0x02000000", c),
        (("parent", "handle"), "'0x'", "0x", c),
        (("parent", "handle"), "'0xzz'", "0xzz", c),
        (("parent", "handle"), "'zz'", "zz", c),
        (("parent", "handle"), "no 0x prefix", "81000001", cv),
        (("parent", "handle"), "'-0x1'", "-0x1", c),
        (("parent", "handle"), "'0x100000000' (33 bits)", "0x100000000", c),
        (("parent", "handle"), "2**64 as hex", "0x" + "f" * 16 + "1", c),
        (("parent", "handle"), "int 0x81000001", 0x81000001, c),
        (("parent", "name"), "'zz'", "zz", c),
        (("parent", "name"), "'abc'", "abc", c),
        (("parent", "name"), "int", 5, c),
        (("parent", "name"), "sha256 name, 31 bytes", "000b" + "00" * 31, c),
        (("parent", "name"), "sha256 name of nothing", "000b" + "00" * 32, cv),
        (("parent", "name"), "sha1 name", "0004" + "11" * 20, cv),
        (("parent", "name"), "1000 bytes", "00" * 1000, c),
        (("created",), "not a date", "not a date", IGNORED_OR_CORRUPT),
        (("endorsement",), "'zz'", "zz", IGNORED_OR_CORRUPT),
        (("endorsement",), "well-formed other name", "000b" + "22" * 32, IGNORED_OR_CORRUPT),
        (("x-unknown",), "unknown string field", "kept and ignored", HARMLESS),
        (("x-nested",), "unknown nested field", {"a": [1, {"b": None}], "c": 2**64}, HARMLESS),
        (("x-large",), "unknown 4 KiB field", "z" * 4096, HARMLESS),
    ]
    if kind in {"format", "enrolled"}:
        yield from [
            (("salt",), "not base64", "not base64!", c),
            (("salt",), "3 bytes", "AAAA", c),
            (("salt",), "31 bytes", _b64(b"\1" * 31), c),
            (("salt",), "64 bytes", _b64(b"\1" * 64), c),
            (("salt",), "padding only", "====", c),
            (("salt",), "with a newline", token["salt"][:20] + "\n" + token["salt"][20:], c),
            (("salt",), "urlsafe alphabet", _b64(b"\xfb\xff" * 16).replace("+", "-").replace("/", "_"), c),
            (("salt",), "another 32 bytes", _b64(_garbage(32, "salt")), cv),
            (("salt",), "a list of bytes", list(range(32)), c),
        ]
    if kind == "enrolled":
        wrapped = base64.b64decode(token["wrapped_key"])
        yield from [
            (("wrapped_key",), "not base64", "!!!!", c),
            (("wrapped_key",), "3 bytes", "AAAA", c),
            (("wrapped_key",), "7 bytes", _b64(b"\7" * 7), c),
            (("wrapped_key",), "8 bytes", _b64(b"\7" * 8), c),
            (("wrapped_key",), "64 bytes (not a multiple of 8 + 8)", _b64(_garbage(64, "w")), c),
            (("wrapped_key",), "garbage of the right size", _b64(_garbage(72, "w")), cv),
            (("wrapped_key",), "one bit flipped", _b64(wrapped[:-1] + bytes([wrapped[-1] ^ 1])), cv),
            (("wrapped_key",), "truncated", _b64(wrapped[:40]), c),
            (("wrapped_key",), "80 bytes", _b64(_garbage(80, "w")), cv),
            (("wrapped_key",), "1 MiB-ish (200 KiB)", _b64(_garbage(200 << 10, "big")), c),
        ]
    if kind == "format":
        yield (("wrapped_key",), "garbage of the right size (a format token has none)", _b64(_garbage(72, "w")), cv)
    if sealed:
        public = base64.b64decode(token["blob"]["public"])
        private = base64.b64decode(token["blob"]["private"])
        seven = token["pcr_values"]["7"]
        for part, data in (("public", public), ("private", private)):
            path = ("blob", part)
            yield from [
                (path, "not base64", "%%%%", c),
                (path, "3 bytes", "AAAA", c),
                (path, "garbage", _b64(_garbage(len(data), part)), c),
                (path, "truncated", _b64(data[: len(data) // 2]), c),
                (path, "size field 0xffff", _b64(b"\xff\xff" + data[2:]), c),
                (path, "size field 0", _b64(b"\x00\x00"), c),
                (path, "trailing bytes", _b64(data + b"\0\0\0\0"), c),
                (path, "one bit flipped", _b64(data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:]), cv),
                (path, "the other sealed token's", other["blob"][part], cv),
                (path, "64 KiB", _b64(_garbage(64 << 10, part)), c),
            ]
        yield from [
            (("blob", "public"), "the SRK's public area (another object type)", _b64(srk_public), cv),
            (("blob", "public"), "the private part", token["blob"]["private"], c),
            # a well-formed TPM2B with the wrong bytes: the TPM's integrity check refuses it, as it
            # refuses a flipped bit
            (("blob", "private"), "the public part", token["blob"]["public"], cv),
            (("blob",), "list [public, private]", [token["blob"]["public"], token["blob"]["private"]], c),
            (("blob",), "only public", {"public": token["blob"]["public"]}, c),
            (("blob",), "only private", {"private": token["blob"]["private"]}, c),
            (("pcr_values",), "list instead of map", [seven], c),
            (("pcr_values",), "list of pairs", [[7, seven]], c),
            (("pcr_values",), "string", seven, c),
            (("pcr_values",), "{7: 'zz'}", {"7": "zz"}, c),
            (("pcr_values",), "{7: 1 byte}", {"7": "00"}, c),
            (("pcr_values",), "{7: sha1-sized}", {"7": "00" * 20}, c),
            (("pcr_values",), "{7: int}", {"7": 5}, c),
            (("pcr_values",), "{7: null}", {"7": None}, c),
            (("pcr_values",), "{'a': value}", {"a": seven}, c),
            (("pcr_values",), "{'-1': value}", {"-1": seven}, c),
            (("pcr_values",), "{'24': value}", {"24": seven, "7": seven}, c),
            (("pcr_values",), "{'2**64': value}", {str(2**64): seven, "7": seven}, c),
            (("pcr_values",), "{' 7': value}", {" 7": seven}, c),
            (("pcr_values",), "empty map", {}, frozenset({0, 3, 5})),
            (("pcr_values",), "another 7 value", {"7": "ff" * 32}, cv),
            (("pcr_values",), "an extra PCR not bound", {"7": seven, "8": seven}, frozenset({0, 3, 5})),
        ]


def damages(kind: str, token: dict[str, Any], other: dict[str, Any], srk_public: bytes) -> list[Damage]:
    found: dict[str, Damage] = {}
    original = json.dumps(token, sort_keys=True)

    def add(path: tuple[str, ...], label: str, value: object, allowed: frozenset[int]) -> None:
        if _get(token, path) is MISSING and len(path) > 1 and _get(token, path[:-1]) is MISSING:
            return
        damaged = _set(token, path, value)
        if json.dumps(damaged, sort_keys=True) == original:
            return  # not damage: the token as it was
        name = f"{kind}: {'.'.join(path)} = {label}"
        found.setdefault(name, Damage(kind, name, json.dumps(damaged), allowed))

    # The enrolled derived token differs from the format one only in its wrapped key: its other
    # fields are parsed by the same code, so they get the specific damage but not every generic one.
    paths = [("wrapped_key",), ("salt",)] if kind == "enrolled" else _paths(token)
    for path in paths:
        for label, value in GENERIC:
            add(path, label, value, _generic_allowed(kind, path, label))
    for path, label, value, allowed in _specific(kind, token, other, srk_public):
        if kind != "enrolled" or path[0] in {"wrapped_key", "salt", "version", "digest", "key_size"}:
            add(path, label, value, allowed)
    return list(found.values())


# ---- the checks ------------------------------------------------------------------------------------------


def _first_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[0][:200] if lines else "(nothing on stderr)"


def _one_line_problem(result: Any) -> str | None:
    """Why the result is not one clear error line (plus an optional hint), or None."""
    if "Traceback" in result.stderr:
        return "traceback"
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.startswith("luks-tpm: ") and not line.startswith("luks-tpm: hint:")
    ]
    if len(lines) != 1:
        return f"{len(lines)} error lines"
    return None


def _describe(result: Any) -> str:
    # with --json, errors come as JSON on stdout: {"error": {"message": ...}}
    text = result.stderr
    with contextlib.suppress(ValueError, KeyError, TypeError):
        text = json.loads(result.stdout)["error"]["message"]
    return f"exit {result.returncode}: {_first_line(text or result.stdout)}"


class _Recorder:
    """Stands in for dm-crypt (absent on the host): checks the key it is handed, notes what is open."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    def open(self, device: Any, name: str, key: Secret, options: Any) -> None:
        assert device.volume_key_verify(key), f"{name}: activation was handed a key that does not verify"
        self.opened.append(name)

    def close(self, device: Any, name: str) -> None:
        self.opened.remove(name)


@dataclasses.dataclass
class _Lane:
    """One batch in flight: its volumes and its TPM (two lanes run side by side on two cores)."""

    tcti: str
    batch: list[Damage]
    labels: str = ""
    volume: Path = Path()
    alone: Path = Path()
    placed: dict[int, Damage] = dataclasses.field(default_factory=dict)
    reported: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    status_ok: bool = False


def _batch_name(placed: dict[int, Damage]) -> str:
    labels = [d.label for d in placed.values()]
    if len(labels) == 1:
        return f"alone on its volume: {labels[0]}"
    return f"batch of {len(labels)}: {labels[0]} ... {labels[-1]}" if labels else "empty batch"


def _interleave(lanes: list[_Lane], make: Any) -> list[tuple[_Lane, Any, list[str | Path]]]:
    """Commands of all lanes, alternating, so two run at once on different volumes and TPMs."""
    per_lane = [[(lane, item, argv) for item, argv in make(lane)] for lane in lanes]
    out: list[tuple[_Lane, Any, list[str | Path]]] = []
    for index in range(max((len(x) for x in per_lane), default=0)):
        out.extend(x[index] for x in per_lane if index < len(x))
    return out


def _run(cli: ForkedCli, jobs: list[tuple[_Lane, Any, list[str | Path]]], tally: Tally) -> list[Any]:
    tally.calls += len(jobs)
    return cli.run_many([argv for _, _, argv in jobs], tcti=None, parallel=2, lanes=[lane.tcti for lane, _, _ in jobs])


def _check_lanes(lanes: list[_Lane], real: Real, cli: ForkedCli, work: Path, tally: Tally) -> None:
    good = json.dumps(real.tokens["sealed"])
    for number, lane in enumerate(lanes):
        lane.volume = volumes.copy_image(real.base, work / f"beside-{number}.img")
        assert volumes.set_token(lane.volume, good, GOOD_ID) == GOOD_ID
        lane.alone = volumes.copy_image(real.base, work / f"alone-{number}.img")
        for damage in lane.batch:
            token_id = len(lane.placed)
            if volumes.set_token(lane.volume, damage.text, token_id) is None:
                tally.refused_by_libcryptsetup += 1
                continue
            lane.placed[token_id] = damage
            if 0 not in damage.allowed:
                volumes.set_token(lane.alone, damage.text, token_id)
        tally.tried += len(lane.placed)
        lane.labels = _batch_name(lane.placed)

    before = {lane.labels: file_digest(lane.volume) for lane in lanes}
    jobs = _interleave(
        lanes,
        lambda lane: [
            ("beside", ["--tcti", lane.tcti, "--json", "load-key", lane.volume]),
            ("status", ["--tcti", lane.tcti, "--json", "status", lane.volume]),
        ],
    )
    for (lane, what, _), result in zip(jobs, _run(cli, jobs, tally), strict=True):
        if what == "beside" and result.returncode != 0:
            tally.fail("load-key with a good token beside the damaged ones", f"[{lane.labels}] {_describe(result)}")
        if what == "status":
            if result.returncode != 0:
                tally.fail("status", f"[{lane.labels}] {_describe(result)}")
                continue
            lane.status_ok = True
            lane.reported = {entry["id"]: entry for entry in json.loads(result.stdout)["volumes"][0]["tokens"]}
            if not lane.reported.get(GOOD_ID, {}).get("unlocks"):
                tally.fail("status", f"[{lane.labels}] the good token {GOOD_ID} is not reported as unlocking")
    for lane in lanes:
        if file_digest(lane.volume) != before[lane.labels]:
            tally.fail("header byte-identical after load-key and status", f"[{lane.labels}]")

    jobs = _interleave(
        lanes,
        lambda lane: [
            (token_id, ["--tcti", lane.tcti, "load-key", lane.volume, "--token-id", str(token_id)])
            for token_id in lane.placed
        ],
    )
    for (lane, token_id, _), result in zip(jobs, _run(cli, jobs, tally), strict=True):
        _check_single(lane, token_id, result, tally)

    for lane in lanes:
        if any(0 not in d.allowed for d in lane.placed.values()):
            only = cli.run("load-key", lane.alone, tcti=lane.tcti, expect=None)
            tally.calls += 1
            problem = _one_line_problem(only) if only.returncode != 0 else "succeeded"
            # one damaged token alone: its own exit code; many: any failure but a bug (they mix)
            allowed = (next(iter(lane.placed.values())).allowed - {0}) if len(lane.placed) == 1 else ANY_FAILURE_BUT_BUG
            if only.returncode not in allowed or problem:
                tally.fail(
                    "load-key on a volume with only damaged tokens",
                    f"[{lane.labels}] {_describe(only)} ({problem or 'one line'})",
                )
            _check_open_all(lane, tally)

    jobs = _interleave(
        lanes,
        lambda lane: [(token_id, ["remove", lane.volume, "--token-id", str(token_id)]) for token_id in lane.placed],
    )
    for (lane, token_id, _), result in zip(jobs, _run(cli, jobs, tally), strict=True):
        if result.returncode != 0:
            tally.fail(
                "remove --token-id N of the damaged token", f"{lane.placed[token_id].label}: {_describe(result)}"
            )
    for lane in lanes:
        left = set(volumes.tokens(lane.volume)) - {GOOD_ID}
        if left and len(tally.failures.get("remove --token-id N of the damaged token", [])) == 0:
            tally.fail("remove --token-id N of the damaged token", f"[{lane.labels}] still there: {sorted(left)}")
        after = cli.run("load-key", lane.volume, "--token-id", str(GOOD_ID), tcti=lane.tcti, expect=None)
        tally.calls += 1
        if after.returncode != 0 or not volumes.passphrase_opens(lane.volume, real.passphrase):
            tally.fail("the good token and the keyslot work after the removals", f"[{lane.labels}] {_describe(after)}")


def _check_single(lane: _Lane, token_id: int, result: Any, tally: Tally) -> None:
    damage = lane.placed[token_id]
    code = result.returncode
    if code not in damage.allowed:
        check = (
            "load-key --token-id N: internal error (exit 1)"
            if code == 1
            else "load-key --token-id N: hung"
            if code < -100
            else "load-key --token-id N: exit code"
        )
        tally.fail(check, f"{damage.label}: {_describe(result)} (allowed {sorted(damage.allowed)})")
    elif code != 0:
        problem = _one_line_problem(result)
        if problem:
            tally.fail("load-key --token-id N: one line", f"{damage.label}: {problem}: {result.stderr!r}")
        elif f"token {token_id}" not in result.stderr:
            tally.fail("load-key --token-id N: names the token", f"{damage.label}: {_first_line(result.stderr)}")
    if not lane.status_ok:
        return
    entry = lane.reported.get(token_id)
    if entry is None:
        tally.fail("status reports the damaged token", f"{damage.label}: token {token_id} not listed")
    elif code != 0 and entry.get("unlocks") is not False and not (code == 5 and "needs a PIN" in result.stderr):
        # (a token that claims a PIN is "unlocks, needs the PIN" to a status that has none to try)
        tally.fail("status reports the damaged token", f"{damage.label}: listed as unlocking")
    elif code == 3 and not any(word in json.dumps(entry).lower() for word in ("damaged", "corrupt")):
        tally.fail("status reports the damaged token", f"{damage.label}: not called damaged: {entry}")


def _check_open_all(lane: _Lane, tally: Tally) -> None:
    """`open --all` over [only-damaged volume, good volume]: both reported, none opened (the cross-volume
    guard opens all or none), and no exception but the pass's own result."""
    recorder = _Recorder()
    entries = [crypttab.Entry("damaged", str(lane.alone)), crypttab.Entry("good", str(lane.volume))]
    try:
        report = bootpass.open_all(lane.tcti, entries, lambda _token_id: None, mapper=recorder)
    except Exception as error:  # the point: any exception aborts the whole boot pass
        tally.fail("open --all reports every volume", f"[{lane.labels}] {type(error).__name__}: {error}")
        return
    assert isinstance(report.result, bootpass.OpenedAll)
    volumes = {volume.name: volume for volume in report.result.volumes}
    good = volumes.get("good")
    if recorder.opened or good is None or good.error is None or good.error.cause != "cross-volume-guard":
        tally.fail("open --all holds the other volume back", f"[{lane.labels}] opened {recorder.opened}, {good}")


def _check_pairs(
    batches: list[list[Damage]],
    real: Real,
    cli: ForkedCli,
    tmp_path: Path,
    tally: Tally,
) -> None:
    """Two batches at a time, one per TPM; anything left loaded in a TPM is a failure too."""
    for first in range(0, len(batches), len(real.tctis)):
        lanes = [
            _Lane(tcti, batch)
            for tcti, batch in zip(real.tctis, batches[first : first + len(real.tctis)], strict=False)
        ]
        _check_lanes(lanes, real, cli, tmp_path, tally)
        for lane in lanes:
            left = volumes.run("tpm2_getcap", "-T", lane.tcti, "handles-transient").stdout.decode().strip()
            if left:
                tally.fail(
                    "TPM objects left loaded (a TPM without resource manager fills up)",
                    f"[{lane.labels}] {left.replace(chr(10), ' ')}",
                )
                volumes.flush_tpm(lane.tcti)


def _run_kind(kind: str, real: Real, cli: ForkedCli, tmp_path: Path) -> None:
    """Batches of 30 damaged tokens per volume; a batch with any failure is tried again one token per
    volume, so each failure is pinned on the input that causes it (one damaged token can break the
    commands for all its neighbours: that shows as the batch-level lines)."""
    inputs = damages(kind, real.tokens[kind], real.tokens["other-sealed"], real.srk_public)
    tally = Tally()
    suspects: list[Damage] = []
    for start in range(0, len(inputs), BATCH * len(real.tctis)):
        group = inputs[start : start + BATCH * len(real.tctis)]
        scratch = Tally()
        _check_pairs([group[i : i + BATCH] for i in range(0, len(group), BATCH)], real, cli, tmp_path, scratch)
        tally.tried += scratch.tried
        tally.refused_by_libcryptsetup += scratch.refused_by_libcryptsetup
        tally.calls += scratch.calls
        if scratch.failures:
            for check, items in scratch.failures.items():
                for item in items:
                    if item.startswith("["):  # batch-level: keep, it shows the neighbours' breakage
                        tally.fail(f"{check} (30 damaged tokens on one volume)", item)
            suspects += group
    # Trying each suspect alone costs ~6 runs; bounded so that a badly broken build still reports fast.
    skipped = suspects[MAX_ALONE:]
    suspects = suspects[:MAX_ALONE]
    alone = Tally()
    _check_pairs([[damage] for damage in suspects], real, cli, tmp_path, alone)
    tally.calls += alone.calls
    for check, items in alone.failures.items():
        for item in items:
            tally.fail(check, item)
    summary = (
        tally.report(kind)
        + f"\n  ({len(suspects)} inputs of failing batches tried again one per volume"
        + (
            f"; {len(skipped)} more not, beyond the first {MAX_ALONE}: {'; '.join(d.label for d in skipped)})"
            if skipped
            else ")"
        )
    )
    print(summary)
    assert tally.tried >= 50, summary
    assert not tally.failures, summary


@pytest.mark.parametrize("kind", ["format", "enrolled", "sealed"])
def test_damaged_tokens_fail_alone(kind: str, real: Real, cli: ForkedCli) -> None:
    # header writes fsync: on tmpfs that costs nothing
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as work:
        _run_kind(kind, real, cli, Path(work))


def test_damage_enumeration_covers_every_field(real: Real) -> None:
    """The enumeration itself: every field of the format and sealed tokens gets every generic damage."""
    for kind in ("format", "sealed"):
        token = real.tokens[kind]
        labels = {d.label for d in damages(kind, token, real.tokens["other-sealed"], real.srk_public)}
        for path in _paths(token):
            for label, value in GENERIC:
                name = f"{kind}: {'.'.join(path)} = {label}"
                unchanged = json.dumps(_set(token, path, value), sort_keys=True) == json.dumps(token, sort_keys=True)
                assert name in labels or unchanged, name
    sealed_fields = {".".join(p) for p in _paths(real.tokens["sealed"])}
    assert {"blob.public", "blob.private", "pcr_values.7", "parent.handle", "parent.name"} <= sealed_fields


@pytest.mark.parametrize("count", [1, 4, 8])
def test_tokens_the_tpm_rejects_do_not_use_up_the_pass(count: int, real: Real, cli: ForkedCli, tmp_path: Path) -> None:
    """Sealed tokens whose blob the TPM refuses to load (a flipped bit: the integrity check fails), tried
    before a good one in the same pass: every failed try must give back what it took from the TPM
    (sessions, objects), or the good token after them fails ("out of memory for session contexts")."""
    token = real.tokens["sealed"]
    private = base64.b64decode(token["blob"]["private"])
    flipped = {
        **token,
        "blob": {**token["blob"], "private": _b64(private[:-5] + bytes([private[-5] ^ 0x10]) + private[-4:])},
    }
    volume = volumes.copy_image(real.base, tmp_path / "rejected.img")
    assert volumes.set_token(volume, json.dumps(token), GOOD_ID) == GOOD_ID
    for token_id in range(count):
        assert volumes.set_token(volume, json.dumps(flipped), token_id) == token_id
    result = cli.run("--json", "load-key", volume, tcti=real.tctis[0], expect=None)
    volumes.flush_tpm(real.tctis[0])
    assert result.returncode == 0, f"{count} rejected sealed tokens before the good one: {_describe(result)}"
    assert json.loads(result.stdout)["token"] == GOOD_ID
