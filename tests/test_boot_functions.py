"""The boot shell functions (hooks/functions.sh) read crypttab as luks-tpm's own parser does.

The hooks decide with them which entries the initramfs unlocks and strip the marker from the copy the
other tools read; the boot-time `open --all` parses the same entries in Python. Both must agree, under
each shell the functions run in (dash for initramfs-tools hooks, busybox ash at boot, bash for dracut).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from luks_tpm import crypttab

from .helpers import REPO

FUNCTIONS = REPO / "hooks" / "functions.sh"
TAB = """\
# name device key options          x-luks-tpm in a comment line
root   UUID=0f6e4a2c-8d1b-4c7e-9a55-3b2d1e0f9c88  none  luks,discard,x-luks-tpm
\tdata\t/dev/vdb   none   x-luks-tpm,luks,readonly   # trailing comment
only   UUID=11111111-2222-4333-8444-555555555555 none x-luks-tpm
swap   /dev/vdc   /dev/urandom swap
other  /dev/vdd   none  luks   # x-luks-tpm only in a comment
near   /dev/vde   none  luks,x-luks-tpm2,no-x-luks-tpm
three  /dev/vdf   none

"""
SHELLS = [("dash", ["dash"]), ("bash", ["bash", "--posix"]), ("busybox", ["busybox", "sh"])]


def _run(shell: list[str], function: str, stdin: str, tmp_path: Path) -> str:
    if shutil.which(shell[0]) is None:
        pytest.skip(f"{shell[0]} is not installed")
    # busybox: its own awk as well, as in the initramfs.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if shell[0] == "busybox" and not (bin_dir / "awk").exists():
        (bin_dir / "awk").symlink_to(shutil.which("busybox") or "busybox")
    result = subprocess.run(
        [*shell, "-c", f'. "{FUNCTIONS}"; {function}'],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@pytest.mark.parametrize("shell", [s[1] for s in SHELLS], ids=[s[0] for s in SHELLS])
def test_marked_entries_are_the_ones_luks_tpm_opens(shell: list[str], tmp_path: Path) -> None:
    marked = _run(shell, "luks_tpm_crypttab marked", TAB, tmp_path)
    assert [e.name for e in crypttab.parse(marked)] == [e.name for e in crypttab.parse(TAB)] == ["root", "data", "only"]
    # whole lines, as written
    assert marked.splitlines() == [
        line for line in TAB.splitlines() if line.split("#")[0].split()[:1] in (["root"], ["data"], ["only"])
    ]


@pytest.mark.parametrize("shell", [s[1] for s in SHELLS], ids=[s[0] for s in SHELLS])
def test_strip_removes_only_the_marker(shell: list[str], tmp_path: Path) -> None:
    stripped = _run(shell, "luks_tpm_crypttab strip", TAB, tmp_path)
    assert crypttab.parse(stripped) == []
    before = {e.name: e for e in crypttab.parse(TAB, only_marked=False)}
    after = {e.name: e for e in crypttab.parse(stripped, only_marked=False)}
    assert after == before  # names, devices, readonly, discard
    lines = stripped.splitlines()
    assert lines[1] == "root UUID=0f6e4a2c-8d1b-4c7e-9a55-3b2d1e0f9c88 none luks,discard"
    assert lines[2] == "data /dev/vdb none luks,readonly"
    assert lines[3] == "only UUID=11111111-2222-4333-8444-555555555555 none"
    # every line without the marker is kept byte for byte, comments and blank lines included
    unmarked = [i for i, line in enumerate(TAB.splitlines()) if i not in (1, 2, 3)]
    assert [lines[i] for i in unmarked] == [TAB.splitlines()[i] for i in unmarked]


@pytest.mark.parametrize("shell", [s[1] for s in SHELLS], ids=[s[0] for s in SHELLS])
def test_has_marked(shell: list[str], tmp_path: Path) -> None:
    with_marker, without = tmp_path / "with", tmp_path / "without"
    with_marker.write_text(TAB)
    without.write_text("swap /dev/vdc /dev/urandom swap\n# x-luks-tpm\nother /dev/vdd none luks # x-luks-tpm\n")
    check = 'if luks_tpm_has_marked "$F"; then echo yes; else echo no; fi'
    assert _run(shell, check.replace("$F", str(with_marker)), "", tmp_path) == "yes\n"
    assert _run(shell, check.replace("$F", str(without)), "", tmp_path) == "no\n"
    assert _run(shell, check.replace("$F", str(tmp_path / "missing")), "", tmp_path) == "no\n"
