"""The boot scripts' decisions at the fence (issue 23): when the boot stops, and when it goes on.

hooks/functions.sh is sourced as the initramfs sources it, under each shell it runs in, with its inputs
pointed at a test directory: the kernel command line, /sys/block (dm-crypt mappings: `dm/uuid`, `dm/name`),
/run/luks-tpm (what the unlock pass left), and luks-tpm itself. Powering off is the one step replaced
(`luks_tpm_stop` ends the shell instead, after printing what the console would show). The VM suite runs
the same functions for real: a TPM that dies after the unlock pass, root and data swaps.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .helpers import REPO

FUNCTIONS = REPO / "hooks" / "functions.sh"
SHELLS = [("dash", ["dash"]), ("busybox", ["busybox", "sh"])]
STOPPED = 99
ROOT_UUID = "CRYPT-LUKS2-1b0c7a3e0d3c4b6a9e55000000000001-root"
DATA_UUID = "CRYPT-LUKS2-1b0c7a3e0d3c4b6a9e55000000000002-data1"


class Boot:
    def __init__(self, tmp_path: Path, shell: list[str]) -> None:
        if shutil.which(shell[0]) is None:
            pytest.skip(f"{shell[0]} is not installed")
        self.shell, self.root = shell, tmp_path
        self.run_dir, self.sys_block = tmp_path / "run", tmp_path / "sys-block"
        self.run_dir.mkdir()
        self.sys_block.mkdir()
        self.cmdline = tmp_path / "cmdline"
        self.cmdline.write_text("root=/dev/mapper/root ro quiet\n")
        self.luks_tpm = tmp_path / "luks-tpm"
        self.fence_exit(0)
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        if shell[0] == "busybox":  # its own applets, as in the initramfs
            for applet in ("awk", "tr", "sleep"):
                (self.bin / applet).symlink_to(shutil.which("busybox") or "busybox")

    def fence_exit(self, code: int) -> None:
        """luks-tpm as far as the fence goes: `fence` exits `code` (a TPM that answers, or fails)."""
        self.luks_tpm.write_text(f'#!/bin/sh\necho "$*" >>{self.root}/luks-tpm-runs\nexit {code}\n')
        self.luks_tpm.chmod(0o755)

    def mapping(self, index: int, uuid: str) -> None:
        dm = self.sys_block / f"dm-{index}" / "dm"
        dm.mkdir(parents=True)
        (dm / "uuid").write_text(uuid + "\n")
        (dm / "name").write_text(uuid.rsplit("-", 1)[1] + "\n")

    def unlock_pass_left(self, *, used: bool, opened: list[str]) -> None:
        if used:
            (self.run_dir / "tpm-used").write_text("")
        (self.run_dir / "tpm-opened").write_text("".join(f"{uuid} {uuid.rsplit('-', 1)[1]}\n" for uuid in opened))

    def fence(self, mode: str = "boot", *, tpm: bool = True) -> subprocess.CompletedProcess[str]:
        # The TPM device node: present or not, as the fence's wait finds it.
        wait = "luks_tpm_wait_tpm() { return 0; }" if tpm else "luks_tpm_wait_tpm() { return 1; }"
        script = f"""
            . "{FUNCTIONS}"
            LUKS_TPM={self.luks_tpm} LUKS_TPM_RUN={self.run_dir}
            LUKS_TPM_CMDLINE={self.cmdline} LUKS_TPM_SYS_BLOCK={self.sys_block}
            luks_tpm_stop() {{ luks_tpm_say "$*"; luks_tpm_say STOPPING THE BOOT; exit {STOPPED}; }}
            {wait}
            luks_tpm_fence {mode}
            echo "the boot goes on"
        """
        return subprocess.run(
            [*self.shell, "-c", script],
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": f"{self.bin}:/usr/bin:/bin"},
        )


@pytest.fixture(params=[s[1] for s in SHELLS], ids=[s[0] for s in SHELLS])
def boot(request: pytest.FixtureRequest, tmp_path: Path) -> Boot:
    return Boot(tmp_path, request.param)


def stopped(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == STOPPED and "the boot goes on" not in result.stdout, result
    assert "luks-tpm: STOPPING THE BOOT" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def went_on(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 0 and "the boot goes on" in result.stdout, result
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_every_volume_from_the_tpm_fence_raised(boot: Boot) -> None:
    boot.mapping(0, ROOT_UUID)
    boot.mapping(1, DATA_UUID)
    boot.unlock_pass_left(used=True, opened=[ROOT_UUID, DATA_UUID])
    went_on(boot.fence(), "fence raised (PCR 15)")
    assert (boot.root / "luks-tpm-runs").read_text().split() == ["--tcti", "device:/dev/tpmrm0", "fence"]


def test_fence_failure_after_the_tpm_was_used_stops_the_boot(boot: Boot) -> None:
    boot.mapping(0, ROOT_UUID)
    boot.unlock_pass_left(used=True, opened=[ROOT_UUID])
    boot.fence_exit(4)
    stopped(boot.fence(), "luks-tpm fence failed (exit 4): the fence is NOT raised and this boot used the TPM")


def test_a_tpm_that_vanished_after_the_pass_stops_the_boot(boot: Boot) -> None:
    boot.unlock_pass_left(used=True, opened=[])
    stopped(boot.fence(tpm=False), "no TPM (/dev/tpmrm0)")


def test_fence_optional_boots_on_and_says_so(boot: Boot) -> None:
    boot.cmdline.write_text("root=/dev/mapper/root luks_tpm.fence=optional\n")
    boot.unlock_pass_left(used=True, opened=[])
    boot.fence_exit(4)
    went_on(boot.fence(), "fence NOT raised; booting on because of luks_tpm.fence=optional")


def test_no_tpm_at_all_boots_with_passphrases(boot: Boot) -> None:
    boot.mapping(0, ROOT_UUID)  # opened by the passphrase prompt
    went_on(boot.fence(tpm=False), "no TPM (/dev/tpmrm0): fence NOT raised (the unlock pass did not use the TPM)")


def test_a_volume_opened_by_passphrase_beside_tpm_opened_ones_stops_the_boot(boot: Boot) -> None:
    boot.mapping(0, ROOT_UUID)  # the look-alike root, opened with the attacker's passphrase
    boot.mapping(1, DATA_UUID)
    boot.unlock_pass_left(used=True, opened=[DATA_UUID])
    stopped(boot.fence(), "fence raised (PCR 15)", "cross-volume guard: root opened without the TPM")


def test_passphrases_for_every_volume_is_no_stranger(boot: Boot) -> None:
    """The pass opened nothing (the guard held every volume back): every volume by passphrase is fine."""
    boot.mapping(0, ROOT_UUID)
    boot.mapping(1, DATA_UUID)
    boot.unlock_pass_left(used=True, opened=[])
    went_on(boot.fence(), "fence raised (PCR 15)")


def test_no_emergency_shell_with_tpm_opened_volumes(boot: Boot) -> None:
    boot.mapping(0, ROOT_UUID)
    boot.unlock_pass_left(used=True, opened=[ROOT_UUID])
    stopped(boot.fence("emergency"), "fence raised (PCR 15)", "no emergency shell while volumes the TPM opened")
    boot.unlock_pass_left(used=True, opened=[])
    went_on(boot.fence("emergency"), "fence raised (PCR 15)")


def test_plain_mappings_of_other_kinds_are_not_crypt(boot: Boot) -> None:
    boot.mapping(0, ROOT_UUID)
    boot.mapping(1, "LVM-abcdef-vg-root")  # LVM on top of the TPM-opened root
    boot.unlock_pass_left(used=True, opened=[ROOT_UUID])
    went_on(boot.fence(), "fence raised (PCR 15)")


def test_the_pass_records_what_it_opened_when_nothing_was_open_before(boot: Boot) -> None:
    """The mappings the unlock pass created: all of them when there were none before (the usual boot)."""
    before, after = boot.root / "before", boot.root / "after"
    before.write_text("")
    after.write_text(f"{ROOT_UUID} root\n{DATA_UUID} data1\n")
    script = f'. "{FUNCTIONS}"; luks_tpm_new_mappings {before} {after}'
    env = {"PATH": f"{boot.bin}:/usr/bin:/bin"}
    result = subprocess.run([*boot.shell, "-c", script], capture_output=True, text=True, check=False, env=env)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == after.read_text()
    before.write_text(f"{ROOT_UUID} root\n")
    result = subprocess.run([*boot.shell, "-c", script], capture_output=True, text=True, check=False, env=env)
    assert result.stdout == f"{DATA_UUID} data1\n"
