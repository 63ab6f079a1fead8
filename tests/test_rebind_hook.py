"""The update hook (hooks/rebind): what kernel, initramfs and package updates run to approve the next boot.

It runs the real luks-tpm, pointed at a test volume and swtpm by a two-line wrapper (the hook itself takes
its volumes from /etc/crypttab, as the package installs it). What is checked: it stays silent where nothing
is bound to the boot chain, rebinds when something is, never fails the package operation that ran it, and
leaves the initramfs step of a kernel's postinst to the kernel hook that follows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from luks_tpm import cryptsetup

from .fixtures_luks import LuksImage
from .fixtures_tpm import Swtpm
from .helpers import REPO, luks_tpm_json

HOOK = REPO / "hooks" / "rebind" / "luks-tpm-rebind"


def wrapper(tmp_path: Path, tcti: str, image: Path) -> tuple[Path, Path]:
    """The real luks-tpm for this test's TPM and volume; it notes each run in the returned file."""
    runs = tmp_path / "runs"
    script = tmp_path / "luks-tpm"
    script.write_text(
        f'#!/bin/sh\necho "$*" >>{runs}\ncd {REPO} && exec {sys.executable} -m luks_tpm --tcti {tcti} "$@" {image}\n'
    )
    script.chmod(0o755)
    return script, runs


def run_hook(
    luks_tpm: Path, approver: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": "/usr/bin:/bin", "LUKS_TPM": str(luks_tpm), "LUKS_TPM_APPROVER": str(approver)}
    return subprocess.run(
        ["sh", str(HOOK), *args], capture_output=True, text=True, check=False, env={**environment, **(env or {})}
    )


def approvals(image: Path) -> list[int]:
    with cryptsetup.open_device(image) as device:
        texts = [device.token_json_get(token_id) for token_id, kind in device.tokens() if kind == "luks-tpm"]
    return [len(json.loads(text or "{}").get("approvals", [])) for text in texts]


def test_nothing_bound_to_the_boot_chain_nothing_run(luks_volume: LuksImage, swtpm: Swtpm, tmp_path: Path) -> None:
    luks_tpm, runs = wrapper(tmp_path, swtpm.tcti, luks_volume.path)
    result = run_hook(
        luks_tpm, tmp_path / "no-approver.json", "kernel", "6.1.0-57-amd64", "/boot/vmlinuz-6.1.0-57-amd64"
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not runs.exists()


def test_kernel_hook_rebinds_and_never_fails_the_update(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, tmp_path: Path
) -> None:
    image, approver = luks_volume.path, tmp_path / "approver.json"
    luks_tpm_json(
        "enroll",
        image,
        "--boot-chain",
        "--approver",
        approver,
        "--mode",
        "sealed",
        "--unlock-key-file",
        passphrase_file,
        tcti=fresh_swtpm.tcti,
    )
    luks_tpm, runs = wrapper(tmp_path, fresh_swtpm.tcti, image)
    result = run_hook(luks_tpm, approver, "kernel", "6.1.0-57-amd64", "/boot/vmlinuz-6.1.0-57-amd64")
    # This host has no measured boot: the next boot cannot be predicted, which the hook says, and exits 0.
    assert result.returncode == 0, result.stderr
    assert runs.read_text().split() == ["rebind", "--approver", str(approver)]
    assert "no TCG event log" in result.stderr and "WARNING: the next boot is not approved" in result.stderr
    assert approvals(image) == [1]  # this boot's state stays approved


def test_initramfs_hook_leaves_a_kernel_postinst_to_the_kernel_hook(
    luks_volume: LuksImage, swtpm: Swtpm, tmp_path: Path
) -> None:
    approver = tmp_path / "approver.json"
    approver.write_text("{}")  # only its presence counts here: luks-tpm is not run
    luks_tpm, runs = wrapper(tmp_path, swtpm.tcti, luks_volume.path)
    inside = run_hook(
        luks_tpm,
        approver,
        "initramfs",
        "6.1.0-57-amd64",
        "/boot/initrd.img-6.1.0-57-amd64",
        env={"DPKG_MAINTSCRIPT_PACKAGE": "linux-image-6.1.0-57-amd64"},
    )
    assert (inside.returncode, inside.stderr) == (0, "") and not runs.exists()
    alone = run_hook(luks_tpm, approver, "initramfs", "6.1.0-56-amd64", "/boot/initrd.img-6.1.0-56-amd64")
    assert alone.returncode == 0 and runs.read_text().split()[0] == "rebind"
    assert "not a luks-tpm approver key file" in alone.stderr  # luks-tpm's own error, then the hook's warning
    assert os.path.exists(approver)


def test_thin_hooks_call_the_shared_script() -> None:
    """The files under /etc are conffiles: they only name what to run, so updates change the script."""
    for name, why in (("kernel", "kernel"), ("initramfs", "initramfs")):
        lines = [
            line for line in (REPO / "hooks" / "rebind" / name).read_text().splitlines() if not line.startswith("#")
        ]
        assert lines[-1] == f'exec /usr/lib/luks-tpm/luks-tpm-rebind {why} "$@"', name
