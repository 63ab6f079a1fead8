"""What a signed GRUB EFI image carries: its built-in modules (what `insmod` finds without reading a
file) and its prefix. Read from the image's `mods` section."""

from __future__ import annotations

import struct

from . import pecoff
from .errors import PEFormatError

_MODULE_INFO_MAGIC = 0x676D696D  # "mimg"
_OBJ_ELF, _OBJ_PREFIX = 0, 3


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


def modules(image: bytes) -> tuple[frozenset[str], str | None]:
    """(names of the built-in modules, the built-in prefix) of a GRUB EFI image."""
    mods = pecoff.section_data(image, "mods")
    if mods is None or len(mods) < 24:
        raise PEFormatError("not a GRUB EFI image (no mods section)")
    magic, _pad, offset, size = struct.unpack_from("<IIQQ", mods, 0)
    if magic != _MODULE_INFO_MAGIC or size > len(mods):
        raise PEFormatError("not a GRUB EFI image (bad module info header)")
    names, prefix = set(), None
    position = offset
    while position + 8 <= size:
        kind, length = struct.unpack_from("<II", mods, position)
        if length < 8 or position + length > size:
            raise PEFormatError("GRUB module list is damaged")
        body = mods[position + 8 : position + length]
        if kind == _OBJ_ELF and (name := _modname(body)):
            names.add(name)
        elif kind == _OBJ_PREFIX:
            prefix = body.split(b"\0", 1)[0].decode("utf-8", "replace")
        position += length
    return frozenset(names), prefix
