"""The lines luks-tpm's own scripts run (boot: `open --all`, `fence`; request-key.conf) skip the command-line
parser (luks_tpm/fixed_lines.py) and must behave exactly as the command line does with the same meaning
spelled so that only the parser takes it (options in another order). The unlock itself at boot is the VM
tests' (tests/vm); here: which path runs, and that both give the same output and exit code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from luks_tpm.fixed_lines import boot_line, request_key_line
from luks_tpm.model import FENCE_BANK, FENCE_PCR
from luks_tpm.tpm import Tpm
from luks_tpm.tpm.pcr import pcr_values

from .fixtures_tpm import Swtpm
from .helpers import imported_modules, luks_tpm

BOOT_LINES = [
    ["--tcti", "device:/dev/tpmrm0", "open", "--all", "--crypttab", "/usr/lib/luks-tpm/crypttab"],
    ["--tcti", "device:/dev/tpmrm0", "fence"],
]
REQUEST_KEY_LINES = [
    ["--tcti", "device:/dev/tpmrm0", "request-key", "123", "logon", "cryptsetup:x-d0", "-", "-3"],
    ["request-key", "123", "logon", "cryptsetup:x-d0", "-", "-3"],
]
# Close to a fixed line, and so for the parser, with its own words for what is wrong or different.
PARSER_LINES = [
    ["fence"],
    ["--tcti=device:/dev/tpmrm0", "fence"],
    ["fence", "--tcti", "device:/dev/tpmrm0"],
    ["--tcti", "device:/dev/tpmrm0", "fence", "-v"],
    ["--tcti", "device:/dev/tpmrm0", "--json", "fence"],
    ["--tcti", "", "fence"],
    ["--tcti", "device:/dev/tpmrm0", "open", "--crypttab", "/etc/crypttab", "--all"],
    ["--tcti", "device:/dev/tpmrm0", "open", "--all"],
    ["--tcti", "device:/dev/tpmrm0", "open", "--all", "--crypttab", ""],
    ["--tcti", "device:/dev/tpmrm0", "load-key", "/dev/sda"],
    ["--tcti", "device:/dev/tpmrm0", "request-key", "123", "logon", "cryptsetup:x-d0", "-"],
    ["--json", "request-key", "123", "logon", "cryptsetup:x-d0", "-", "-3"],
    [],
]


@pytest.mark.parametrize("words", BOOT_LINES, ids=" ".join)
def test_the_boot_scripts_lines_are_fixed_lines(words: list[str]) -> None:
    assert boot_line(words) is not None and request_key_line(words) is None


@pytest.mark.parametrize("words", REQUEST_KEY_LINES, ids=" ".join)
def test_request_key_conf_lines_are_fixed_lines(words: list[str]) -> None:
    assert request_key_line(words) is not None and boot_line(words) is None


@pytest.mark.parametrize("words", PARSER_LINES, ids=lambda words: " ".join(words) or "nothing")
def test_every_other_line_is_the_parsers(words: list[str]) -> None:
    assert boot_line(words) is None and request_key_line(words) is None


def test_the_fixed_lines_do_not_load_click(fresh_swtpm: Swtpm, tmp_path: Path) -> None:
    tcti = fresh_swtpm.tcti  # `fence` raises the fence, which only a TPM restart lowers
    crypttab = tmp_path / "crypttab"
    crypttab.write_text("")
    # (no device-mapper on the test machines: open --all ends with exit 8 there, after its imports)
    for words, expected in ((["open", "--all", "--crypttab", str(crypttab)], (0, 8)), (["fence"], (0,))):
        code, modules, stderr = imported_modules("--tcti", tcti, *words)
        assert code in expected, stderr
        assert "click" not in modules and "luks_tpm.cli" not in modules, words
    code, modules, _ = imported_modules("--tcti", tcti, "fence", "--json")
    assert code == 0 and "click" in modules  # the same command spelled otherwise: the parser's


def test_fence_is_the_same_either_way(fresh_swtpm: Swtpm) -> None:
    # a TPM of its own: the fence stays up until the TPM restarts, and other tests share `swtpm`
    swtpm = fresh_swtpm
    fixed = luks_tpm("fence", tcti=swtpm.tcti)  # `--tcti T fence`: the boot script's line
    with Tpm(swtpm.tcti) as tpm:
        assert pcr_values(tpm, FENCE_BANK, [FENCE_PCR])[FENCE_PCR] != bytes(FENCE_BANK.size)
    parsed = luks_tpm("fence", "--tcti", swtpm.tcti, tcti=None)
    assert (fixed.returncode, fixed.stdout, fixed.stderr) == (parsed.returncode, parsed.stdout, parsed.stderr)
    assert "fence raised" in fixed.stdout


@pytest.mark.parametrize(
    "crypttab_text",
    ["root /dev/disk/by-uuid/0 none x-luks-tpm\n", "root\n", "", "root /dev/vda none luks,x-luks-tpm\n"],
    ids=["missing-volume", "malformed", "empty", "no-device-mapper"],
)
def test_open_all_is_the_same_either_way(swtpm: Swtpm, tmp_path: Path, crypttab_text: str) -> None:
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(crypttab_text)
    fixed = luks_tpm("open", "--all", "--crypttab", crypttab, tcti=swtpm.tcti, expect=None)
    parsed = luks_tpm("open", "--crypttab", crypttab, "--all", tcti=swtpm.tcti, expect=None)
    assert (fixed.returncode, fixed.stdout, fixed.stderr) == (parsed.returncode, parsed.stdout, parsed.stderr)


def test_a_crypttab_that_is_not_a_file_is_refused_either_way(swtpm: Swtpm, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for crypttab in (tmp_path / "missing", tmp_path, fifo):
        lines: list[list[str | Path]] = [
            ["open", "--all", "--crypttab", crypttab],
            ["open", "--crypttab", crypttab, "--all"],
        ]
        for words in lines:
            result = luks_tpm(*words, tcti=swtpm.tcti, expect=2, timeout=20)
            assert "crypttab" in result.stderr, result.stderr
