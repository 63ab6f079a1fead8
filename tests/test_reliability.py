"""Regression tests for issue 8's defects 1-6, and "every rewrite keeps unknown token fields".

Each reproduces the defect as a user hits it, through the real CLI (a new process per command), on
real swtpm instances and real LUKS2 images. Defect 7 (an interrupted format) is proven by
tests/test_crash_safety.py; defect 8 (memory) by tests/test_bus_and_memory.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import volumes
from .fixtures_luks import LuksImage, file_digest
from .fixtures_tpm import Swtpm
from .forked_cli import ForkedCli
from .helpers import assert_one_line_error, format_command, luks_tpm

# PCRs are read and extended with tpm2-tools, as an operator would: the tests do not lean on the
# package's TPM layer.
BANKS = ["sha1", "sha256", "sha384"]


def offered_banks(swtpm: Swtpm) -> list[str]:
    caps = swtpm.tpm2("getcap", "pcrs").stdout
    return [bank for bank in BANKS if re.search(rf"^\s*- {bank}: \[ \d", caps, re.MULTILINE)]


def pcr(swtpm: Swtpm, bank: str, index: int) -> bytes:
    path = swtpm.state / f"pcr-{bank}-{index}.bin"
    swtpm.tpm2("pcrread", f"{bank}:{index}", "-o", str(path))
    value = path.read_bytes()
    assert len(value) == hashlib.new(bank).digest_size, value
    return value


def hashed(bank: str, data: bytes) -> bytes:
    return hashlib.new(bank, data).digest()


def extend(swtpm: Swtpm, bank: str, index: int, data: bytes) -> bytes:
    """Extend PCR `index` in `bank` only; returns the new value."""
    digest = hashed(bank, data)
    expected = hashed(bank, pcr(swtpm, bank, index) + digest)
    swtpm.tpm2("pcrextend", f"{index}:{bank}={digest.hex()}")
    assert pcr(swtpm, bank, index) == expected
    return expected


def tokens(image: Path) -> dict[int, dict[str, Any]]:
    return {i: t for i, t in volumes.tokens(image).items() if t.get("type") == "luks-tpm"}


def load_key(
    image: Path, tcti: str, *args: str | Path, expect: int | None = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return luks_tpm("load-key", image, *args, tcti=tcti, expect=expect, stdin=b"", env=env)


def loads_with(image: Path, tcti: str, token_id: int, *args: str | Path) -> bool:
    return run("load-key", image, "--token-id", str(token_id), *args, tcti=tcti, expect=None).returncode == 0


# Most commands run through the fork server (tests/forked_cli.py): the same entry point in a process
# of its own per command, without the interpreter's start-up. The TSS2_LOG test needs the variable at
# import time, so it runs the real `python -m luks_tpm`.
_runner: list[ForkedCli] = []


@pytest.fixture(autouse=True)
def _fast_cli(cli: ForkedCli) -> Iterator[None]:
    _runner.append(cli)
    yield
    _runner.pop()


def run(*args: str | Path, tcti: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    return _runner[-1].run(*args, tcti=tcti, expect=expect)


def run_json(*args: str | Path, tcti: str) -> Any:
    return _runner[-1].json(*args, tcti=tcti)


def format_derived(image: Path, tcti: str, passphrase: Path) -> Any:
    with open(image, "wb") as handle:
        handle.truncate(32 << 20)
    return run_json(*format_command(image, passphrase), tcti=tcti)


def volume_key(image: Path, passphrase: Path, tmp_path: Path) -> bytes:
    return volumes.dump_volume_key(image, passphrase, tmp_path / "volume-key.bin")


# ---- 1. every PCR bank the TPM offers ------------------------------------------------------------------


@pytest.mark.parametrize("bank", BANKS)
def test_enroll_reseal_unlock_on_every_bank(
    bank: str, luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, private_session_keyring: int
) -> None:
    tcti = fresh_swtpm.tcti
    if bank not in offered_banks(fresh_swtpm):
        pytest.skip(f"this swtpm offers no {bank} bank")
    image = luks_volume.path
    enrolled = run_json(
        "enroll",
        image,
        "--mode",
        "sealed",
        "--pcr-bank",
        str(bank),
        "--pcrs",
        "7",
        "--unlock-key-file",
        passphrase_file,
        tcti=tcti,
    )
    first = enrolled["token"]
    assert tokens(image)[first]["pcr_bank"] == str(bank)
    assert loads_with(image, tcti, first), f"a {bank} token enrolled with exit 0 does not unlock"

    # sealed to given values equal to the current ones: must unlock now
    current = pcr(fresh_swtpm, bank, 7)
    given = run_json(
        "enroll",
        image,
        "--mode",
        "sealed",
        "--pcr-bank",
        str(bank),
        "--pcr-value",
        f"7={current.hex()}",
        "--unlock-key-file",
        passphrase_file,
        tcti=tcti,
    )
    assert loads_with(image, tcti, given["token"]), (
        f"{bank}: sealed to the current value given as --pcr-value, the token cannot unseal"
    )

    # reseal ahead of an extend of that bank, then extend: the new token must unlock
    predicted = hashed(bank, current + hashed(bank, b"planned update"))
    resealed = run_json("reseal", image, "--token-id", str(first), "--pcr-value", f"7={predicted.hex()}", tcti=tcti)
    extend(fresh_swtpm, bank, 7, b"planned update")
    assert loads_with(image, tcti, resealed["token"]), f"{bank}: a resealed token does not unlock after the extend"

    # reseal to the current values (from the recovery passphrase): unlocks
    again = run_json(
        "reseal", image, "--token-id", str(resealed["token"]), "--unlock-key-file", passphrase_file, tcti=tcti
    )
    assert loads_with(image, tcti, again["token"]), f"{bank}: reseal to current values does not unlock"


# ---- 2. TSS2_LOG never shows the key ------------------------------------------------------------------


def _leaks(key: bytes, text: str) -> list[str]:
    """Where 16-byte windows of `key` appear in `text`: raw, as hex, as spaced hex (ESYS's blob dumps)."""
    low = text.lower()
    squeezed = "".join(ch for ch in low if ch in "0123456789abcdef")
    found = []
    for start in range(0, len(key) - 15, 8):
        window = key[start : start + 16]
        if window.decode("latin-1") in text:
            found.append(f"raw bytes {start}-{start + 15}")
        if window.hex() in low or " ".join(f"{b:02x}" for b in window) in low:
            found.append(f"hex bytes {start}-{start + 15}")
        elif window.hex() in squeezed:
            found.append(f"hex (with separators) bytes {start}-{start + 15}")
    return found


@pytest.mark.parametrize("mode", ["derived", "sealed"])
def test_tss2_log_trace_never_prints_the_key(
    mode: str, tmp_path: Path, fresh_swtpm: Swtpm, private_session_keyring: int
) -> None:
    tcti = fresh_swtpm.tcti
    passphrase = volumes.passphrase_file(tmp_path)
    image = tmp_path / "disk.img"
    env = {"TSS2_LOG": "all+trace"}
    if mode == "derived":
        with open(image, "wb") as handle:
            handle.truncate(32 << 20)
        formatted = luks_tpm(
            "--json",
            "format",
            image,
            "--passphrase-file",
            passphrase,
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            tcti=tcti,
            env=env,
        )
        outputs = [formatted]
    else:
        volumes.luks_format(image, passphrase, size=8 << 20)
        outputs = [
            luks_tpm(
                "--json",
                "enroll",
                image,
                "--mode",
                "sealed",
                "--pcrs",
                "7",
                "--unlock-key-file",
                passphrase,
                tcti=tcti,
                env=env,
            )
        ]
    key = volume_key(image, passphrase, tmp_path)
    assert len(key) == 64
    outputs.append(load_key(image, tcti, env=env))
    outputs.append(luks_tpm("status", image, tcti=tcti, env=env))
    verbose = luks_tpm("-v", "load-key", image, tcti=tcti, stdin=b"", env=env)
    outputs.append(verbose)
    for result in outputs:
        leaks = _leaks(key, result.stderr) + _leaks(key, result.stdout)
        assert not leaks, (
            f"{' '.join(map(str, result.args[5:7]))}: the volume key is on stderr/stdout with "
            f"TSS2_LOG=all+trace: {leaks}"
        )
    assert "TSS2_LOG" in verbose.stderr, "with -v, luks-tpm should say it overrode the user's TSS2_LOG"


# ---- 3. reseal with a wrong PIN --------------------------------------------------------------------------


def test_reseal_with_a_wrong_pin_refuses(
    luks_volume: LuksImage,
    fresh_swtpm: Swtpm,
    passphrase_file: Path,
    pin_file: Path,
    wrong_pin_file: Path,
    private_session_keyring: int,
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    token_id = run_json(
        "enroll",
        image,
        "--mode",
        "sealed",
        "--pcrs",
        "7",
        "--pin-file",
        pin_file,
        "--unlock-key-file",
        passphrase_file,
        tcti=tcti,
    )["token"]
    before = file_digest(image)
    result = run(
        "reseal", image, "--pin-file", wrong_pin_file, "--unlock-key-file", passphrase_file, tcti=tcti, expect=None
    )
    new = set(tokens(image)) - {token_id}
    resealed_to_wrong = [i for i in new if loads_with(image, tcti, i, "--pin-file", wrong_pin_file)]
    fresh_swtpm.tpm2("dictionarylockout", "--clear-lockout")
    assert not resealed_to_wrong, "reseal sealed the new token to the PIN that had just failed"
    assert result.returncode not in (0, 1), f"reseal with a wrong PIN exited {result.returncode}: {result.stderr}"
    # progress lines may come first; the error is the last line that is not a hint
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.startswith("luks-tpm: ") and not line.startswith("luks-tpm: hint:")
    ]
    assert "Traceback" not in result.stderr and lines and "PIN" in lines[-1], result.stderr
    assert file_digest(image) == before
    assert loads_with(image, tcti, token_id, "--pin-file", pin_file)


# ---- 4. reseal --pcr-value keeps the working token unless --force ------------------------------------


def test_reseal_to_given_values_keeps_the_working_token(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, private_session_keyring: int
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    old = run_json("enroll", image, "--mode", "sealed", "--pcrs", "7", "--unlock-key-file", passphrase_file, tcti=tcti)[
        "token"
    ]
    wrong = hashlib.sha256(b"a value this TPM will never have").hexdigest()
    resealed = run_json("reseal", image, "--pcr-value", f"7={wrong}", tcti=tcti)
    present = tokens(image)
    assert old in present, f"reseal --pcr-value removed the working token {old} for one it could not verify"
    assert loads_with(image, tcti, old)
    new = resealed["token"]
    assert new in present and present[new]["pcr_values"]["7"] == wrong
    assert resealed.get("removed") in (None, []), resealed
    status = run_json("status", image, tcti=tcti)["volumes"][0]["tokens"]
    (entry,) = [t for t in status if t["id"] == new]
    assert entry["unlocks"] is False
    # with --force the unverified token replaces the old one
    forced = run_json("reseal", image, "--token-id", str(old), "--pcr-value", f"7={wrong}", "--force", tcti=tcti)
    assert old not in tokens(image) and forced["token"] in tokens(image)


# ---- 5. remove does not count a dead token as a way in -------------------------------------------------


@pytest.mark.parametrize("death", ["owner-cleared", "other-tpm"])
def test_remove_does_not_count_a_dead_token(
    death: str, luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, tmp_path: Path
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    other: Swtpm | None = None
    if death == "owner-cleared":
        dead = run_json("enroll", image, "--mode", "derived", "--unlock-key-file", passphrase_file, tcti=tcti)["token"]
        fresh_swtpm.tpm2("clear", "-c", "p")
    else:
        other = Swtpm(tmp_path / "other")
        other.start()
        dead = run_json("enroll", image, "--mode", "derived", "--unlock-key-file", passphrase_file, tcti=other.tcti)[
            "token"
        ]
        other.stop()
    try:
        working = run_json("enroll", image, "--mode", "sealed", "--unlock-key-file", passphrase_file, tcti=tcti)[
            "token"
        ]
        volumes.run("cryptsetup", "luksKillSlot", "--batch-mode", image, "0")
        assert volumes.keyslots(image) == []
        reason = run_json("status", image, tcti=tcti)["volumes"][0]["tokens"]
        assert [t["unlocks"] for t in reason if t["id"] == dead] == [False]
        before = file_digest(image)
        result = run("remove", image, "--token-id", str(working), tcti=tcti, expect=None)
        assert result.returncode == 7, (
            f"remove of the only working token exited {result.returncode} "
            f"(the other token is dead: {death}): {result.stderr}"
        )
        assert_one_line_error(result, "last")
        assert file_digest(image) == before
        assert loads_with(image, tcti, working)
        run("remove", image, "--token-id", str(dead), tcti=tcti)
        assert loads_with(image, tcti, working)
    finally:
        if other is not None:
            other.stop()


# ---- 6. an evicted persistent SRK ---------------------------------------------------------------------


def test_evicted_persistent_srk_still_unlocks_with_a_warning(
    tmp_path: Path, fresh_swtpm: Swtpm, private_session_keyring: int
) -> None:
    tcti = fresh_swtpm.tcti
    run("persist-srk", tcti=tcti)
    passphrase = volumes.passphrase_file(tmp_path)
    image = tmp_path / "disk.img"
    format_derived(image, tcti, passphrase)
    sealed = run_json("enroll", image, "--mode", "sealed", "--pcrs", "7", "--unlock-key-file", passphrase, tcti=tcti)[
        "token"
    ]
    for token in tokens(image).values():
        assert token["parent"]["handle"] == "0x81000001"
    fresh_swtpm.tpm2("evictcontrol", "-C", "o", "-c", "0x81000001")
    before = file_digest(image)
    for token_id in (0, sealed):
        result = run("load-key", image, "--token-id", str(token_id), tcti=tcti, expect=None)
        assert result.returncode == 0, (
            f"token {token_id}: the SRK is re-creatable from its template, yet: {result.stderr}"
        )
        assert "0x81000001" in result.stderr and "persist-srk" in result.stderr, (
            f"no warning that the persistent SRK is missing and how to restore it: {result.stderr!r}"
        )
    status = run_json("status", image, tcti=tcti)["volumes"][0]["tokens"]
    assert all(t["unlocks"] for t in status), status
    assert file_digest(image) == before
    run("persist-srk", tcti=tcti)
    assert run("load-key", image, tcti=tcti).stderr == ""


# ---- every rewrite keeps unknown token fields -----------------------------------------------------------


UNKNOWN = {"x-site": "rack 12", "x-nested": {"list": [1, "two", None], "flag": True}}


@pytest.mark.parametrize("how", ["from-token", "from-passphrase", "to-given-values"])
def test_reseal_keeps_unknown_fields(
    how: str, luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    token_id = run_json(
        "enroll", image, "--mode", "sealed", "--pcrs", "7", "--unlock-key-file", passphrase_file, tcti=tcti
    )["token"]
    token = tokens(image)[token_id]
    volumes.set_token(image, json.dumps({**token, **UNKNOWN}), token_id)
    args: list[str | Path] = ["reseal", image, "--token-id", str(token_id)]
    if how == "from-passphrase":
        extend(fresh_swtpm, "sha256", 7, b"update")
        args += ["--unlock-key-file", passphrase_file]
    elif how == "to-given-values":
        args += ["--pcr-value", f"7={hashlib.sha256(b'next').hexdigest()}"]
    new = run_json(*args, tcti=tcti)["token"]
    rewritten = tokens(image)[new]
    for key, value in UNKNOWN.items():
        assert rewritten.get(key) == value, f"reseal ({how}) dropped the unknown field {key!r}: {rewritten}"
