"""Issue 21, defect 22: `enroll` on a volume without a keyslot (reseal shares the code, for a token that fails).

A volume formatted with --no-recovery, or erased, has no keyslot: no passphrase can open it, so none is
asked for or read (stdin is empty here: reading it would be a usage error, exit 2), and the answer is
exit 5, "no keyslot opens with that key". An erase that removes the last keyslot between that check and
the unlock still gives exit 5 (libcryptsetup's ENOENT or EPERM), shown by a passphrase source that runs
the erase itself, at exactly that moment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from luks_tpm.cryptsetup import open_device
from luks_tpm.enrollment import volume_key_with_passphrase
from luks_tpm.errors import ExitCode, LuksTpmError
from luks_tpm.secret import Secret

from . import volumes
from .fixtures_luks import file_digest
from .fixtures_tpm import Swtpm
from .forked_cli import ForkedCli

WORDS = "no keyslot opens with that key"


def _no_keyslot_volume(how: str, tmp_path: Path, tcti: str, cli: ForkedCli) -> Path:
    passphrase = volumes.passphrase_file(tmp_path)
    image = tmp_path / "volume.img"
    if how == "format --no-recovery":
        with open(image, "wb") as handle:
            handle.truncate(32 << 20)
        cli.run("format", image, "--no-recovery", "--yes", tcti=tcti)
    else:
        volumes.luks_format(image, passphrase)
        cli.run("erase", image, "--yes", tcti=None)
    assert volumes.keyslots(image) == []
    return image


@pytest.mark.parametrize("how", ["format --no-recovery", "erase"])
def test_no_keyslot_is_exit_5_without_reading_a_passphrase(
    how: str, tmp_path: Path, swtpm: Swtpm, cli: ForkedCli
) -> None:
    image = _no_keyslot_volume(how, tmp_path, swtpm.tcti, cli)
    before = file_digest(image)
    for mode in ("sealed", "derived"):
        error = cli.json("enroll", image, "--mode", mode, "--unlock-key-file", "-", tcti=swtpm.tcti, expect=5)
        assert WORDS in error["error"]["message"] and error["error"]["cause"] == "wrong-key", error
    assert file_digest(image) == before


def test_the_last_keyslot_going_meanwhile(tmp_path: Path) -> None:
    passphrase = volumes.passphrase_file(tmp_path)
    image = volumes.luks_format(tmp_path / "volume.img", passphrase)

    def erase_then_give_the_passphrase() -> Secret:
        volumes.run("cryptsetup", "luksKillSlot", "--batch-mode", image, "0")
        return Secret.copy_of(passphrase.read_bytes())

    with open_device(image) as device, pytest.raises(LuksTpmError) as caught:
        volume_key_with_passphrase(device, erase_then_give_the_passphrase)
    # libcryptsetup says ENOENT (no keyslot) or EPERM (the keyslot it read is gone): exit 5 either way
    assert caught.value.code == ExitCode.UNLOCK_FAILED and "no keyslot opens with that" in caught.value.message


def test_a_keyslot_that_is_there_still_opens(tmp_path: Path, swtpm: Swtpm, cli: ForkedCli) -> None:
    passphrase = volumes.passphrase_file(tmp_path)
    image = volumes.luks_format(tmp_path / "volume.img", passphrase)
    cli.run("enroll", image, "--mode", "derived", "--unlock-key-file", passphrase, tcti=swtpm.tcti)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the passphrase")
    error = cli.json("enroll", image, "--mode", "derived", "--unlock-key-file", wrong, tcti=swtpm.tcti, expect=5)
    assert "no keyslot opens with that passphrase" in error["error"]["message"]
