"""The bootchain tests' view of the lab boots: fixtures (logs, PCRs, configs) and the boot files.

The binaries the lab booted are not committed: shim, GRUB and the kernels are fetched from Debian
(`apt-get download` of the exact versions, `dpkg-deb -x`, cached under .work/bootchain) and checked
against the sha256 recorded at boot time; the initramfs images are rebuilt byte for byte by
bootchain_initrd.py from busybox-static and the kernel's efivarfs.ko. A test that cannot fetch them
skips, naming what is missing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from luks_tpm.bootchain import eventlog
from luks_tpm.bootchain.bootfiles import BootFiles

from . import bootchain_initrd
from .helpers import REPO

DATA = REPO / "tests" / "data" / "bootchain"
WORK = REPO / ".work" / "bootchain"
PACKAGES = {
    "shim-signed": "1.51~1+deb12u1+16.1-2~deb12u1",
    "grub-efi-amd64-signed": "1+2.06+13+deb12u2",
    "linux-image-6.1.0-56-amd64": "6.1.192-2",
    "linux-image-6.1.0-57-amd64": "6.1.192-3",
    "busybox-static": "1:1.35.0-4+deb12u1+b1",
}
SHIM = "shim-signed/usr/lib/shim/shimx64.efi.signed"
GRUB = "grub-efi-amd64-signed/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
# The previous Debian 12 GRUB (bookworm-security): SBAT generation grub,4, which shim 16.1's SbatLevel revokes.
REVOKED_GRUB = "grub-efi-amd64-signed=1+2.06+13+deb12u1/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
BUSYBOX = "busybox-static/bin/busybox"
# The lab disk: the fs UUIDs its grub.cfg files search for, and the GRUB devices they are on.
UUIDS = {
    "7E57-E5B0": "hd0,gpt1",
    "7e57b007-0000-4000-8000-000000000002": "hd0,gpt2",
    "7e570007-0000-4000-8000-000000000003": "hd0,gpt3",
}


def log(run: str) -> eventlog.EventLog:
    return eventlog.parse((DATA / "runs" / run / "evlog.bin").read_bytes())


def pcrs(run: str) -> dict[str, dict[int, bytes]]:
    """The PCRs the booted guest read from sysfs (all banks, 0-23)."""
    raw = json.loads((DATA / "runs" / run / "pcrs.json").read_text())
    return {bank: {int(i): bytes.fromhex(v) for i, v in values.items()} for bank, values in raw.items()}


def _recorded() -> dict[str, str]:
    lines = (DATA / "binaries.sha256").read_text().splitlines()
    return {path: digest for digest, path in (line.split() for line in lines)}


def binary(relative: str) -> Path:
    """A file of one of PACKAGES (or of "package=version/..."), extracted under .work/bootchain/x (fetched
    once), as the lab had it."""
    directory = relative.split("/", 1)[0]
    package, _, version = directory.partition("=")
    version = version or PACKAGES[package]
    root = WORK / "x" / directory
    if not root.is_dir():
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            pytest.skip("apt-get/dpkg-deb missing: cannot fetch Debian's boot chain packages")
        with tempfile.TemporaryDirectory(dir=WORK.parent if WORK.parent.exists() else None) as tmp:
            fetched = subprocess.run(
                ["apt-get", "download", "-q", f"{package}={version}"],
                cwd=tmp,
                capture_output=True,
                text=True,
                check=False,
            )
            debs = list(Path(tmp).glob("*.deb"))
            if fetched.returncode != 0 or not debs:
                pytest.skip(f"cannot download {package}={version} from Debian: {fetched.stderr.strip()[-200:]}")
            staging = WORK / "x" / f".{directory}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
            staging.rename(root)
    path = WORK / "x" / relative
    want = _recorded().get(relative)
    if want is not None and hashlib.sha256(path.read_bytes()).hexdigest() != want:
        pytest.skip(f"{relative} from Debian differs from the binary the lab booted")
    return path


def _kernel(version: str) -> tuple[Path, Path]:
    package = f"linux-image-{version}"
    return (
        binary(f"{package}/boot/vmlinuz-{version}"),
        binary(f"{package}/lib/modules/{version}/kernel/fs/efivarfs/efivarfs.ko"),
    )


def boot_tree(scenario: str, root: Path) -> tuple[Path, Path]:
    """(ESP, /boot) of a lab scenario under `root`, as the lab disk held them; verified file by file."""
    fixture = DATA / "boot" / scenario
    esp, boot = root / "esp", root / "boot"
    (esp / "EFI" / "BOOT").mkdir(parents=True)
    (esp / "EFI" / "debian").mkdir(parents=True)
    (boot / "grub" / "fonts").mkdir(parents=True)
    shutil.copyfile(binary(SHIM), esp / "EFI" / "BOOT" / "BOOTX64.EFI")
    shutil.copyfile(binary(GRUB), esp / "EFI" / "BOOT" / "grubx64.efi")
    shutil.copyfile(fixture / "stub.cfg", esp / "EFI" / "debian" / "grub.cfg")
    shutil.copyfile(fixture / "grub.cfg", boot / "grub" / "grub.cfg")
    shutil.copyfile(fixture / "grubenv", boot / "grub" / "grubenv")
    # GRUB 2.06-13 never measures the font (see the findings), only its presence decides `if loadfont`.
    (boot / "grub" / "fonts" / "unicode.pf2").write_bytes(b"")
    tag = "v2" if scenario == "initrd2" else "v1"
    busybox = binary(BUSYBOX).read_bytes()
    for name in (DATA / "boot" / scenario / "files.txt").read_text().split():
        if name.startswith("vmlinuz-"):
            kernel, module = _kernel(name.removeprefix("vmlinuz-"))
            (boot / name).symlink_to(kernel)
            initrd = bootchain_initrd.build(busybox, module.read_bytes(), tag)
            (boot / name.replace("vmlinuz-", "initrd.img-")).write_bytes(initrd)
    recorded = dict(line.split()[::-1] for line in (fixture / "boot.sha256").read_text().splitlines())
    for name, digest in recorded.items():
        if name.startswith(("./vmlinuz", "./initrd", "./grub/grub")):
            assert hashlib.sha256((boot / name).read_bytes()).hexdigest() == digest, name
    return esp, boot


def files(booted: eventlog.EventLog, esp: Path, boot: Path, snapshots: Path | None = None) -> BootFiles:
    return BootFiles.from_log(booted, esp=esp, boot=boot, uuids=UUIDS, snapshots=snapshots)
