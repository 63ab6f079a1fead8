"""Issue 21, class "text from a header or a file": every string, number and key of a token, and every
crypttab line, read strictly, kept exactly and shown escaped.

Tokens (the real ones of tests/test_damaged_tokens.py, made by format and enroll on swtpm), every string
field and every key, nested ones included, get in turn:
- each ASCII digit replaced by the same digit of another class: superscript, circled, Arabic-Indic,
  Devanagari, fullwidth, mathematical bold (Python's int() and \\d take several of them: an Arabic-Indic
  seven was read as PCR 7);
- a non-ASCII character (é, NO-BREAK SPACE, LINE SEPARATOR, BOM) and a byte that is not UTF-8 (json-c
  keeps it as it is), appended;
- control characters: a newline, an escape sequence that colours a terminal, a C1 CSI;
and every number field extreme JSON numbers (1e400, -1e400, 1e-400, 10**30, -0, 7.0, 1e2). Every such
token, beside a good one, must fail alone exactly as tests/test_damaged_tokens.py checks a damaged token
(that machinery runs them: load-key, load-key --token-id, status, remove, open --all, the TPM left
clean), with exit 3 where the field is read, 0 where nothing reads it (`created`, unknown fields).
Then `status` in text shows none of those characters raw (escaped), `status --json` validates and gives
back every string exactly, and unknown fields of every kind survive a rewrite (reseal) byte for byte.
crypttab lines get the same characters in each field; `wipe --dry-run --crypttab` reports each entry
with its name and device exactly (JSON) and escaped (text), and Unicode white space never splits a field.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luks_tpm import crypttab

from . import volumes
from .fixtures_tpm import Swtpm
from .forked_cli import ForkedCli
from .json_schema import validate
from .test_damaged_tokens import (
    CORRUPT,
    HARMLESS,
    IGNORED_OR_CORRUPT,
    Damage,
    Real,
    Tally,
    _check_pairs,
    real,  # noqa: F401 - the fixture: the tokens those tests damage
)


def _digits(*codes: int) -> str:
    return "".join(map(chr, codes))


# The ten digits of other classes, by code point (Python's int() and \d take several of them).
DIGIT_CLASSES = {
    "superscript": _digits(0x2070, 0xB9, 0xB2, 0xB3, *range(0x2074, 0x207A)),
    "circled": _digits(0x24EA, *range(0x2460, 0x2469)),
    "Arabic-Indic": _digits(*range(0x660, 0x66A)),
    "Devanagari": _digits(*range(0x966, 0x970)),
    "fullwidth": _digits(*range(0xFF10, 0xFF1A)),
    "mathematical bold": _digits(*range(0x1D7CE, 0x1D7D8)),
}
NON_ASCII = {"e acute": "é", "no-break space": "\u00a0", "line separator": "\u2028", "BOM": "\ufeff"}
NOT_UTF8 = {"byte ff": "\udcff", "byte 80": "\udc80"}  # surrogate escapes: written as the raw bytes
CONTROL = {"newline": "\nunlocks now", "escape": "\x1b[31mred\x1b[0m", "C1 CSI": "\x9b31m", "bell": "\x07"}
NUMBERS = ["1e400", "-1e400", "1e-400", "1" + "0" * 30, "-0", "7.0", "1e2"]
RAW = "@@RAW@@"  # placeholder for a number written as raw JSON text
UNREAD = {"created"}  # read by no unlock: any string (docs/token-format.md)
BATCH = 30


def _strings(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(path, string) of every string in a token, and the keys of its objects (as path + ("<key>",)): every
    nested key (a PCR index is a key), and of the top-level ones only "version" (any other renamed is
    that field missing, which tests/test_damaged_tokens.py tries already)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if path or key == "version":
                yield (*path, key, "<key>"), key
            if path or key != "type":
                yield from _strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, (*path, str(index)))
    elif isinstance(value, str):
        yield path, value


def _replaced(token: Any, path: tuple[str, ...], new: Any) -> Any:
    """The token with the string (or key) at `path` replaced."""
    if path[-1] == "<key>":
        *outer, key, _ = path
        parent = _at(token, tuple(outer))
        return _rebuild(token, tuple(outer), {(new if k == key else k): v for k, v in parent.items()})
    return _rebuild(token, path, new)


def _at(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


def _rebuild(value: Any, path: tuple[str, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, list):
        return [_rebuild(item, rest, new) if str(i) == head else item for i, item in enumerate(value)]
    return {key: _rebuild(item, rest, new) if key == head else item for key, item in value.items()}


def _allowed(path: tuple[str, ...], changed: str, original: str) -> frozenset[int]:
    if path[0] in UNREAD and path[-1] != "<key>":
        return HARMLESS
    if path[0] == "endorsement":  # optional: a reader may ignore one it cannot parse, or refuse the token
        return IGNORED_OR_CORRUPT
    if path[-1] == "<key>" and len(path) == 2:  # a top-level field renamed: the real one is missing now
        return IGNORED_OR_CORRUPT if path[0] in UNREAD | {"endorsement", "fence", "pcr_values"} else CORRUPT
    return CORRUPT if changed != original else HARMLESS


def text_damages(kind: str, token: dict[str, Any]) -> list[Damage]:
    found: dict[str, Damage] = {}

    def add(label: str, text: str, allowed: frozenset[int]) -> None:
        found.setdefault(label, Damage(kind, f"{kind}: {label}", text, allowed))

    for path, value in _strings(token):
        where = ".".join(path)
        digits = [i for i, char in enumerate(value) if char in "0123456789"]
        for name, klass in DIGIT_CLASSES.items() if digits else ():
            at = digits[-1]  # the last digit: for a PCR index or a handle, the one that names it
            new = value[:at] + klass[int(value[at])] + value[at + 1 :]
            add(f"{where}: a {name} digit", json.dumps(_replaced(token, path, new)), _allowed(path, new, value))
        for name, char in {**NON_ASCII, **NOT_UTF8, **CONTROL}.items():
            new = value + char
            text = json.dumps(_replaced(token, path, new), ensure_ascii=False)
            add(f"{where}: + {name}", text, _allowed(path, new, value))
    for field in ("version", "digest", "key_size", "pcrs"):
        if field not in token:
            continue
        for number in NUMBERS:
            placed = [RAW] if field == "pcrs" and token["pcrs"] else RAW
            if field == "pcrs" and not token["pcrs"]:
                continue
            text = json.dumps({**token, field: placed}).replace(json.dumps(RAW), number)
            same = json.dumps(json.loads(text)[field]) == json.dumps(token[field])  # 7.0 is not 7
            add(f"{field} = {number}", text, HARMLESS if same else CORRUPT | ({8} if field == "version" else set()))
    for number in NUMBERS:  # unknown fields: kept, ignored
        text = json.dumps({**token, "x-number": RAW}).replace(json.dumps(RAW), number)
        add(f"unknown field = {number}", text, HARMLESS)
    return list(found.values())


@pytest.mark.parametrize("kind", ["format", "sealed"])
def test_every_string_and_number_of_a_token(kind: str, real: Real, cli: ForkedCli) -> None:  # noqa: F811
    inputs = text_damages(kind, real.tokens[kind])
    tally = Tally()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as work:
        batches = [inputs[i : i + BATCH] for i in range(0, len(inputs), BATCH)]
        _check_pairs(batches, real, cli, Path(work), tally)
    summary = tally.report(kind)
    print(summary)
    assert tally.tried >= 100, summary
    assert not tally.failures, summary


_RAW_OUTPUT = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff\udc80-\udcff]")


def test_what_reaches_a_terminal_is_escaped_and_json_is_exact(real: Real, cli: ForkedCli, tmp_path: Path) -> None:  # noqa: F811
    """A token whose `created` and unknown fields hold every kind of character: status prints them
    escaped (no raw control character, no raw invalid byte, never a line it did not mean) and its JSON
    gives them back exactly."""
    tcti = real.tctis[0]
    nasty = "2026" + "".join({**NON_ASCII, **NOT_UTF8, **CONTROL}.values())
    token = {**real.tokens["sealed"], "created": nasty, "x-note": nasty}
    volume = volumes.copy_image(real.base, tmp_path / "nasty.img")
    assert volumes.set_token(volume, json.dumps(token, ensure_ascii=False), 0) == 0
    commands: list[list[str | Path]] = [["status", volume], ["load-key", volume], ["wipe", "--dry-run", volume]]
    for command in commands:
        shown = cli.run(*command, tcti=tcti, expect=None)
        assert shown.returncode == 0, shown.stderr
        for stream in (shown.stdout, shown.stderr):
            assert not _RAW_OUTPUT.search(stream), f"{command[0]}: raw {_RAW_OUTPUT.findall(stream)!r}"
        forged = [line for line in shown.stdout.splitlines() if line.startswith(("unlocks now", "red"))]
        assert not forged, f"{command[0]} printed a line the header wrote: {forged}"
    data = cli.json("status", volume, tcti=tcti)
    validate("status", data)
    assert data["volumes"][0]["tokens"][0]["created"] == nasty


def test_unknown_fields_survive_a_rewrite_byte_for_byte(real: Real, cli: ForkedCli, tmp_path: Path) -> None:  # noqa: F811
    unknown = {f"x-{n}": RAW + str(n) for n in range(len(NUMBERS))}
    nasty = "".join({**NON_ASCII, **NOT_UTF8, **CONTROL}.values()) + "".join(d[7] for d in DIGIT_CLASSES.values())
    text = json.dumps({**real.tokens["sealed"], **unknown, "x-text": nasty}, ensure_ascii=False)
    for n, number in enumerate(NUMBERS):
        text = text.replace(json.dumps(RAW + str(n)), number)
    volume = volumes.copy_image(real.base, tmp_path / "unknown.img")
    assert volumes.set_token(volume, text, 0) == 0
    # As stored: json-c itself changes some numbers on import (10**30 saturates at 2**64-1, -0 is 0), as
    # `cryptsetup token import` would; from then on every rewrite must keep them as they are.
    stored = _unknown(volumes.token_text(volume, 0))
    new = cli.json("reseal", volume, "--token-id", "0", tcti=real.tctis[0])["token"]
    written = volumes.token_text(volume, new)
    assert _unknown(written) == stored, f"{stored}\n{_unknown(written)}"
    for n, number in enumerate(NUMBERS):
        if number not in ("1" + "0" * 30, "-0"):
            assert stored[f"x-{n}"] == number, stored
    assert json.loads(written)["x-text"] == nasty


def _unknown(text: str) -> dict[str, str]:
    """Each x- field's value as the JSON text libcryptsetup stores (numbers exactly as written there)."""
    return dict(re.findall(r'"(x-[^"]+)":\s*("(?:[^"\\]|\\.)*"|[^,}\s]+)', text))


# ---- crypttab lines ------------------------------------------------------------------------------------


def _entry_lines() -> dict[str, tuple[str, str]]:
    """label -> (name, device) of an entry marked x-luks-tpm, each carrying unusual text."""
    lines: dict[str, tuple[str, str]] = {}
    for name, klass in DIGIT_CLASSES.items():
        lines[f"{name} digits"] = (f"data{klass[7]}", f"/dev/sd{klass[1]}")
    for name, char in {**NON_ASCII, **NOT_UTF8}.items():
        lines[name] = (f"data{char}x", f"/dev/disk/by-id/x{char}y")
    lines["escape"] = ("data\x1b[31m", "/dev/x\x1b[0m")
    lines["C1 CSI"] = ("data\x9b31m", "/dev/x\x9b")
    return lines


def test_every_crypttab_line_is_read_exactly_and_shown_escaped(tmp_path: Path, cli: ForkedCli, swtpm: Swtpm) -> None:
    lines = _entry_lines()
    text = "".join(f"{name} {device} none luks,x-luks-tpm\n" for name, device in lines.values())
    table = tmp_path / "crypttab"
    table.write_bytes(text.encode("utf-8", "surrogateescape"))
    # The parser: one entry per line, fields split at ASCII white space only (as systemd and cryptsetup
    # split them: a NO-BREAK SPACE or LINE SEPARATOR inside a name is part of it).
    parsed = crypttab.read(table)
    assert [(entry.name, entry.device) for entry in parsed] == list(lines.values())
    data = cli.json("wipe", "--dry-run", "--crypttab", table, tcti=swtpm.tcti)
    validate("wipe", data)
    listed = {(volume["found_by"][0], volume["device"]) for volume in data["volumes"]}
    assert {(f"crypttab {name}", device) for name, device in lines.values()} <= listed, listed
    shown = cli.run("wipe", "--dry-run", "--crypttab", table, tcti=swtpm.tcti)
    for stream in (shown.stdout, shown.stderr):
        assert not _RAW_OUTPUT.search(stream), f"raw {_RAW_OUTPUT.findall(stream)!r} in {stream[:300]!r}"
