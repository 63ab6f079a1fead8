"""`luks-tpm doctor` against a real swtpm, and against a TPM that is not there."""

from __future__ import annotations

from pathlib import Path

from .fixtures_tpm import Swtpm
from .helpers import luks_tpm, luks_tpm_json


def test_doctor_reports_tpm_srk_and_lockout(fresh_swtpm: Swtpm) -> None:
    report = luks_tpm_json("doctor", tcti=fresh_swtpm.tcti)
    checks = {check["name"]: check for check in report["checks"]}
    assert checks["tpm"]["ok"] and fresh_swtpm.tcti in checks["tpm"]["detail"]
    assert report["identity"]["manufacturer"] == "IBM"  # swtpm reports libtpms' manufacturer id
    assert "sha256" in report["banks"]
    assert report["srk"]["persistent"] is False
    lockout = report["lockout"]
    assert lockout["in_lockout"] is False and lockout["failures"] == 0 and lockout["max_failures"] > 0
    assert checks["keyring"]["ok"]

    luks_tpm("persist-srk", tcti=fresh_swtpm.tcti)
    assert luks_tpm_json("doctor", tcti=fresh_swtpm.tcti)["srk"]["persistent"] is True
    fresh_swtpm.tpm2("evictcontrol", "-C", "o", "-c", "0x81000001")  # leave the TPM as we found it


def test_doctor_without_a_tpm(tmp_path: Path) -> None:
    result = luks_tpm("doctor", tcti=f"swtpm:path={tmp_path}/absent.sock", expect=4)
    tpm_lines = [line for line in result.stdout.splitlines() if " tpm:" in line]
    assert len(tpm_lines) == 1 and tpm_lines[0].startswith("BAD")
    assert "no TPM reachable" in tpm_lines[0] and "--tcti" in tpm_lines[0]
    assert "Traceback" not in result.stderr


def test_unreachable_tpm_is_one_line_for_every_command(tmp_path: Path, luks_image: Path) -> None:
    result = luks_tpm("load-key", luks_image, tcti=f"swtpm:path={tmp_path}/absent.sock", expect=4)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("luks-tpm: hint:")]
    assert len(lines) == 1 and "no TPM reachable" in lines[0], result.stderr
