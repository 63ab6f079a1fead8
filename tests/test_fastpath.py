"""Plain unlock command lines skip click (luks_tpm/fastpath.py) and must behave exactly as the CLI does
with the same meaning spelled so that only click takes it (with a `--` that ends the options). The unlock
itself at boot is the VM tests' (tests/vm); here: which path runs, and that both give the same output and
exit code, for successes and for failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from luks_tpm.fastpath import fast_command
from luks_tpm.model import FENCE_BANK, FENCE_PCR
from luks_tpm.tpm import Tpm
from luks_tpm.tpm.pcr import pcr_values

from .fixtures_luks import TEST_PASSPHRASE, make_luks_image
from .fixtures_tpm import Swtpm
from .helpers import format_derived, imported_modules, luks_tpm


def imports_click(*args: str) -> bool:
    return "click" in imported_modules(*args)[1]


@pytest.fixture
def crypttab(tmp_path: Path) -> Path:
    path = tmp_path / "crypttab"
    path.write_text("")
    return path


FAST_LINES = [
    ["fence"],
    ["--tcti=device:/dev/null", "--json", "fence"],
    ["open", "--all", "--crypttab", "CRYPTTAB"],
    ["open", "--crypttab=CRYPTTAB", "--all", "--json"],
    ["open", "DEVICE", "NAME"],
    ["load-key", "DEVICE"],
    ["load-key", "DEVICE", "--keyring", "@p"],
    ["--json", "load-key", "--keyring=@p", "DEVICE", "OTHER", "--tcti", "device:/dev/null"],
]
CLICK_LINES = [
    ["fence", "-v"],
    ["fence", "extra"],
    ["fence", "--"],
    ["--tcti", "device:/dev/null", "--tcti", "device:/dev/null", "fence"],
    ["open", "--all", "--crypttab", "MISSING"],
    ["open", "--all", "--crypttab", "."],
    ["open", "--all", "DEVICE"],
    ["open", "DEVICE"],
    ["open", "DEVICE", "NAME", "--readonly"],
    ["open", "--", "DEVICE", "NAME"],
    ["load-key"],
    ["load-key", "--", "DEVICE"],
    ["load-key", "DEVICE", "--keyring", "@zz"],
    ["load-key", "DEVICE", "--keyring"],
    ["load-key", "DEVICE", "--timeout", "5"],
    ["load-key", "DEVICE", "--help"],
    ["load-key", "DEVICE", "--keyring", "@p", "--keyring", "@p"],
    ["load-key", ""],
    ["--keyring", "@p", "load-key", "DEVICE"],
    ["status", "DEVICE"],
    ["--json"],
    [],
]


def _spelled(words: list[str], crypttab: Path) -> list[str]:
    return [word.replace("CRYPTTAB", str(crypttab)).replace("MISSING", str(crypttab) + ".missing") for word in words]


@pytest.mark.parametrize("words", FAST_LINES, ids=" ".join)
def test_plain_unlock_lines_take_the_fast_path(words: list[str], crypttab: Path) -> None:
    assert fast_command(_spelled(words, crypttab)) is not None


@pytest.mark.parametrize("words", CLICK_LINES, ids=lambda words: " ".join(words) or "nothing")
def test_every_other_line_is_left_to_click(words: list[str], crypttab: Path) -> None:
    assert fast_command(_spelled(words, crypttab)) is None


def test_the_fast_lines_do_not_load_click(fresh_swtpm: Swtpm, crypttab: Path, tmp_path: Path) -> None:
    tcti = fresh_swtpm.tcti  # `fence` raises the fence, which only a TPM restart lowers
    missing = str(tmp_path / "missing.img")
    assert not imports_click("--tcti", tcti, "load-key", missing, "--keyring", "@p")
    assert not imports_click("--tcti", tcti, "open", missing, "name")
    assert not imports_click("--tcti", tcti, "open", "--all", "--crypttab", str(crypttab))
    assert not imports_click("--tcti", tcti, "fence")
    assert imports_click("--tcti", tcti, "load-key", "--keyring", "@p", "--", missing)


def test_fence_is_the_same_either_way(fresh_swtpm: Swtpm) -> None:
    # a TPM of its own: the fence stays up until the TPM restarts, and other tests share `swtpm`
    swtpm = fresh_swtpm
    fast = luks_tpm("fence", tcti=swtpm.tcti)
    with Tpm(swtpm.tcti) as tpm:
        assert pcr_values(tpm, FENCE_BANK, [FENCE_PCR])[FENCE_PCR] != bytes(FENCE_BANK.size)
    cli = luks_tpm("fence", "--", tcti=swtpm.tcti)
    assert (fast.stdout, fast.stderr) == (cli.stdout, cli.stderr)
    assert "fence raised" in fast.stdout


@pytest.mark.parametrize(
    "crypttab_text",
    ["root /dev/disk/by-uuid/0 none x-luks-tpm\n", "root\n", ""],
    ids=["one-volume", "malformed", "empty"],
)
def test_open_all_is_the_same_either_way(swtpm: Swtpm, tmp_path: Path, crypttab_text: str) -> None:
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(crypttab_text)
    for extra in ([], ["--json"]):
        fast = luks_tpm("open", "--all", "--crypttab", crypttab, *extra, tcti=swtpm.tcti, expect=None)
        cli = luks_tpm("open", "--all", "--crypttab", crypttab, *extra, "--", tcti=swtpm.tcti, expect=None)
        assert (fast.returncode, fast.stdout, fast.stderr) == (cli.returncode, cli.stdout, cli.stderr)


def test_a_crypttab_that_is_not_a_file_is_left_to_the_cli(swtpm: Swtpm, tmp_path: Path) -> None:
    for crypttab in (tmp_path / "missing", tmp_path):
        result = luks_tpm("open", "--all", "--crypttab", crypttab, tcti=swtpm.tcti, expect=2)
        assert "--crypttab" in result.stderr, result.stderr


def test_open_device_name_is_the_same_either_way(swtpm: Swtpm, tmp_path: Path) -> None:
    image = make_luks_image(tmp_path / "volume.img").path
    for extra in ([], ["--json"]):
        fast = luks_tpm("open", image, "data", *extra, tcti=swtpm.tcti, expect=None)
        cli = luks_tpm("open", *extra, "--", image, "data", tcti=swtpm.tcti, expect=None)
        assert fast.returncode != 0  # no device-mapper here, or no token on that volume
        assert (fast.returncode, fast.stdout, fast.stderr) == (cli.returncode, cli.stdout, cli.stderr)


def _without_serials(data: Any) -> Any:
    """A load-key report minus what differs between two processes (the key's and the keyring's serials)."""
    if isinstance(data, dict):
        return {k: _without_serials(v) for k, v in data.items() if k not in {"serial", "keyring"}}
    if isinstance(data, list):
        return [_without_serials(item) for item in data]
    return data


def test_load_key_is_the_same_either_way(swtpm: Swtpm, second_swtpm: Swtpm, tmp_path: Path) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(TEST_PASSPHRASE)
    ours, elsewhere = tmp_path / "ours.img", tmp_path / "elsewhere.img"
    format_derived(ours, swtpm.tcti, passphrase)
    format_derived(elsewhere, second_swtpm.tcti, passphrase)  # a volume of another TPM
    not_luks = tmp_path / "plain.img"
    not_luks.write_bytes(bytes(4096))
    cases = [[ours], [ours, ours], [elsewhere], [not_luks], [tmp_path / "missing.img"], [ours, elsewhere]]
    for devices in cases:
        fast = luks_tpm("load-key", *devices, "--keyring", "@p", "--json", tcti=swtpm.tcti, expect=None)
        cli = luks_tpm("load-key", "--keyring", "@p", "--json", "--", *devices, tcti=swtpm.tcti, expect=None)
        assert (fast.returncode, fast.stderr) == (cli.returncode, cli.stderr), devices
        assert _without_serials(json.loads(fast.stdout)) == _without_serials(json.loads(cli.stdout)), devices
        text_fast = luks_tpm("load-key", *devices, "--keyring", "@p", tcti=swtpm.tcti, expect=None)
        text_cli = luks_tpm("load-key", "--keyring", "@p", "--", *devices, tcti=swtpm.tcti, expect=None)
        assert (text_fast.returncode, text_fast.stderr) == (text_cli.returncode, text_cli.stderr), devices
        assert len(text_fast.stdout.splitlines()) == len(text_cli.stdout.splitlines()), devices
    assert json.loads(luks_tpm("load-key", ours, "--keyring", "@p", "--json", tcti=swtpm.tcti).stdout)["serial"] > 0
