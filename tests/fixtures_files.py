"""Fixtures: the secret files tests give the command line (PINs, passphrases, recovery passphrases)."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import volumes

PIN = b"2468"
WRONG_PIN = b"1357"
RECOVERY_PASSPHRASE = b"correct horse battery staple"


def _file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.fixture
def pin_file(tmp_path: Path) -> Path:
    return _file(tmp_path / "pin", PIN)


@pytest.fixture
def wrong_pin_file(tmp_path: Path) -> Path:
    return _file(tmp_path / "wrong-pin", WRONG_PIN)


@pytest.fixture
def recovery_file(tmp_path: Path) -> Path:
    """A recovery passphrase for `format --passphrase-file`."""
    return _file(tmp_path / "recovery.pass", RECOVERY_PASSPHRASE)


@pytest.fixture
def passphrase(tmp_path: Path) -> Path:
    """The test volumes' passphrase (tests/volumes.py)."""
    return volumes.passphrase_file(tmp_path)
