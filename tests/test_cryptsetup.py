"""luks_tpm.cryptsetup against the real libcryptsetup, on image files, checked with the real cryptsetup."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luks_tpm import cryptsetup
from luks_tpm.cryptsetup import CryptsetupError, TokenInfo, binding
from luks_tpm.errors import ExitCode, LuksTpmError
from luks_tpm.secret import Secret
from luks_tpm.settings import Pbkdf
from tests.fixtures_luks import (
    TEST_PASSPHRASE,
    TEST_PBKDF,
    LuksImage,
    file_digest,
    make_luks_image,
    random_secret,
    sparse_file,
)

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def cryptsetup_cli(*args: str | os.PathLike[str], stdin: bytes | None = None) -> str:
    result = subprocess.run(["cryptsetup", *map(str, args)], input=stdin, capture_output=True, check=True)
    return result.stdout.decode()


def luks_dump_field(path: Path, field: str) -> str:
    match = re.search(rf"^{field}:\s*(.*)$", cryptsetup_cli("luksDump", path), re.MULTILINE)
    assert match, f"no {field} in luksDump"
    return match.group(1).strip()


def passphrase_opens(path: Path, passphrase: bytes, keyslot: int | None = None) -> bool:
    """The real cryptsetup's opinion (needs no device-mapper with --test-passphrase)."""
    slot = [f"--key-slot={keyslot}"] if keyslot is not None else []
    result = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file=-", *slot, str(path)],
        input=passphrase,
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def flipped(secret: Secret) -> Secret:
    copy = Secret.copy_of(secret.view())
    copy.view()[0] ^= 0x01
    return copy


# --- format and keys ----------------------------------------------------------------------------


def test_format_writes_chosen_uuid_cipher_and_label(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "disk.img")
    chosen = str(uuid.uuid4())
    with random_secret(64) as key, cryptsetup.open_device(path, load=False) as device:
        device.format_luks2(
            cipher="aes",
            cipher_mode="xts-plain64",
            uuid=chosen,
            volume_key=key,
            sector_size=4096,
            pbkdf=TEST_PBKDF,
            label="luks-tpm-test",
        )
    assert luks_dump_field(path, "UUID") == chosen
    assert luks_dump_field(path, "Label") == "luks-tpm-test"
    assert luks_dump_field(path, r"\s*cipher") == "aes-xts-plain64"
    assert luks_dump_field(path, r"\s*sector") == "4096 [bytes]"
    with cryptsetup.open_device(path) as device:
        assert (device.type, device.uuid) == ("LUKS2", chosen)
        segment = device.metadata()["segments"]["0"]
        assert (segment["encryption"], segment["sector_size"]) == ("aes-xts-plain64", 4096)
        assert int(segment["offset"]) == 16 << 20  # default LUKS2 data offset: 16 MiB
        digest = device.metadata()["digests"]["0"]
    assert digest["iterations"] == 1000  # the NO_BENCHMARK pbkdf reached libcryptsetup


def test_header_without_keyslots_still_verifies_its_key(tmp_path: Path) -> None:
    volume = make_luks_image(tmp_path / "bare.img", keyslot=False)
    with cryptsetup.open_device(volume.path) as device, flipped(volume.volume_key) as wrong:
        assert device.keyslots() == []
        assert device.volume_key_size == 0  # not recorded without keyslots
        assert device.volume_key_verify(volume.volume_key)
        assert not device.volume_key_verify(wrong)


def test_verify_accepts_the_key_and_rejects_another(luks_volume: LuksImage) -> None:
    with cryptsetup.open_device(luks_volume.path) as device, flipped(luks_volume.volume_key) as wrong:
        assert device.volume_key_verify(luks_volume.volume_key)
        assert not device.volume_key_verify(wrong)
        with random_secret(32) as short:
            assert not device.volume_key_verify(short)


def test_volume_key_get_returns_the_formatted_key(luks_volume: LuksImage) -> None:
    with cryptsetup.open_device(luks_volume.path) as device:
        assert device.keyslots() == [0]
        assert device.volume_key_size == 64
        slot, key = device.volume_key_get(luks_volume.passphrase)
        with key:
            assert slot == 0
            assert len(key) == 64
            assert key.equals(luks_volume.volume_key)
        # A larger buffer than needed gives an exactly sized key back.
        _, key = device.volume_key_get(luks_volume.passphrase, keyslot=0, key_size=128)
        with key:
            assert key.equals(luks_volume.volume_key)


def test_wrong_passphrase_raises_eperm_without_the_passphrase(luks_volume: LuksImage) -> None:
    wrong = b"not-the-passphrase-at-all"
    with (
        cryptsetup.open_device(luks_volume.path) as device,
        Secret.copy_of(wrong) as secret,
        pytest.raises(CryptsetupError) as caught,
    ):
        device.volume_key_get(secret)
    error = caught.value
    assert isinstance(error, OSError)
    assert (error.errno, error.function) == (errno.EPERM, "crypt_volume_key_get")
    assert str(error) == f"crypt_volume_key_get: {os.strerror(errno.EPERM)}"
    assert wrong.decode() not in repr(error.args) + str(error)


def test_keyslot_add_and_pbkdf_choice_reach_the_header(luks_volume: LuksImage) -> None:
    second = b"second passphrase"
    with cryptsetup.open_device(luks_volume.path) as device, Secret.copy_of(second) as secret:
        device.set_pbkdf(Pbkdf("argon2id", iterations=4, max_memory_kb=32768, parallel_threads=1))
        slot = device.keyslot_add_by_volume_key(luks_volume.volume_key, secret)
        assert slot == 1
        assert device.keyslots() == [0, 1]
        kdf = device.metadata()["keyslots"]["1"]["kdf"]
    assert (kdf["type"], kdf["time"], kdf["memory"], kdf["cpus"]) == ("argon2id", 4, 32768, 1)
    assert passphrase_opens(luks_volume.path, second, keyslot=1)
    assert not passphrase_opens(luks_volume.path, second, keyslot=0)


def test_check_only_activation_needs_no_device_mapper(luks_volume: LuksImage) -> None:
    with cryptsetup.open_device(luks_volume.path) as device, flipped(luks_volume.volume_key) as wrong:
        device.activate_by_volume_key(None, luks_volume.volume_key)
        with pytest.raises(CryptsetupError) as caught:
            device.activate_by_volume_key(None, wrong)
    assert caught.value.errno == errno.EPERM


def test_device_is_unusable_after_its_block(luks_image: Path) -> None:
    with cryptsetup.open_device(luks_image) as device:
        pass
    with pytest.raises(ValueError, match="closed"):
        device.tokens()


# --- tokens and metadata ------------------------------------------------------------------------

LUKS_TPM_TOKEN = {
    "type": "luks-tpm",
    "keyslots": [],
    "version": 1,
    "mode": "derived",
    "digest": 0,
    "key_size": 64,
    "pcr_bank": "sha256",
    "pcrs": [7, 15],
    "policy": "00" * 32,
    "pin": False,
    "parent": {"handle": "0x81000001", "name": "000b" + "ab" * 32},
    "created": "2024-01-02T03:04:05Z",
    "salt": "c2FsdHNhbHRzYWx0c2FsdHNhbHRzYWx0c2FsdHNhbHQ=",
    "wrapped_key": None,
    "unknown-future-field": {"nested": [1, 2.5, "x"]},
}


def test_luks_tpm_token_round_trips(luks_image: Path) -> None:
    text = json.dumps(LUKS_TPM_TOKEN)
    with cryptsetup.open_device(luks_image) as device:
        token_id = device.token_json_set(text)
        assert token_id == 0
    with cryptsetup.open_device(luks_image) as device:  # from disk, in a new context
        stored = device.token_json_get(token_id)
        assert stored is not None
        assert json.loads(stored) == LUKS_TPM_TOKEN
        assert canonical(json.loads(stored)) == canonical(LUKS_TPM_TOKEN)
        assert device.tokens() == [(0, "luks-tpm")]
        assert device.token_status(0) == (TokenInfo.EXTERNAL_UNKNOWN, "luks-tpm")
        assert device.token_status(1) == (TokenInfo.INACTIVE, None)
        assert device.token_json_get(1) is None
        assert device.metadata()["tokens"]["0"] == LUKS_TPM_TOKEN
    exported = cryptsetup_cli("token", "export", "--token-id", "0", luks_image)
    assert canonical(json.loads(exported)) == canonical(LUKS_TPM_TOKEN)


def test_token_ids_are_listed_and_removed(luks_image: Path) -> None:
    with cryptsetup.open_device(luks_image) as device:
        first = device.token_json_set(json.dumps(LUKS_TPM_TOKEN))
        fifth = device.token_json_set(json.dumps({**LUKS_TPM_TOKEN, "mode": "sealed"}), 5)
        other = device.token_json_set(json.dumps({"type": "other-tool", "keyslots": ["0"]}))
        assert (first, fifth, other) == (0, 5, 1)
        assert device.tokens() == [(0, "luks-tpm"), (1, "other-tool"), (5, "luks-tpm")]
        device.token_remove(0)
    with cryptsetup.open_device(luks_image) as device:
        assert device.tokens() == [(1, "other-tool"), (5, "luks-tpm")]
        assert device.token_json_get(0) is None
        assert device.token_status(0) == (TokenInfo.INACTIVE, None)
        assert set(device.metadata()["tokens"]) == {"1", "5"}
    assert "luks-tpm" in cryptsetup_cli("token", "export", "--token-id", "5", luks_image)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"keyslots": []}),  # no type
        json.dumps({"type": "luks-tpm", "keyslots": [0]}),  # keyslots must be strings
        json.dumps({"type": "luks-tpm", "keyslots": ["7"]}),  # no such keyslot
    ],
)
def test_invalid_tokens_are_refused_and_nothing_is_written(luks_image: Path, text: str) -> None:
    before = file_digest(luks_image)
    with cryptsetup.open_device(luks_image) as device:
        with pytest.raises(CryptsetupError) as caught:
            device.token_json_set(text)
        assert device.tokens() == []
    assert (caught.value.function, caught.value.errno) == ("crypt_token_json_set", errno.EINVAL)
    assert file_digest(luks_image) == before


def test_metadata_names_digest_and_segment(luks_volume: LuksImage) -> None:
    with cryptsetup.open_device(luks_volume.path) as device:
        metadata = device.metadata()
    assert set(metadata) >= {"keyslots", "tokens", "segments", "digests", "config"}
    assert metadata["digests"]["0"]["segments"] == ["0"]
    assert metadata["digests"]["0"]["keyslots"] == ["0"]
    segment = metadata["segments"]["0"]
    assert (segment["type"], segment["encryption"], segment["sector_size"], segment["iv_tweak"]) == (
        "crypt",
        "aes-xts-plain64",
        512,
        "0",
    )
    assert metadata["keyslots"]["0"]["kdf"]["type"] == "pbkdf2"
    assert metadata["tokens"] == {}


SYSTEMD_TPM2_TOKEN = {
    "type": "systemd-tpm2",
    "keyslots": ["1"],
    "tpm2-blob": "AJ4AIAjVhSr0dDkzE0zL1z/wPjzTHDy+EFhpcsbTvNRtgRoDABAgd3K0BXGzpEYmCc9i3tHz9Bh3Zg==",
    "tpm2-pcrs": [7],
    "tpm2-pcr-bank": "sha256",
    "tpm2-primary-alg": "ecc",
    "tpm2-policy-hash": "d0bd5ad3e8e08e4f3a2c1ea5f2f8e4e1f6f1f1d7e2b7c0a9d6c3b8a7f6e5d4c3",
    "tpm2-pin": False,
}


def test_other_tools_token_and_keyslots_survive_our_writes(luks_volume: LuksImage, tmp_path: Path) -> None:
    recovery = b"recovery passphrase"
    with cryptsetup.open_device(luks_volume.path) as device, Secret.copy_of(recovery) as secret:
        assert device.keyslot_add_by_volume_key(luks_volume.volume_key, secret) == 1
    token_file = tmp_path / "systemd.json"
    token_file.write_text(json.dumps(SYSTEMD_TPM2_TOKEN))
    cryptsetup_cli("token", "import", "--json-file", token_file, luks_volume.path)

    def snapshot() -> tuple[str | None, str, str, bytes]:
        with cryptsetup.open_device(luks_volume.path) as device:
            metadata = device.metadata()
            token = device.token_json_get(0)
        area = metadata["keyslots"]["1"]["area"]
        with open(luks_volume.path, "rb") as image:
            image.seek(int(area["offset"]))
            keyslot_area = image.read(int(area["size"]))
        return (token, canonical(metadata["keyslots"]), canonical(metadata["digests"]), keyslot_area)

    before = snapshot()
    assert before[0] is not None and json.loads(before[0]) == SYSTEMD_TPM2_TOKEN
    with cryptsetup.open_device(luks_volume.path) as device:
        ours = device.token_json_set(json.dumps(LUKS_TPM_TOKEN))
        assert ours == 1
        assert device.tokens() == [(0, "systemd-tpm2"), (1, "luks-tpm")]
    assert snapshot() == before
    with cryptsetup.open_device(luks_volume.path) as device:
        device.token_remove(ours)
        assert device.tokens() == [(0, "systemd-tpm2")]
    assert snapshot() == before
    assert passphrase_opens(luks_volume.path, recovery, keyslot=1)
    assert passphrase_opens(luks_volume.path, TEST_PASSPHRASE, keyslot=0)


# --- opening: user-facing errors, nothing written -----------------------------------------------


def corrupt(path: Path, *offsets: int) -> None:
    with open(path, "r+b") as image:
        for offset in offsets:
            image.seek(offset)
            image.write(b"\xff" * 32)


def open_error(path: Path) -> LuksTpmError:
    with pytest.raises(LuksTpmError) as caught, cryptsetup.open_device(path):
        pass
    assert "\n" not in str(caught.value)
    return caught.value


def test_missing_device(tmp_path: Path) -> None:
    error = open_error(tmp_path / "nope.img")
    assert error.code == ExitCode.DEVICE
    assert "no such file" in str(error)
    assert not (tmp_path / "nope.img").exists()


def test_plain_file_is_not_luks(plain_file: Path) -> None:
    before = file_digest(plain_file)
    error = open_error(plain_file)
    assert (error.code, str(error)) == (ExitCode.DEVICE, f"{plain_file}: not a LUKS device")
    assert error.hint is not None and "cryptsetup isLuks" in error.hint
    assert file_digest(plain_file) == before


def test_luks1_is_named_and_unsupported(luks1_image: Path) -> None:
    before = file_digest(luks1_image)
    error = open_error(luks1_image)
    assert error.code == ExitCode.UNSUPPORTED
    assert "LUKS1" in str(error)
    assert error.hint is not None and "cryptsetup convert --type luks2" in error.hint
    assert file_digest(luks1_image) == before


@pytest.mark.parametrize("damage", ["both-json-copies", "truncated-2k", "truncated-20k"])
def test_broken_luks2_header_is_reported_and_left_alone(luks_image: Path, damage: str) -> None:
    if damage == "both-json-copies":
        corrupt(luks_image, 4096 + 64, 16384 + 4096 + 64)  # JSON areas of the primary and secondary
    else:
        with open(luks_image, "r+b") as image:
            image.truncate(2048 if damage == "truncated-2k" else 20000)
    before = file_digest(luks_image)
    error = open_error(luks_image)
    assert error.code == ExitCode.DEVICE
    assert "corrupt" in str(error)
    assert error.hint is not None and "cryptsetup repair" in error.hint
    assert file_digest(luks_image) == before


def test_one_damaged_header_copy_is_recovered_by_libcryptsetup(luks_volume: LuksImage) -> None:
    """libcryptsetup (2.6.1, like `cryptsetup isLuks`) rewrites a damaged copy from the good one on load."""
    corrupt(luks_volume.path, 4096 + 64)
    with open(luks_volume.path, "rb") as image:
        tail_before = image.read()[16384:]
    with cryptsetup.open_device(luks_volume.path) as device:
        assert device.uuid == luks_volume.uuid
        assert device.volume_key_verify(luks_volume.volume_key)
    with open(luks_volume.path, "rb") as image:
        assert image.read()[16384:] == tail_before  # only the damaged primary copy was touched
    assert luks_dump_field(luks_volume.path, "UUID") == luks_volume.uuid


def test_immutable_image_refuses_writes_and_stays_identical(luks_image: Path) -> None:
    """Root ignores mode bits, so provoke a read-only image with the immutable attribute."""
    if subprocess.run(["chattr", "+i", str(luks_image)], capture_output=True, check=False).returncode:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        before = file_digest(luks_image)
        with cryptsetup.open_device(luks_image) as device:  # reading needs no write access
            assert device.tokens() == []
            with pytest.raises(CryptsetupError) as caught:
                device.token_json_set(json.dumps(LUKS_TPM_TOKEN))
        # 2.6.1 reports the failed open for write as EINVAL; a later release may say EPERM.
        assert caught.value.errno in (errno.EINVAL, errno.EPERM, errno.EACCES)
        assert file_digest(luks_image) == before
    finally:
        subprocess.run(["chattr", "-i", str(luks_image)], check=True)


# --- as an unprivileged user --------------------------------------------------------------------


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the `nobody` user owns (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as another user")
    path = Path(tempfile.mkdtemp(prefix="luks-tpm-nobody-"))
    path.chmod(0o755)
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path)


def run_as_nobody(script: str, *args: str) -> dict[str, Any]:
    """Run `script` as uid/gid 65534 with no groups; it prints one JSON object."""
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


HEADER_WORK_AS_NOBODY = """
import json, os, sys
from luks_tpm import cryptsetup
from luks_tpm.secret import Secret
from luks_tpm.settings import Pbkdf
path, uuid = sys.argv[1], sys.argv[2]
with open(path, "wb") as f:
    f.truncate(32 << 20)
key = Secret.copy_of(bytearray(os.urandom(64)), zero_source=True)
passphrase = Secret.copy_of(b"nobody-passphrase")
out = {"uid": os.getuid(), "euid": os.geteuid()}
with cryptsetup.open_device(path, load=False) as device:
    device.format_luks2(cipher="aes", cipher_mode="xts-plain64", uuid=uuid, volume_key=key,
                        pbkdf=Pbkdf("pbkdf2", iterations=1000))
    out["slot"] = device.keyslot_add_by_volume_key(key, passphrase)
with cryptsetup.open_device(path) as device:
    out["token"] = device.token_json_set(json.dumps({"type": "luks-tpm", "keyslots": [], "version": 1}))
    out["tokens"] = device.tokens()
    out["digests"] = sorted(device.metadata()["digests"])
    slot, got = device.volume_key_get(passphrase)
    out["same_key"] = got.equals(key)
    out["verify"] = device.volume_key_verify(key)
print(json.dumps(out))
"""


def test_header_work_needs_no_root(nobody_dir: Path) -> None:
    chosen = str(uuid.uuid4())
    path = nobody_dir / "nobody.img"
    out = run_as_nobody(HEADER_WORK_AS_NOBODY, str(path), chosen)
    assert (out["uid"], out["euid"]) == (NOBODY, NOBODY)
    assert (out["slot"], out["token"], out["tokens"]) == (0, 0, [[0, "luks-tpm"]])
    assert out["digests"] == ["0"] and out["same_key"] and out["verify"]
    assert path.stat().st_uid == NOBODY
    assert luks_dump_field(path, "UUID") == chosen
    assert passphrase_opens(path, b"nobody-passphrase")


TRY_WRITE_AS_NOBODY = """
import json, sys
from luks_tpm import cryptsetup
from luks_tpm.errors import LuksTpmError
out = {}
try:
    with cryptsetup.open_device(sys.argv[1]) as device:
        out["tokens"] = device.tokens()
        try:
            device.token_json_set(json.dumps({"type": "luks-tpm", "keyslots": []}))
            out["written"] = True
        except cryptsetup.CryptsetupError as error:
            out["errno"] = error.errno
            out["function"] = error.function
except LuksTpmError as error:
    out["error"] = str(error)
    out["code"] = error.code.name
print(json.dumps(out))
"""


def test_read_only_image_refuses_writes_for_its_owner(nobody_dir: Path) -> None:
    volume = make_luks_image(nobody_dir / "ro.img")
    os.chown(volume.path, NOBODY, NOBODY)
    volume.path.chmod(0o444)
    before = file_digest(volume.path)
    out = run_as_nobody(TRY_WRITE_AS_NOBODY, str(volume.path))
    assert out == {"tokens": [], "errno": errno.EACCES, "function": "crypt_token_json_set"}
    assert file_digest(volume.path) == before


def test_unreadable_image_is_permission_denied(nobody_dir: Path) -> None:
    volume = make_luks_image(nobody_dir / "root-only.img")
    volume.path.chmod(0o600)  # owned by root
    before = file_digest(volume.path)
    out = run_as_nobody(TRY_WRITE_AS_NOBODY, str(volume.path))
    assert out == {"error": f"{volume.path}: permission denied", "code": "DEVICE"}
    assert file_digest(volume.path) == before


# --- library plumbing ---------------------------------------------------------------------------


def test_library_messages_go_to_logging(tmp_path: Path, luks_image: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="luks_tpm.cryptsetup")
    # open_device refuses a missing path before libcryptsetup sees it: ask libcryptsetup itself
    missing = tmp_path / "missing.img"
    handle = ctypes.c_void_p()
    with pytest.raises(cryptsetup.CryptsetupError) as raised:
        binding.call("crypt_init", ctypes.byref(handle), bytes(missing))
    errors = [r for r in caplog.records if r.name == "luks_tpm.cryptsetup" and r.levelno == logging.ERROR]
    assert any(str(missing) in r.getMessage() for r in errors), [r.getMessage() for r in caplog.records]
    assert any(str(missing) in line for line in raised.value.log)  # kept with the error, to explain it

    caplog.clear()
    with cryptsetup.open_device(luks_image):
        pass
    assert not [r for r in caplog.records if r.name == "luks_tpm.cryptsetup"]  # debug is off

    cryptsetup.set_debug(True)
    try:
        with cryptsetup.open_device(luks_image):
            pass
    finally:
        cryptsetup.set_debug(False)
    debug = [r.getMessage() for r in caplog.records if r.name == "luks_tpm.cryptsetup" and r.levelno == logging.DEBUG]
    assert any(str(luks_image) in message for message in debug)
    assert all(not message.endswith("\n") for message in debug)


def test_library_version_matches_the_cryptsetup_binary() -> None:
    binary = re.search(r"cryptsetup (\d+)\.(\d+)\.", cryptsetup_cli("--version"))
    assert binary, "unexpected cryptsetup --version output"
    version = cryptsetup.library_version()
    assert version.startswith(f"{binary.group(1)}.{binary.group(2)}.")
    assert cryptsetup.has_function("crypt_dump_json")
    assert not cryptsetup.has_function("crypt_no_such_function")


def test_device_mapper_check_sees_no_control_node() -> None:
    result = cryptsetup.device_mapper_available()
    assert isinstance(result, bool)
    if not Path("/dev/mapper/control").exists():
        assert result is False
