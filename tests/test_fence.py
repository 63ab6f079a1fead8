"""PCR-bound derived tokens and the PCR-15 fence (issue 10), on swtpm with the real CLI.

Every test here extends PCRs, so each gets a TPM of its own (`fresh_swtpm`): PCR 15 goes back to
zero only when the TPM is reset, which is what a reboot does and what `Swtpm.restart` does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from luks_tpm import cryptsetup
from luks_tpm.model import FENCE_MESSAGE

from .fixtures_luks import LuksImage, file_digest
from .fixtures_tpm import Swtpm
from .helpers import assert_one_line_error, luks_tpm, luks_tpm_json


def _token(image: Path, token_id: int) -> dict[str, object]:
    with cryptsetup.open_device(image) as device:
        value: dict[str, object] = json.loads(device.token_json_get(token_id) or "{}")
    return value


def _extend(swtpm: Swtpm, index: int, data: bytes) -> None:
    swtpm.tpm2("pcrextend", f"{index}:sha256={hashlib.sha256(data).hexdigest()}")


def _pcr15(swtpm: Swtpm) -> str:
    return swtpm.tpm2("pcrread", "sha256:15").stdout.split("0x")[-1].strip().lower()


def test_pcr_bound_derived_token_unlocks_then_names_the_changed_pcr(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, private_session_keyring: int
) -> None:
    tcti = fresh_swtpm.tcti
    enrolled = luks_tpm_json(
        "enroll", luks_volume.path, "--mode", "derived", "--pcrs", "7", "--unlock-key-file", passphrase_file, tcti=tcti
    )
    assert enrolled["verified"] is True and enrolled["pcrs"] == [7]
    token = _token(luks_volume.path, enrolled["token"])
    assert token["mode"] == "derived" and token["pcrs"] == [7] and len(str(token["policy"])) == 64
    luks_tpm("load-key", luks_volume.path, tcti=tcti)
    _extend(fresh_swtpm, 7, b"new bootloader")
    before = file_digest(luks_volume.path)
    assert_one_line_error(luks_tpm("load-key", luks_volume.path, tcti=tcti, expect=5), "PCR 7")
    assert file_digest(luks_volume.path) == before


def test_format_with_pcrs_and_fence(
    tmp_path: Path, fresh_swtpm: Swtpm, passphrase_file: Path, private_session_keyring: int
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(32 << 20)
    formatted = luks_tpm_json(
        "format",
        image,
        "--passphrase-file",
        passphrase_file,
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--pcrs",
        "7",
        "--fence",
        tcti=fresh_swtpm.tcti,
    )
    assert formatted["fence"] is True and formatted["pcrs"] == [7]
    token = _token(image, formatted["token"])
    assert token["fence"] is True and token["wrapped_key"] is None
    luks_tpm("load-key", image, tcti=fresh_swtpm.tcti)
    luks_tpm("fence", tcti=fresh_swtpm.tcti)
    assert_one_line_error(luks_tpm("load-key", image, tcti=fresh_swtpm.tcti, expect=5), "PCR 15", "fence is up")
    fresh_swtpm.restart()  # a reboot: PCR 15 is zero again, the fenced key comes back
    luks_tpm("load-key", image, tcti=fresh_swtpm.tcti)


def test_fence_closes_fenced_tokens_of_both_modes_and_only_them(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, private_session_keyring: int
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti

    def enroll(*args: str) -> int:
        token_id: int = luks_tpm_json("enroll", image, *args, "--unlock-key-file", passphrase_file, tcti=tcti)["token"]
        return token_id

    fenced = {
        "derived": enroll("--mode", "derived", "--fence"),
        "sealed": enroll("--mode", "sealed", "--pcrs", "7", "--fence"),
    }
    open_ = {"derived": enroll("--mode", "derived"), "sealed": enroll("--mode", "sealed", "--pcrs", "7")}
    for token_id in [*fenced.values(), *open_.values()]:
        luks_tpm("load-key", image, "--token-id", str(token_id), tcti=tcti)
    status = luks_tpm_json("status", image, tcti=tcti)
    assert status["fence_up"] is False
    assert {t["id"]: t["fence"] for t in status["volumes"][0]["tokens"]} == {
        **{i: True for i in fenced.values()},
        **{i: False for i in open_.values()},
    }

    raised = luks_tpm_json("fence", tcti=tcti)
    assert raised["fence"] == "up" and raised["pcr"] == 15 and "sha256" in raised["banks"]
    expected = hashlib.sha256(bytes(32) + hashlib.sha256(FENCE_MESSAGE).digest()).hexdigest()
    assert _pcr15(fresh_swtpm) == expected == raised["sha256"]
    luks_tpm("fence", tcti=tcti)  # again: still up
    assert _pcr15(fresh_swtpm) != "0" * 64

    before = file_digest(image)
    for token_id in fenced.values():
        result = luks_tpm("load-key", image, "--token-id", str(token_id), tcti=tcti, expect=5)
        assert_one_line_error(result, "PCR 15", "can only be recovered before boot completes")
    for token_id in open_.values():
        luks_tpm("load-key", image, "--token-id", str(token_id), tcti=tcti)
    luks_tpm("load-key", image, tcti=tcti)  # without --token-id: an unfenced token still opens it
    assert file_digest(image) == before
    status = luks_tpm_json("status", image, tcti=tcti)
    assert status["fence_up"] is True
    by_id = {t["id"]: t for t in status["volumes"][0]["tokens"]}
    assert all(not by_id[i]["unlocks"] and by_id[i]["cause"] == "fence-up" for i in fenced.values())
    assert all(by_id[i]["unlocks"] for i in open_.values())


def test_enrolling_fenced_tokens_while_the_fence_is_up(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, private_session_keyring: int
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    luks_tpm("fence", tcti=tcti)
    before = file_digest(image)
    result = luks_tpm(
        "enroll", image, "--mode", "derived", "--fence", "--unlock-key-file", passphrase_file, tcti=tcti, expect=7
    )
    assert_one_line_error(result, "fence is up")
    assert file_digest(image) == before
    # sealed: written against PCR 15 = zeros, reported unverified, usable after the next reset
    enrolled = luks_tpm_json(
        "enroll", image, "--mode", "sealed", "--pcrs", "7", "--fence", "--unlock-key-file", passphrase_file, tcti=tcti
    )
    assert enrolled["verified"] is False and enrolled["fence"] is True
    luks_tpm("load-key", image, "--token-id", str(enrolled["token"]), tcti=tcti, expect=5)
    fresh_swtpm.restart()
    luks_tpm("load-key", image, "--token-id", str(enrolled["token"]), tcti=tcti)


def test_derived_refuses_a_pin(luks_volume: LuksImage, swtpm: Swtpm, passphrase_file: Path) -> None:
    result = luks_tpm(
        "enroll",
        luks_volume.path,
        "--mode",
        "derived",
        "--pin",
        "--unlock-key-file",
        passphrase_file,
        tcti=swtpm.tcti,
        expect=2,
    )
    assert "--pin" in result.stderr and "derived" in result.stderr
