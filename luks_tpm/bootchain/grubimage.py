"""What a signed GRUB EFI image carries: its built-in modules (what `insmod` finds without reading a
file), its prefix, its built-in configuration (the memdisk's grub.cfg) and the Debian version its SBAT
names. Read from the image's `mods` and `.sbat` sections."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from . import pecoff
from .errors import PEFormatError

_MODULE_INFO_MAGIC = 0x676D696D  # "mimg"
_OBJ_ELF, _OBJ_MEMDISK, _OBJ_CONFIG, _OBJ_PREFIX = 0, 1, 2, 3


def _modname(elf: bytes) -> str | None:
    """The `.modname` section of a GRUB module (ELF64), or None."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64:
        return None
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    if entsize < 64 or shoff + entsize * count > len(elf) or names_index >= count:
        return None
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + entsize * i) for i in range(count)]
    names_offset = headers[names_index][4]
    for name, _type, _flags, _addr, offset, size in headers:
        end = elf.find(b"\0", names_offset + name)
        if elf[names_offset + name : end] == b".modname" and offset + size <= len(elf):
            return elf[offset : offset + size].split(b"\0", 1)[0].decode("ascii", "replace")
    return None


def _each_object(image: bytes) -> Iterator[tuple[int, bytes]]:
    """(kind, bytes) of each object in the image's module list, in order."""
    mods = pecoff.section_data(image, "mods")
    if mods is None or len(mods) < 24:
        raise PEFormatError("not a GRUB EFI image (no mods section)")
    magic, _pad, position, size = struct.unpack_from("<IIQQ", mods, 0)
    if magic != _MODULE_INFO_MAGIC or size > len(mods):
        raise PEFormatError("not a GRUB EFI image (bad module info header)")
    while position + 8 <= size:
        kind, length = struct.unpack_from("<II", mods, position)
        if length < 8 or position + length > size:
            raise PEFormatError("GRUB module list is damaged")
        yield kind, mods[position + 8 : position + length]
        position += length


def modules(image: bytes) -> tuple[frozenset[str], str | None]:
    """(names of the built-in modules, the built-in prefix) of a GRUB EFI image."""
    names, prefix = set(), None
    for kind, body in _each_object(image):
        if kind == _OBJ_ELF and (name := _modname(body)):
            names.add(name)
        elif kind == _OBJ_PREFIX:
            prefix = body.split(b"\0", 1)[0].decode("utf-8", "replace")
    return frozenset(names), prefix


# What Debian's signed GRUB runs first: its embedded config hands over to the memdisk's grub.cfg.
_DEBIAN_EMBEDDED_CONFIG = "normal (memdisk)/grub.cfg"


def fat_file(volume: bytes, name: str) -> bytes | None:
    """A file in the root directory of a FAT12 volume (what grub-mkimage's memdisk is), by its short name
    ("grub.cfg"); None when absent or when the volume is not such a FAT."""
    stem, _, extension = name.upper().partition(".")
    short = stem.ljust(8).encode("ascii") + extension.ljust(3).encode("ascii")
    if len(volume) < 512 or volume[510:512] != b"\x55\xaa":
        return None
    sector, per_cluster, reserved, fats, entries = struct.unpack_from("<HBHBH", volume, 11)
    fat_sectors = struct.unpack_from("<H", volume, 22)[0]
    if not (sector and per_cluster and fat_sectors):
        return None
    fat, root = reserved * sector, (reserved + fats * fat_sectors) * sector
    data, cluster_size = root + entries * 32, per_cluster * sector
    for entry in range(root, min(root + entries * 32, len(volume) - 31), 32):
        if volume[entry : entry + 11] != short or volume[entry + 11] & 0x18:  # a directory or volume label
            continue
        cluster, size = struct.unpack_from("<H", volume, entry + 26)[0], struct.unpack_from("<I", volume, entry + 28)[0]
        content, seen = bytearray(), set()
        while 2 <= cluster < 0xFF8 and len(content) < size and cluster not in seen:  # a damaged chain may loop
            seen.add(cluster)
            start, link = data + (cluster - 2) * cluster_size, fat + cluster * 3 // 2
            if link + 2 > len(volume):
                break
            content += volume[start : start + cluster_size]
            pair = struct.unpack_from("<H", volume, link)[0]
            cluster = pair >> 4 if cluster & 1 else pair & 0xFFF
        return bytes(content[:size]) if len(content) >= size and cluster not in seen else None
    return None


def _objects(image: bytes) -> dict[int, bytes]:
    objects: dict[int, bytes] = {}
    for kind, body in _each_object(image):
        objects.setdefault(kind, body)
    return objects


def memdisk(image: bytes) -> bytes | None:
    """The memdisk (a FAT volume) built into a GRUB image, or None."""
    return _objects(image).get(_OBJ_MEMDISK)


def builtin_config(image: bytes) -> str | None:
    """The script a Debian signed GRUB runs before any file is read: its memdisk's grub.cfg (which finds
    $prefix and sources $prefix/grub.cfg), or None when the image is not built that way."""
    objects = _objects(image)
    embedded = objects.get(_OBJ_CONFIG, b"").split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    if embedded != _DEBIAN_EMBEDDED_CONFIG or _OBJ_MEMDISK not in objects:
        return None
    script = fat_file(objects[_OBJ_MEMDISK], "grub.cfg")
    return script.decode("utf-8", "surrogateescape") if script is not None else None


def debian_version(image: bytes) -> str | None:
    """The Debian package version a signed GRUB names in its SBAT (`grub.debian,N,Debian,grub2,VERSION,...`)."""
    section = (pecoff.section_data(image, ".sbat") or b"").split(b"\0", 1)[0]
    for line in section.decode("utf-8", "replace").splitlines():
        fields = line.split(",")
        if len(fields) >= 5 and fields[0] == "grub.debian":
            return fields[4]
    return None
