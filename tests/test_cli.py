"""Command-line conventions (issue 15): global options before and after the command, cryptsetup's
spellings, errors as JSON with --json, tracebacks only with -v. The real CLI in separate processes,
against a real swtpm and real LUKS2 image files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from luks_tpm import cli

from .fixtures_luks import file_digest
from .fixtures_tpm import Swtpm
from .helpers import REPO, assert_one_line_error, format_command, format_derived, luks_tpm, luks_tpm_json
from .json_schema import validate

GLOBAL_OPTIONS = ("--tcti SPEC", "--json", "-v, --verbose", "--debug")


@pytest.fixture
def derived_image(swtpm: Swtpm, tmp_path: Path, passphrase: Path) -> Path:
    image = tmp_path / "derived.img"
    format_derived(image, swtpm.tcti, passphrase)
    return image


# ---- global options anywhere ------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *sorted(cli.main.commands)])
def test_every_help_lists_the_global_options(command: str | None) -> None:
    result = luks_tpm(*([command] if command else []), "--help", tcti=None)
    for option in GLOBAL_OPTIONS:
        assert option in result.stdout, f"{command or 'luks-tpm'} --help does not list {option}"


def test_doctor_json_after_the_command(swtpm: Swtpm) -> None:
    report = json.loads(luks_tpm("doctor", "--json", "--tcti", swtpm.tcti, tcti=None).stdout)
    validate("doctor", report)
    assert (report["checks"][0]["name"], report["checks"][0]["ok"]) == ("tpm", True)
    assert "OK  tpm:" in luks_tpm("doctor", "-v", "--tcti", swtpm.tcti, tcti=None).stdout


def test_status_json_before_and_after_the_command(swtpm: Swtpm, derived_image: Path) -> None:
    after = json.loads(luks_tpm("status", "--json", derived_image, tcti=swtpm.tcti).stdout)
    before = json.loads(luks_tpm("--json", "status", derived_image, tcti=swtpm.tcti).stdout)
    last = json.loads(luks_tpm("status", derived_image, "--json", tcti=swtpm.tcti).stdout)
    for report in (after, before, last):
        validate("status", report)
        assert report["volumes"][0]["device"] == str(derived_image) and report["unlocks"] is True
    assert after == before == last


def test_tcti_after_the_device(swtpm: Swtpm, derived_image: Path) -> None:
    result = luks_tpm("status", derived_image, "--tcti", swtpm.tcti, tcti=None)
    assert "unlocks now" in result.stdout


def test_tcti_after_the_command_wins_over_one_before(swtpm: Swtpm, derived_image: Path, tmp_path: Path) -> None:
    luks_tpm("--tcti", f"swtpm:path={tmp_path}/absent.sock", "status", derived_image, "--tcti", swtpm.tcti, tcti=None)


def test_tcti_from_the_environment(swtpm: Swtpm, derived_image: Path) -> None:
    luks_tpm("status", derived_image, tcti=None, env={"LUKS_TPM_TCTI": swtpm.tcti})


def test_load_key_verbose_after_the_device(swtpm: Swtpm, derived_image: Path, private_session_keyring: int) -> None:
    result = luks_tpm("load-key", derived_image, "-v", tcti=swtpm.tcti)
    assert int(result.stdout.split()[0]) > 0
    assert "libcryptsetup" not in result.stderr and "luks_tpm.cryptsetup" not in result.stderr


@pytest.mark.parametrize("spelling", [("--debug",), ("-vv",), ("--verbose", "--verbose")])
def test_debug_is_vv_and_turns_on_libcryptsetups_log(
    swtpm: Swtpm, derived_image: Path, spelling: tuple[str, ...], private_session_keyring: int
) -> None:
    result = luks_tpm("load-key", derived_image, *spelling, tcti=swtpm.tcti)
    assert f"luks-tpm: luks_tpm.cryptsetup: Trying to load any crypt type from device {derived_image}" in result.stderr


def test_verbose_counts_across_both_sides(swtpm: Swtpm, derived_image: Path, private_session_keyring: int) -> None:
    result = luks_tpm("-v", "load-key", derived_image, "-v", tcti=swtpm.tcti)
    assert "luks_tpm.cryptsetup" in result.stderr


# ---- cryptsetup's spellings -------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["-q", "--batch-mode"])
def test_batch_mode_is_yes(swtpm: Swtpm, derived_image: Path, passphrase: Path, spelling: str) -> None:
    before = file_digest(derived_image)
    result = luks_tpm("format", derived_image, "--no-recovery", tcti=swtpm.tcti, expect=7, stdin=b"")
    assert_one_line_error(result, "already holds a LUKS header", "not asking: no terminal")
    assert file_digest(derived_image) == before
    report = luks_tpm_json(*format_command(derived_image, passphrase), spelling, tcti=swtpm.tcti)
    validate("format", report)
    assert file_digest(derived_image) != before


@pytest.mark.parametrize("spelling", ["--key-file", "--unlock-key-file"])
def test_key_file_is_unlock_key_file(swtpm: Swtpm, derived_image: Path, passphrase: Path, spelling: str) -> None:
    report = luks_tpm_json("enroll", derived_image, "--mode", "derived", spelling, passphrase, tcti=swtpm.tcti)
    validate("enroll", report)
    assert report["token"] == 1 and report["verified"] is True


# ---- usage errors -----------------------------------------------------------------------------------

USAGE_ERRORS = [
    (["status", "--bogus", "--json", "DEV"], "No such option '--bogus'"),  # click stops at --bogus
    (["status", "DEV", "--json", "--bogus"], "No such option '--bogus'"),
    (["--bogus", "status", "--json"], "No such option '--bogus'"),  # the group stops there
    (["--json", "status", "--bogus"], "No such option '--bogus'"),
    (["status", "DEV", "--json", "--tcti"], "Option '--tcti' requires an argument"),
    (["--json", "--tcti"], "Option '--tcti' requires an argument"),
    (["remove", "DEV", "--token-id", "99", "--json"], "'--token-id': 99 is not in the range"),
    (["load-key", "--json"], "Missing argument 'DEVICE...'"),
    (["--json", "no-such-command"], "No such command 'no-such-command'"),
    (["--json"], "Missing command"),
    (["enroll", "DEV", "--json", "--mode", "derived", "--pin"], "--pin and --pin-file apply to --mode sealed"),
    (["enroll", "DEV", "--mode", "derived", "--pcrs", "7,99", "--json"], "a comma-separated list of PCR indices"),
    (["open", "--json", "DEV"], "give DEVICE and NAME, or --all"),
    (["request-key", "--json"], "only /sbin/request-key can run it"),
]


@pytest.mark.parametrize(("line", "fragment"), USAGE_ERRORS, ids=[" ".join(line) for line, _ in USAGE_ERRORS])
def test_usage_errors_with_json_are_json(luks_image: Path, tmp_path: Path, line: list[str], fragment: str) -> None:
    args = [str(luks_image) if word == "DEV" else word for word in line]
    before = file_digest(luks_image)
    no_tpm = f"swtpm:path={tmp_path}/absent.sock"  # a usage error is found before any TPM is needed
    result = luks_tpm(*args, tcti=no_tpm, expect=2)
    report = json.loads(result.stdout)
    validate("error", report)
    assert fragment in report["error"]["message"]
    assert report["error"]["code"] == 2 and report["error"]["cause"] == "usage"
    assert report["error"]["hint"] and "--help" in report["error"]["hint"]
    assert result.stderr == ""
    assert file_digest(luks_image) == before

    without = luks_tpm(*[word for word in args if word != "--json"], tcti=no_tpm, expect=2)
    assert without.stdout == "" and fragment in without.stderr


def test_device_error_with_json_is_json(swtpm: Swtpm, tmp_path: Path) -> None:
    result = luks_tpm("status", tmp_path / "absent.img", "--json", tcti=swtpm.tcti, expect=3)
    report = json.loads(result.stdout)
    validate("error", report)
    assert report["error"] == {
        "message": f"{tmp_path / 'absent.img'}: no such file or device",
        "hint": "check the device path",
        "code": 3,
        "cause": "device",
    }
    assert "luks-tpm:" not in result.stderr  # the error is said once, on stdout


# ---- bugs: a traceback only with -v -----------------------------------------------------------------

# A bug cannot be provoked for real (a bug that can be provoked gets fixed), so this one is planted:
# the child process replaces doctor's implementation with one that fails the way a bug does, then
# runs the real main() with the real command line.
_PLANTED_BUG = textwrap.dedent("""
    import sys
    import luks_tpm.doctor
    from luks_tpm.__main__ import main

    def planted(tcti):
        raise KeyError("planted bug")

    luks_tpm.doctor.doctor = planted
    main(sys.argv[1:])
""")


def _with_planted_bug(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _PLANTED_BUG, *args], capture_output=True, text=True, cwd=REPO, check=False
    )


@pytest.mark.parametrize("verbose", [["-v"], ["--verbose"], ["--debug"]])
def test_bug_shows_a_traceback_with_verbose(verbose: list[str]) -> None:
    result = _with_planted_bug("doctor", *verbose)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "KeyError: 'planted bug'" in result.stderr
    assert "luks-tpm: internal error (KeyError)" in result.stderr


def test_bug_hides_the_traceback_without_verbose() -> None:
    result = _with_planted_bug("doctor")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "planted" not in result.stderr
    assert result.stderr.splitlines() == [
        "luks-tpm: internal error (KeyError)",
        "luks-tpm: hint: rerun with -v and report it",
    ]


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_bug_with_json_is_a_json_error(verbose: list[str]) -> None:
    result = _with_planted_bug("doctor", "--json", *verbose)
    assert result.returncode == 1
    report: dict[str, Any] = json.loads(result.stdout)
    validate("error", report)
    assert report["error"]["code"] == 1 and report["error"]["cause"] is None
    assert report["error"]["message"] == "internal error (KeyError)"
    assert ("Traceback" in result.stderr) == bool(verbose)
