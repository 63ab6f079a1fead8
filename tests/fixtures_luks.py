"""Fixtures: LUKS images (sparse files in tmp_path) made with the real libcryptsetup and cryptsetup."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from luks_tpm import cryptsetup
from luks_tpm.secret import Secret
from luks_tpm.settings import Pbkdf

IMAGE_SIZE = 32 << 20
TEST_UUID = "6a0e2f44-51c8-4d2b-9b3e-7c1f0d9a8e21"
TEST_PASSPHRASE = b"test-passphrase"
TEST_PBKDF = Pbkdf("pbkdf2", iterations=1000)  # fast tests; real volumes benchmark


@dataclass(frozen=True)
class LuksImage:
    path: Path
    uuid: str
    volume_key: Secret
    passphrase: Secret


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of the whole file, for byte-identical checks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def random_secret(size: int) -> Secret:
    return Secret.copy_of(bytearray(os.urandom(size)), zero_source=True)


def sparse_file(path: Path, size: int = IMAGE_SIZE) -> Path:
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def make_luks_image(path: Path, *, uuid: str = TEST_UUID, keyslot: bool = True, size: int = IMAGE_SIZE) -> LuksImage:
    """A LUKS2 image: aes-xts-plain64, a random 64-byte key, `uuid`, and (with `keyslot`) one
    keyslot (0) for TEST_PASSPHRASE."""
    sparse_file(path, size)
    key = random_secret(64)
    secret = Secret.copy_of(TEST_PASSPHRASE)
    with cryptsetup.open_device(path, load=False) as device:
        device.format_luks2(cipher="aes", cipher_mode="xts-plain64", uuid=uuid, volume_key=key, pbkdf=TEST_PBKDF)
        if keyslot:
            device.keyslot_add_by_volume_key(key, secret)
    return LuksImage(path=path, uuid=uuid, volume_key=key, passphrase=secret)


@pytest.fixture
def luks_volume(tmp_path: Path) -> Iterator[LuksImage]:
    volume = make_luks_image(tmp_path / "luks2.img")
    yield volume
    volume.volume_key.close()
    volume.passphrase.close()


@pytest.fixture
def luks_image(luks_volume: LuksImage) -> Path:
    return luks_volume.path


@pytest.fixture
def luks1_image(tmp_path: Path) -> Path:
    path = sparse_file(tmp_path / "luks1.img", 8 << 20)
    subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "--type",
            "luks1",
            "--pbkdf-force-iterations",
            "1000",
            "--batch-mode",
            "--key-file",
            "-",
            str(path),
        ],
        input=TEST_PASSPHRASE,
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture
def plain_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


@pytest.fixture
def passphrase_file(luks_volume: LuksImage, tmp_path: Path) -> Path:
    """A file holding the `luks_volume` passphrase, as --unlock-key-file takes it."""
    path = tmp_path / "passphrase"
    path.write_bytes(bytes(luks_volume.passphrase.view()))
    return path
