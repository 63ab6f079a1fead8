"""What Debian's signed GRUB images carry, read as GRUB reads it: the memdisk's grub.cfg against mtools'
reading of the same FAT volume, the SBAT version, and FAT volumes that are damaged or built by mkfs.fat."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from luks_tpm.bootchain import grubimage

from . import bootchain_lab as lab

BUILDS = {lab.GRUB: "2.06-13+deb12u2", lab.REVOKED_GRUB: "2.06-13+deb12u1"}


def _mtype(volume: Path, name: str) -> bytes:
    if shutil.which("mtype") is None:
        pytest.skip("mtools is not installed (scripts/bootstrap installs it)")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    return subprocess.run(["mtype", "-i", str(volume), f"::/{name}"], capture_output=True, check=True, env=env).stdout


@pytest.mark.parametrize("relative", BUILDS)
def test_debian_grub(relative: str, tmp_path: Path) -> None:
    image = lab.binary(relative).read_bytes()
    volume = grubimage.memdisk(image)
    assert volume is not None
    (tmp_path / "memdisk").write_bytes(volume)
    script = grubimage.builtin_config(image)
    assert script is not None and script.encode() == _mtype(tmp_path / "memdisk", "grub.cfg")
    assert "source $prefix/grub.cfg" in script
    assert grubimage.debian_version(image) == BUILDS[relative]
    modules, prefix = grubimage.modules(image)
    assert prefix == "/EFI/debian" and {"tpm", "linux", "search_fs_uuid"} <= modules


def _volume(tmp_path: Path, files: dict[str, bytes]) -> bytearray:
    """A FAT12 volume made by mkfs.fat and mtools, as grub-mkimage makes its memdisk."""
    if shutil.which("mkfs.fat") is None or shutil.which("mcopy") is None:
        pytest.skip("dosfstools/mtools are not installed (scripts/bootstrap installs them)")
    volume = tmp_path / "fat.img"
    subprocess.run(["mkfs.fat", "-F", "12", "-C", str(volume), "64"], capture_output=True, check=True)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        subprocess.run(["mcopy", "-i", str(volume), str(tmp_path / name), f"::/{name}"], check=True, env=env)
    return bytearray(volume.read_bytes())


def test_files_of_several_clusters(tmp_path: Path) -> None:
    big = bytes(range(256)) * 40  # 10 KiB: a chain of clusters
    volume = _volume(tmp_path, {"grub.cfg": b"set a=1\n", "big.bin": big})
    assert grubimage.fat_file(bytes(volume), "grub.cfg") == b"set a=1\n"
    assert grubimage.fat_file(bytes(volume), "big.bin") == big
    assert grubimage.fat_file(bytes(volume), "none.cfg") is None


def _first_cluster(volume: bytearray, short: bytes) -> tuple[int, int]:
    """(FAT offset, the file's first cluster)."""
    sector, reserved = int.from_bytes(volume[11:13], "little"), int.from_bytes(volume[14:16], "little")
    fats, entries, fat_sectors = (
        volume[16],
        int.from_bytes(volume[17:19], "little"),
        int.from_bytes(volume[22:24], "little"),
    )
    root = (reserved + fats * fat_sectors) * sector
    entry = next(e for e in range(root, root + entries * 32, 32) if volume[e : e + 11] == short)
    return reserved * sector, int.from_bytes(volume[entry + 26 : entry + 28], "little")


def test_a_looping_chain_ends(tmp_path: Path) -> None:
    volume = _volume(tmp_path, {"big.bin": bytes(10240)})
    fat, cluster = _first_cluster(volume, b"BIG     BIN")
    link = fat + cluster * 3 // 2
    pair = int.from_bytes(volume[link : link + 2], "little")
    pair = (pair & 0x000F) | (cluster << 4) if cluster & 1 else (pair & 0xF000) | cluster
    volume[link : link + 2] = pair.to_bytes(2, "little")  # the first cluster points at itself
    assert grubimage.fat_file(bytes(volume), "big.bin") is None


@pytest.mark.parametrize("cut", [0, 100, 511, 2048, 4096])
def test_a_truncated_volume(tmp_path: Path, cut: int) -> None:
    volume = _volume(tmp_path, {"grub.cfg": b"x" * 3000})
    assert grubimage.fat_file(bytes(volume[:cut]), "grub.cfg") is None


def test_not_a_fat_volume() -> None:
    assert grubimage.fat_file(bytes(4096), "grub.cfg") is None
