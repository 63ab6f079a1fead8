"""crypttab parsing and device resolution (pure file logic, on pyfakefs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from luks_tpm import crypttab
from luks_tpm.errors import LuksTpmError

TAB = """\
# <name> <device> <key file> <options>
root   UUID=0f6e4a2c-8d1b-4c7e-9a55-3b2d1e0f9c88  none  luks,discard,x-luks-tpm
data   /dev/vdb                                    none  luks,x-luks-tpm,readonly   # trailing comment
swap   /dev/vdc                                    /dev/urandom swap
"""


def test_only_marked_entries_with_their_options() -> None:
    entries = crypttab.parse(TAB)
    assert [(e.name, e.device, e.discard, e.readonly) for e in entries] == [
        ("root", "UUID=0f6e4a2c-8d1b-4c7e-9a55-3b2d1e0f9c88", True, False),
        ("data", "/dev/vdb", False, True),
    ]
    assert [e.name for e in crypttab.parse(TAB, only_marked=False)] == ["root", "data", "swap"]


def test_malformed_line_is_a_usage_error() -> None:
    with pytest.raises(LuksTpmError, match="line 2"):
        crypttab.parse("ok /dev/vda none x-luks-tpm\nlonely\n")


def _luks_header(uuid: str) -> bytes:
    header = bytearray(4096)
    header[:6] = b"LUKS\xba\xbe"
    header[0xA8 : 0xA8 + len(uuid)] = uuid.encode()
    return bytes(header)


def test_uuid_through_udev_link_or_header_scan(fs: FakeFilesystem) -> None:
    uuid = "0f6e4a2c-8d1b-4c7e-9a55-3b2d1e0f9c88"
    entry = crypttab.parse(TAB)[0]
    # a minimal initramfs without udev: found by reading LUKS headers of the block devices
    fs.create_file("/dev/vda", contents=b"\0" * 4096)
    fs.create_file("/dev/vdb", contents=_luks_header(uuid))
    for name in ("vda", "vdb"):
        fs.create_dir(f"/sys/class/block/{name}")
    assert crypttab.resolve(entry).device == "/dev/vdb"
    # with udev, its by-uuid link wins
    fs.create_symlink(f"/dev/disk/by-uuid/{uuid}", "/dev/vdb")
    assert crypttab.resolve(entry).device == f"/dev/disk/by-uuid/{uuid}"


def test_unknown_uuid_is_reported(fs: FakeFilesystem) -> None:
    fs.create_dir("/sys/class/block")
    with pytest.raises(LuksTpmError, match="no device with UUID="):
        crypttab.resolve(crypttab.parse(TAB)[0])


def test_read_missing_file(fs: FakeFilesystem) -> None:
    with pytest.raises(LuksTpmError, match="cannot read"):
        crypttab.read(Path("/etc/crypttab"))
