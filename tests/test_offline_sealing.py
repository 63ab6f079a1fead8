"""Sealing for a TPM that is not here (issue 24): `srk-public` on the target, `enroll --for-tpm` on a build
host that has no access to that TPM, and the target unlocking the volume through TPM2_Import. Real swtpms,
real image files, the real command line.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CC, TPM2_SE
from tpm2_pytss.types import TPML_DIGEST

from luks_tpm import cryptsetup
from luks_tpm.model import IMPORT_PARENT_BRANCHES, IMPORT_PARENT_POLICY

from . import volumes
from .fixtures_luks import LuksImage, file_digest
from .fixtures_tpm import Swtpm
from .helpers import REPO, assert_one_line_error, luks_tpm, luks_tpm_json

NOWHERE = "swtpm:path=/nonexistent/luks-tpm-test"  # the build host: no TPM it could reach
PCR7 = "7=" + "00" * 32  # a fresh swtpm's PCR 7


def export(swtpm: Swtpm, tmp_path: Path, name: str = "target.json") -> Path:
    data = luks_tpm_json("srk-public", tcti=swtpm.tcti)
    assert data["type"] == "luks-tpm-target" and data["endorsement"]
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def enroll_for(image: Path, target: Path, passphrase_file: Path, *extra: str | Path, expect: int = 0) -> Any:
    args: list[str | Path] = [
        "enroll",
        image,
        "--mode",
        "sealed",
        "--for-tpm",
        target,
        "--unlock-key-file",
        passphrase_file,
    ]
    return luks_tpm_json(*args, *extra, tcti=NOWHERE, expect=expect)


def token(image: Path, token_id: int) -> dict[str, Any]:
    return volumes.tokens(image)[token_id]


def load_key(image: Path, tcti: str, *extra: str | Path, expect: int = 0) -> Any:
    json_output = ("--json",) if expect == 0 else ()
    return luks_tpm(*json_output, "load-key", image, *extra, tcti=tcti, expect=expect, stdin=b"")


def test_sealed_on_a_build_host_unlocks_on_the_target_only(
    luks_volume: LuksImage,
    swtpm: Swtpm,
    second_swtpm: Swtpm,
    passphrase_file: Path,
    tmp_path: Path,
    private_session_keyring: int,
) -> None:
    image, target = luks_volume.path, export(swtpm, tmp_path)
    enrolled = enroll_for(image, target, passphrase_file, "--pcrs", "7", "--pcr-value", PCR7, "--fence")
    assert enrolled["verified"] is False and enrolled["mode"] == "sealed" and enrolled["pcrs"] == [7]
    written = token(image, enrolled["token"])
    assert written["version"] == 3 and set(written["blob"]) == {"public", "import"}
    assert set(written["blob"]["import"]) == {"duplicate", "seed"}
    provisioning = json.loads(target.read_text())
    assert written["parent"] == {"handle": None, "name": provisioning["import_parent"]["name"]}
    assert written["endorsement"] == provisioning["endorsement"]
    public = base64.b64decode(written["blob"]["public"])
    assert public[12:44].hex() == written["policy"]  # the sealed object's authPolicy is the token's policy

    assert json.loads(load_key(image, swtpm.tcti).stdout)["token"] == enrolled["token"]
    swtpm.assert_clean()  # the import parent and the imported object flushed
    status = luks_tpm_json("status", image, tcti=swtpm.tcti)["volumes"][0]["tokens"][0]
    assert status["unlocks"] is True

    other = load_key(image, second_swtpm.tcti, expect=5)
    assert_one_line_error(other, "different TPM")
    status = luks_tpm_json("status", image, tcti=second_swtpm.tcti, expect=5)["volumes"][0]["tokens"][0]
    assert status["cause"] == "other-tpm"


def test_with_a_pin_and_a_pcr_the_target_no_longer_has(
    luks_volume: LuksImage,
    fresh_swtpm: Swtpm,
    passphrase_file: Path,
    pin_file: Path,
    wrong_pin_file: Path,
    tmp_path: Path,
) -> None:
    image, target = luks_volume.path, export(fresh_swtpm, tmp_path)
    with_pin = enroll_for(image, target, passphrase_file, "--pcrs", "7", "--pcr-value", PCR7, "--pin-file", pin_file)
    assert json.loads(load_key(image, fresh_swtpm.tcti, "--pin-file", pin_file).stdout)["token"] == with_pin["token"]
    assert_one_line_error(load_key(image, fresh_swtpm.tcti, "--pin-file", wrong_pin_file, expect=5), "wrong PIN")

    fresh_swtpm.tpm2("pcrextend", "7:sha256=" + "11" * 32)
    assert_one_line_error(load_key(image, fresh_swtpm.tcti, "--pin-file", pin_file, expect=5), "PCR 7")


def test_a_damaged_import_blob_fails_alone(
    luks_volume: LuksImage, swtpm: Swtpm, passphrase_file: Path, tmp_path: Path, private_session_keyring: int
) -> None:
    image, target = luks_volume.path, export(swtpm, tmp_path)
    first = enroll_for(image, target, passphrase_file)["token"]
    damaged = token(image, first)
    duplicate = bytearray(base64.b64decode(damaged["blob"]["import"]["duplicate"]))
    duplicate[-1] ^= 0x01  # the encrypted sensitive area: the outer HMAC no longer matches
    damaged["blob"]["import"]["duplicate"] = base64.b64encode(bytes(duplicate)).decode()
    with cryptsetup.open_device(image, write=True) as device:
        device.token_json_set(json.dumps(damaged), first)
    alone = load_key(image, swtpm.tcti, expect=3)
    assert_one_line_error(alone, "import blob")
    swtpm.assert_clean()

    second = enroll_for(image, target, passphrase_file)["token"]
    assert json.loads(load_key(image, swtpm.tcti).stdout)["token"] == second
    tokens = {t["id"]: t for t in luks_tpm_json("status", image, tcti=swtpm.tcti)["volumes"][0]["tokens"]}
    assert tokens[first]["unlocks"] is False and tokens[first]["cause"] == "corrupt-token"
    assert tokens[second]["unlocks"] is True


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--mode", "derived"], "--for-tpm makes sealed tokens"),
        (["--mode", "sealed", "--boot-chain"], "--for-tpm makes sealed tokens"),
        (["--mode", "sealed", "--pcrs", "7"], "--pcr-value for PCR 7"),
    ],
    ids=["derived", "boot-chain", "no-pcr-value"],
)
def test_what_cannot_be_sealed_offline_is_refused(
    luks_volume: LuksImage, swtpm: Swtpm, passphrase_file: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    image, target = luks_volume.path, export(swtpm, tmp_path)
    before = file_digest(image)
    result = luks_tpm(
        "enroll", image, *args, "--for-tpm", target, "--unlock-key-file", passphrase_file, tcti=NOWHERE, expect=2
    )
    if fragment.startswith("--for-tpm"):  # refused by the command line itself: click's usage error
        assert "Traceback" not in result.stderr and f"Error: {fragment}" in result.stderr
    else:
        assert_one_line_error(result, fragment)
    assert file_digest(image) == before


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.update(type="something else"), "not a version 1 luks-tpm-target file"),
        (lambda d: d["import_parent"].update(name=d["srk"]["name"]), "import_parent.name is not the name"),
        (lambda d: d.update(import_parent=d["srk"]), "not the target TPM's import parent"),
        (lambda d: d["import_parent"].update(public="AAA*"), "not valid base64"),
    ],
    ids=["type", "name", "srk-instead", "base64"],
)
def test_a_bad_provisioning_file_is_a_usage_error(
    luks_volume: LuksImage, swtpm: Swtpm, passphrase_file: Path, tmp_path: Path, edit: Any, fragment: str
) -> None:
    image, target = luks_volume.path, export(swtpm, tmp_path)
    data = json.loads(target.read_text())
    edit(data)
    target.write_text(json.dumps(data))
    before = file_digest(image)
    result = luks_tpm("enroll", image, "--mode", "sealed", "--for-tpm", target, tcti=NOWHERE, expect=2, stdin=b"")
    assert_one_line_error(result, fragment)
    assert file_digest(image) == before


def test_the_import_parent_policy_is_the_tpms_and_the_documented_one(swtpm: Swtpm) -> None:
    """PolicyOR(PolicyCommandCode(Import), PolicyCommandCode(Load)), replayed in a trial session."""
    with ESAPI(swtpm.tcti) as esapi:
        session = esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, "null", TPM2_ALG.SHA256)
        try:
            esapi.policy_command_code(session, TPM2_CC.Import)
            esapi.policy_or(session, TPML_DIGEST(list(IMPORT_PARENT_BRANCHES)))
            assert bytes(esapi.policy_get_digest(session)) == IMPORT_PARENT_POLICY
        finally:
            esapi.flush_context(session)
    assert IMPORT_PARENT_POLICY.hex() in (REPO / "docs" / "sealing.md").read_text()
