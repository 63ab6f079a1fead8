"""TPM-derived keys end to end: real swtpm, real image files, real cryptsetup, real kernel keyring."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from luks_tpm import cryptsetup, derive
from luks_tpm.secret import Secret
from luks_tpm.tokenformat import DerivedToken, parse
from luks_tpm.tpm import Tpm
from luks_tpm.tpm import srk as tpm_srk
from luks_tpm.tpm.keyuse import KeyUse
from luks_tpm.unlock import Recovery

from .fixtures_luks import LuksImage, file_digest
from .fixtures_tpm import Swtpm
from .helpers import assert_one_line_error, format_derived, luks_tpm, luks_tpm_json


def _proc_keys(description: str) -> list[list[str]]:
    return [
        line.split(None, 8)
        for line in Path("/proc/keys").read_text().splitlines()
        if line.rstrip().endswith(description) or f" {description}:" in line
    ]


def test_format_then_load_key_in_another_process(
    tmp_path: Path, swtpm: Swtpm, recovery_file: Path, private_session_keyring: int
) -> None:
    image = tmp_path / "disk.img"
    formatted = format_derived(image, swtpm.tcti, recovery_file)
    uuid = formatted["uuid"]
    dump = subprocess.run(["cryptsetup", "luksDump", str(image)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^\s+0: luks-tpm$", dump, re.MULTILINE), dump
    assert uuid in dump

    loaded = luks_tpm_json("load-key", image, "--table", tcti=swtpm.tcti)
    description = f"cryptsetup:{uuid}-d0"
    assert loaded["description"] == description
    assert loaded["table"].startswith("0 ")
    assert f" crypt aes-xts-plain64 :64:logon:{description} 0 {image} 32768" in loaded["table"]
    rows = _proc_keys(description)
    assert len(rows) == 1, Path("/proc/keys").read_text()
    serial, _flags, _usage, _expiry, perm, _uid, _gid, key_type, rest = rows[0]
    assert int(serial, 16) == loaded["serial"]
    assert key_type == "logon"
    assert rest.startswith(description)
    assert int(perm, 16) == 0x2D000000 or int(perm, 16) & 0x00FFFFFF == 0, perm  # nothing for user/group/other


@pytest.mark.parametrize("spec", ["@p", "@t"])
def test_load_key_into_a_keyring_that_exists_only_once_asked_for(
    tmp_path: Path, swtpm: Swtpm, recovery_file: Path, spec: str
) -> None:
    """A new process has no process or thread keyring until one is asked for (the side-by-side benchmark
    loads into @p, which goes away with the process)."""
    image = tmp_path / "disk.img"
    format_derived(image, swtpm.tcti, recovery_file)
    loaded = luks_tpm_json("load-key", image, "--keyring", spec, tcti=swtpm.tcti)
    assert loaded["serial"] > 0
    assert loaded["keyring"] > 0  # the keyring's real serial (docs/json.md), created for the command


def test_key_survives_restart_and_is_destroyed_by_owner_clear(
    tmp_path: Path, fresh_swtpm: Swtpm, recovery_file: Path
) -> None:
    image = tmp_path / "disk.img"
    format_derived(image, fresh_swtpm.tcti, recovery_file)
    fresh_swtpm.restart()
    assert luks_tpm_json("status", image, tcti=fresh_swtpm.tcti)["volumes"][0]["tokens"][0]["unlocks"] is True

    before = file_digest(image)
    fresh_swtpm.tpm2("clear", "-c", "p")
    result = luks_tpm("load-key", image, tcti=fresh_swtpm.tcti, expect=5)
    assert_one_line_error(result, "owner hierarchy was cleared")
    assert "recovery key" in result.stderr
    status = luks_tpm_json("status", image, tcti=fresh_swtpm.tcti, expect=5)["volumes"][0]["tokens"][0]
    assert status["unlocks"] is False and "cleared" in status["reason"]
    assert file_digest(image) == before
    # the recovery passphrase still opens it with plain cryptsetup
    subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(recovery_file), str(image)], check=True
    )


def test_other_tpm_is_named_as_such(tmp_path: Path, swtpm: Swtpm, recovery_file: Path) -> None:
    image = tmp_path / "disk.img"
    format_derived(image, swtpm.tcti, recovery_file)
    other = Swtpm(tmp_path / "other")
    other.start()
    try:
        result = luks_tpm("load-key", image, tcti=other.tcti, expect=5)
        assert_one_line_error(result, "different TPM")
    finally:
        other.stop()


def test_enroll_keeps_other_tokens_and_keyslots(luks_volume: LuksImage, swtpm: Swtpm, passphrase_file: Path) -> None:
    image = luks_volume.path
    foreign = json.dumps(
        {
            "type": "systemd-tpm2",
            "keyslots": ["0"],
            "tpm2-blob": "AAAA",
            "tpm2-pcrs": [7],
            "tpm2-pcr-bank": "sha256",
            "tpm2-primary-alg": "ecc",
            "tpm2-policy-hash": "00" * 32,
        }
    )
    subprocess.run(["cryptsetup", "token", "import", str(image)], input=foreign, text=True, check=True)
    with cryptsetup.open_device(image) as device:
        foreign_before = device.token_json_get(0)
        keyslots_before = device.metadata()["keyslots"]
    enrolled = luks_tpm_json(
        "enroll", image, "--mode", "derived", "--unlock-key-file", passphrase_file, tcti=swtpm.tcti
    )
    assert enrolled["verified"] is True
    with cryptsetup.open_device(image) as device:
        assert device.token_json_get(0) == foreign_before
        assert device.metadata()["keyslots"] == keyslots_before
        token = parse(device.token_json_get(enrolled["token"]) or "", enrolled["token"])
        assert isinstance(token, DerivedToken)
        assert token.wrapped_key is not None and len(token.wrapped_key) == 64 + 8
        with (
            Tpm(swtpm.tcti) as tpm,
            Recovery(tpm) as recovery,
            recovery.key_from_token(luks_volume.uuid, enrolled["token"], token) as key,
        ):
            assert key.equals(luks_volume.volume_key)
    before_repair = file_digest(image)
    subprocess.run(["cryptsetup", "repair", "--batch-mode", str(image)], check=True, capture_output=True)
    assert file_digest(image) == before_repair, "cryptsetup repair found something to fix in our header"


def test_enroll_refuses_luks1_and_wrong_passphrase(
    luks1_image: Path, luks_volume: LuksImage, swtpm: Swtpm, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the passphrase")
    before = file_digest(luks1_image)
    result = luks_tpm("enroll", luks1_image, "--mode", "derived", "--unlock-key-file", wrong, tcti=swtpm.tcti, expect=8)
    assert_one_line_error(result, "LUKS1")
    assert file_digest(luks1_image) == before

    before = file_digest(luks_volume.path)
    result = luks_tpm(
        "enroll", luks_volume.path, "--mode", "derived", "--unlock-key-file", wrong, tcti=swtpm.tcti, expect=5
    )
    assert_one_line_error(result, "passphrase")
    assert file_digest(luks_volume.path) == before


def _set_token(image: Path, token_id: int, text: str) -> None:
    with cryptsetup.open_device(image) as device:
        device.token_remove(token_id)
        assert device.token_json_set(text, token_id) == token_id


@pytest.mark.parametrize(
    ("edit", "message", "code"),
    [
        (lambda t: {**t, "version": 4}, "version 4", 8),
        (lambda t: {k: v for k, v in t.items() if k != "salt"}, "'salt' is missing", 3),
        (lambda t: {**t, "salt": "not base64!"}, "damaged", 3),
        (lambda t: {**t, "digest": 7}, "digest 7", 5),
        (lambda t: {**t, "key_size": 32}, "does not open the volume", 5),
        (lambda t: {**t, "salt": "A" * 43 + "="}, "does not open the volume", 5),
    ],
    ids=["future-version", "missing-field", "corrupt-field", "missing-digest", "wrong-key-size", "other-salt"],
)
def test_bad_tokens_fail_cleanly_and_change_nothing(
    tmp_path: Path, swtpm: Swtpm, recovery_file: Path, edit: object, message: str, code: int
) -> None:
    image = tmp_path / "disk.img"
    format_derived(image, swtpm.tcti, recovery_file)
    with cryptsetup.open_device(image) as device:
        original = json.loads(device.token_json_get(0) or "")
    _set_token(image, 0, json.dumps(edit(original)))  # type: ignore[operator]
    before = file_digest(image)
    result = luks_tpm("load-key", image, tcti=swtpm.tcti, expect=code)
    assert_one_line_error(result, message)
    assert file_digest(image) == before


def test_reencrypted_volume_is_detected(tmp_path: Path, swtpm: Swtpm, recovery_file: Path) -> None:
    image = tmp_path / "disk.img"
    format_derived(image, swtpm.tcti, recovery_file)
    subprocess.run(
        [
            "cryptsetup",
            "reencrypt",
            "--batch-mode",
            "--force-offline-reencrypt",
            "--key-file",
            str(recovery_file),
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            str(image),
        ],
        check=True,
        capture_output=True,
    )
    result = luks_tpm("load-key", image, tcti=swtpm.tcti, expect=5)
    assert_one_line_error(result)
    assert "re-encrypt" in result.stderr


def test_missing_and_foreign_devices(tmp_path: Path, swtpm: Swtpm, plain_file: Path) -> None:
    result = luks_tpm("load-key", tmp_path / "absent.img", tcti=swtpm.tcti, expect=3)
    assert_one_line_error(result, "no such file")
    before = file_digest(plain_file)
    result = luks_tpm("status", plain_file, tcti=swtpm.tcti, expect=3)
    assert_one_line_error(result, "not a LUKS device")
    assert file_digest(plain_file) == before


def test_read_only_image_is_refused_unchanged(luks_volume: LuksImage, swtpm: Swtpm, passphrase_file: Path) -> None:
    before = file_digest(luks_volume.path)
    # root ignores file modes, but not the immutable attribute
    subprocess.run(["chattr", "+i", str(luks_volume.path)], check=True)
    try:
        result = luks_tpm(
            "enroll",
            luks_volume.path,
            "--mode",
            "derived",
            "--unlock-key-file",
            passphrase_file,
            tcti=swtpm.tcti,
            expect=3,
        )
    finally:
        subprocess.run(["chattr", "-i", str(luks_volume.path)], check=True)
    assert_one_line_error(result, "read-only")
    assert file_digest(luks_volume.path) == before


UUID = "6a0e2f44-51c8-4d2b-9b3e-7c1f0d9a8e21"


def test_derivation_is_stable_across_connections(swtpm: Swtpm) -> None:
    """The same template on the same owner seed gives the same key, through any session."""
    salt = bytes(range(32))
    keys: list[Secret] = []
    for _ in range(2):
        with Tpm(swtpm.tcti) as tpm:
            srk, _ = tpm_srk.current_srk(tpm)
            with KeyUse(tpm) as use, use.hmac(srk, derive.hmac_message(UUID, salt), None) as prk:
                keys.append(derive.expand(prk, UUID, 64))
    assert keys[0].equals(keys[1])
    assert len(keys[0]) == 64 and bytes(keys[0].view()) != bytes(64)
    with Tpm(swtpm.tcti) as tpm, KeyUse(tpm) as use:
        srk, _ = tpm_srk.current_srk(tpm)
        with use.hmac(srk, derive.hmac_message(UUID, salt[::-1]), None) as prk:
            other = derive.expand(prk, UUID, 64)
    assert not other.equals(keys[0])
    assert derive.KEK_SIZE == 32


def test_format_asks_before_overwriting_and_prints_recovery_key(
    tmp_path: Path, swtpm: Swtpm, recovery_file: Path
) -> None:
    image = tmp_path / "disk.img"
    format_derived(image, swtpm.tcti, recovery_file)
    before = file_digest(image)
    result = luks_tpm("format", image, tcti=swtpm.tcti, expect=7)  # no terminal to ask, no --yes
    assert_one_line_error(result, "LUKS header")
    assert file_digest(image) == before

    generated = luks_tpm_json(
        "format", image, "--yes", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", tcti=swtpm.tcti
    )
    key = generated["recovery_key"]
    assert re.fullmatch(r"([cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8}", key), key
    key_file = tmp_path / "recovery.key"
    key_file.write_text(key)
    subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", str(key_file), str(image)], check=True)


def test_format_without_recovery_warns(tmp_path: Path, swtpm: Swtpm) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(32 << 20)
    chosen = "0f6e4a2c-8d1b-4c7e-9a55-3b2d1e0f9c88"
    result = luks_tpm("format", image, "--no-recovery", "--uuid", chosen, tcti=swtpm.tcti)
    assert "unrecoverable" in result.stderr
    assert chosen in result.stdout
    with cryptsetup.open_device(image) as device:
        assert device.keyslots() == []
    assert luks_tpm_json("status", image, tcti=swtpm.tcti)["volumes"][0]["tokens"][0]["unlocks"] is True


def test_open_without_device_mapper_says_use_load_key(tmp_path: Path, swtpm: Swtpm, recovery_file: Path) -> None:
    if cryptsetup.device_mapper_available():
        pytest.skip("this host has device-mapper; activation is tested in the VM")
    image = tmp_path / "disk.img"
    format_derived(image, swtpm.tcti, recovery_file)
    before = file_digest(image)
    result = luks_tpm("open", image, "data", tcti=swtpm.tcti, expect=8)
    assert_one_line_error(result, "device-mapper is not available here; use load-key")
    assert file_digest(image) == before


def test_owner_clear_with_a_persistent_srk(tmp_path: Path, fresh_swtpm: Swtpm, recovery_file: Path) -> None:
    """TPM2_Clear also evicts the persistent SRK the token names: still reported as a cleared owner hierarchy."""
    luks_tpm("persist-srk", tcti=fresh_swtpm.tcti)
    image = tmp_path / "disk.img"
    format_derived(image, fresh_swtpm.tcti, recovery_file)
    with cryptsetup.open_device(image) as device:
        assert json.loads(device.token_json_get(0) or "")["parent"]["handle"] == "0x81000001"
    fresh_swtpm.tpm2("clear", "-c", "p")
    result = luks_tpm("load-key", image, tcti=fresh_swtpm.tcti, expect=5)
    assert_one_line_error(result, "owner hierarchy was cleared")
