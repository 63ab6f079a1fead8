"""The boot scripts' two command lines skip click (luks_tpm/boot.py) and must behave exactly as the CLI
does with the same words in another order (which click parses). The unlock itself at boot is the VM
tests' (tests/vm); here: which path runs, and that both give the same output and exit code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from luks_tpm.model import FENCE_BANK, FENCE_PCR
from luks_tpm.tpm import Tpm
from luks_tpm.tpm.pcr import pcr_values

from .fixtures_tpm import Swtpm
from .helpers import REPO, luks_tpm


def imports_click(*args: str) -> bool:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "luks_tpm", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    return re.search(r"\|\s+click$", result.stderr, re.MULTILINE) is not None


def test_the_boot_command_lines_do_not_load_click(fresh_swtpm: Swtpm, tmp_path: Path) -> None:
    swtpm = fresh_swtpm  # `fence` raises the fence, which only a TPM restart lowers
    crypttab = tmp_path / "crypttab"
    crypttab.write_text("")
    assert not imports_click("--tcti", swtpm.tcti, "fence")
    assert not imports_click("--tcti", swtpm.tcti, "open", "--all", "--crypttab", str(crypttab))
    # the same words in another order are the CLI's
    assert imports_click("fence", "--tcti", swtpm.tcti)
    assert imports_click("--tcti", swtpm.tcti, "open", "--crypttab", str(crypttab), "--all")


def test_fence_is_the_same_either_way(fresh_swtpm: Swtpm) -> None:
    # a TPM of its own: the fence stays up until the TPM restarts, and other tests share `swtpm`
    swtpm = fresh_swtpm
    boot = luks_tpm("fence", tcti=swtpm.tcti)
    with Tpm(swtpm.tcti) as tpm:
        assert pcr_values(tpm, FENCE_BANK, [FENCE_PCR])[FENCE_PCR] != bytes(FENCE_BANK.size)
    cli = luks_tpm("fence", "--tcti", swtpm.tcti, tcti=None)
    assert (boot.stdout, boot.stderr) == (cli.stdout, cli.stderr)
    assert "fence raised" in boot.stdout


@pytest.mark.parametrize(
    "crypttab_text",
    ["root /dev/disk/by-uuid/0 none x-luks-tpm\n", "root\n", ""],
    ids=["one-volume", "malformed", "empty"],
)
def test_open_all_is_the_same_either_way(swtpm: Swtpm, tmp_path: Path, crypttab_text: str) -> None:
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(crypttab_text)
    boot = luks_tpm("open", "--all", "--crypttab", crypttab, tcti=swtpm.tcti, expect=None)
    cli = luks_tpm("open", "--crypttab", crypttab, "--all", tcti=swtpm.tcti, expect=None)
    assert (boot.returncode, boot.stdout, boot.stderr) == (cli.returncode, cli.stdout, cli.stderr)


def test_a_crypttab_that_is_not_a_file_is_left_to_the_cli(swtpm: Swtpm, tmp_path: Path) -> None:
    for crypttab in (tmp_path / "missing", tmp_path):
        result = luks_tpm("open", "--all", "--crypttab", crypttab, tcti=swtpm.tcti, expect=2)
        assert "--crypttab" in result.stderr, result.stderr
