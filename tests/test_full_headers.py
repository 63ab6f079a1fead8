"""Full headers (issue 8, "Full headers"): 32 tokens, or a JSON area with no room for another token,
get a message that says so and what to do; nothing is changed, no way in is lost.

The other tokens are another tool's (`"type": "other-tool"`), written as `cryptsetup token import`
does: luks-tpm must not touch them either.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from . import volumes
from .fixtures_luks import file_digest
from .fixtures_tpm import Swtpm
from .forked_cli import ForkedCli


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("luks-tpm: hint:")]


def _hint(stderr: str) -> str:
    return " ".join(line for line in stderr.splitlines() if line.startswith("luks-tpm: hint:"))


def _foreign(number: int, filler: str = "") -> str:
    return json.dumps({"type": "other-tool", "keyslots": [], "n": number, **({"data": filler} if filler else {})})


def _fill_json_area(image: Path) -> int:
    """One foreign token as large as still fits, then smaller ones: less than 300 bytes stay free."""
    added = 0
    for size in (8192, 4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 1):
        while volumes.set_token(image, _foreign(added, "z" * size)) is not None:
            added += 1
    return added


def _assert_refused_clearly(result: object, image: Path, before: str, what: str, words: tuple[str, ...]) -> None:
    code = result.returncode  # type: ignore[attr-defined]
    stderr: str = result.stderr  # type: ignore[attr-defined]
    lines = _error_lines(stderr)
    problems = []
    if code in (0, 1) or "Traceback" in stderr:
        problems.append(f"exit {code}")
    message = lines[-1].replace(str(image), "IMAGE").lower() if lines else ""
    if not any(w in message for w in words):
        problems.append(f"the message does not say {' or '.join(words)}")
    if "remove" not in _hint(stderr).lower() and "metadata-size" not in _hint(stderr).lower():
        problems.append("the hint does not say what to do (remove a token, or a larger --luks2-metadata-size)")
    if file_digest(image) != before:
        problems.append("the header changed")
    assert not problems, f"{what}: {'; '.join(problems)}: {stderr!r}"


@pytest.fixture
def tpm(fresh_swtpm: Swtpm) -> Swtpm:
    return fresh_swtpm


def test_enroll_on_31_and_32_tokens(tmp_path: Path, tpm: Swtpm, cli: ForkedCli) -> None:
    passphrase = volumes.passphrase_file(tmp_path)
    image = volumes.luks_format(tmp_path / "disk.img", passphrase, metadata="16k")
    for number in range(31):
        assert volumes.set_token(image, _foreign(number)) == number
    enrolled = cli.json("enroll", image, "--mode", "derived", "--unlock-key-file", passphrase, tcti=tpm.tcti)
    assert enrolled["token"] == 31
    before = file_digest(image)
    result = cli.run("enroll", image, "--mode", "sealed", "--unlock-key-file", passphrase, tcti=tpm.tcti, expect=None)
    _assert_refused_clearly(result, image, before, "enroll on 32 tokens", ("32", "token slots", "no free token"))
    assert cli.run("load-key", image, tcti=tpm.tcti).returncode == 0
    assert volumes.passphrase_opens(image, passphrase)


@pytest.mark.parametrize("mode", ["derived", "sealed"])
def test_enroll_on_a_full_json_area(mode: str, tmp_path: Path, tpm: Swtpm, cli: ForkedCli) -> None:
    passphrase = volumes.passphrase_file(tmp_path)
    image = volumes.luks_format(tmp_path / "disk.img", passphrase, metadata="16k")
    filled = _fill_json_area(image)
    assert 0 < filled < 32
    before = file_digest(image)
    result = cli.run("enroll", image, "--mode", mode, "--unlock-key-file", passphrase, tcti=tpm.tcti, expect=None)
    _assert_refused_clearly(
        result, image, before, f"enroll {mode} on a full JSON area", ("full", "no room", "no space", "metadata")
    )
    assert volumes.passphrase_opens(image, passphrase)


def test_reseal_on_a_full_json_area_keeps_the_old_token(tmp_path: Path, tpm: Swtpm, cli: ForkedCli) -> None:
    passphrase = volumes.passphrase_file(tmp_path)
    image = volumes.luks_format(tmp_path / "disk.img", passphrase, metadata="16k")
    sealed = cli.json(
        "enroll", image, "--mode", "sealed", "--pcrs", "7", "--unlock-key-file", passphrase, tcti=tpm.tcti
    )["token"]
    _fill_json_area(image)
    before = file_digest(image)
    result = cli.run("reseal", image, "--token-id", str(sealed), tcti=tpm.tcti, expect=None)
    _assert_refused_clearly(
        result, image, before, "reseal on a full JSON area", ("full", "no room", "no space", "metadata")
    )
    assert cli.run("load-key", image, "--token-id", str(sealed), tcti=tpm.tcti).returncode == 0
