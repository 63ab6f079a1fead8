"""The boot's unlock pass under the cross-volume guard (issue 23): every marked volume from the TPM, or none.

Real volumes and a real swtpm; only the dm-crypt mapping is replaced (the host has no device-mapper) by a
recorder that checks each key it is handed against the volume's LUKS2 digest and notes what is open. The
VM suite runs the same pass with dm-crypt, and the attacks (root swap, data swap) end to end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from luks_tpm import crypttab
from luks_tpm.bootpass import OpenedAll, open_all
from luks_tpm.cryptsetup import Device
from luks_tpm.errors import ExitCode, LuksTpmError
from luks_tpm.secret import Secret
from luks_tpm.settings import Activation

from .fixtures_luks import TEST_PASSPHRASE, make_luks_image
from .fixtures_tpm import Swtpm
from .helpers import luks_tpm_json
from .volumes import set_token, token_text

UUIDS = [
    "1b0c7a3e-0d3c-4b6a-9e55-000000000001",
    "1b0c7a3e-0d3c-4b6a-9e55-000000000002",
    "1b0c7a3e-0d3c-4b6a-9e55-000000000003",
]


class Recorder:
    def __init__(self, fail: str | None = None) -> None:
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.fail = fail

    def open(self, device: Device, name: str, key: Secret, options: Activation) -> None:
        assert device.volume_key_verify(key), f"{name}: handed a key that does not verify"
        if name == self.fail:
            raise LuksTpmError(f"activating {name} failed: Device or resource busy", code=ExitCode.DEVICE)
        self.opened.append(name)

    def close(self, device: Device, name: str) -> None:
        self.opened.remove(name)
        self.closed.append(name)


@pytest.fixture
def volumes(tmp_path: Path, swtpm: Swtpm) -> list[Path]:
    """Three enrolled volumes: root, data1, data2."""
    paths = []
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(TEST_PASSPHRASE)
    for name, uuid in zip(("root", "data1", "data2"), UUIDS, strict=True):
        image = make_luks_image(tmp_path / f"{name}.img", uuid=uuid)
        luks_tpm_json("enroll", image.path, "--mode", "derived", "--unlock-key-file", passphrase, tcti=swtpm.tcti)
        paths.append(image.path)
    return paths


def entries(paths: list[Path]) -> list[crypttab.Entry]:
    return [crypttab.Entry(name, str(path)) for name, path in zip(("root", "data1", "data2"), paths, strict=True)]


def run(swtpm: Swtpm, paths: list[Path], recorder: Recorder) -> tuple[int, dict[str, Any]]:
    report = open_all(swtpm.tcti, entries(paths), lambda _token_id: None, mapper=recorder)
    assert isinstance(report.result, OpenedAll)
    return report.exit_code, {volume.name: volume for volume in report.result.volumes}


def test_every_volume_recovered_every_volume_opened(swtpm: Swtpm, volumes: list[Path]) -> None:
    recorder = Recorder()
    code, results = run(swtpm, volumes, recorder)
    assert code == ExitCode.OK and recorder.opened == ["root", "data1", "data2"]
    assert all(result.opened and result.error is None for result in results.values())


def test_a_look_alike_root_opens_nothing(swtpm: Swtpm, volumes: list[Path], tmp_path: Path) -> None:
    """The attacker's root: same UUID, its own key, the genuine root's token copied into its header."""
    genuine = token_text(volumes[0], 0)
    look_alike = make_luks_image(tmp_path / "attacker-root.img", uuid=UUIDS[0]).path
    set_token(look_alike, genuine)
    recorder = Recorder()
    code, results = run(swtpm, [look_alike, *volumes[1:]], recorder)
    assert code == ExitCode.UNLOCK_FAILED and recorder.opened == []
    assert results["root"].error.cause == "wrong-key"
    for name in ("data1", "data2"):  # recovered, verified, and held back
        assert not results[name].opened and results[name].token == 0
        assert results[name].error.cause == "cross-volume-guard" and "root" in results[name].error.message


def test_a_look_alike_data_volume_opens_nothing(swtpm: Swtpm, volumes: list[Path], tmp_path: Path) -> None:
    look_alike = make_luks_image(tmp_path / "attacker-data.img", uuid=UUIDS[1]).path  # no token at all
    recorder = Recorder()
    code, results = run(swtpm, [volumes[0], look_alike, volumes[2]], recorder)
    assert code == ExitCode.UNLOCK_FAILED and recorder.opened == []
    assert results["data1"].error.cause == "no-token"
    assert {results[name].error.cause for name in ("root", "data2")} == {"cross-volume-guard"}


def test_a_missing_volume_holds_the_others_back(swtpm: Swtpm, volumes: list[Path]) -> None:
    recorder = Recorder()
    gone = [crypttab.Entry("root", str(volumes[0])), crypttab.Entry("data1", f"UUID={UUIDS[2][:-1]}9")]
    report = open_all(swtpm.tcti, gone, lambda _token_id: None, mapper=recorder)
    assert report.exit_code == ExitCode.UNLOCK_FAILED and recorder.opened == []


def test_a_mapping_that_fails_closes_the_ones_before_it(swtpm: Swtpm, volumes: list[Path]) -> None:
    recorder = Recorder(fail="data2")
    code, results = run(swtpm, volumes, recorder)
    assert code == ExitCode.UNLOCK_FAILED
    assert recorder.opened == [] and recorder.closed == ["data1", "root"]
    assert not any(result.opened for result in results.values())
