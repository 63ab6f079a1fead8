"""The bootchain lab's initramfs, built reproducibly from Debian packages (test helper and lab tool).

The lab boots (OVMF + shim + GRUB + kernel under swtpm) need an initramfs that prints the PCRs and the
event log; the tests need the very same bytes again to recompute what GRUB measured (PCR 9), without
committing a binary. So it is made from pinned inputs only: busybox from the busybox-static package,
efivarfs.ko from the kernel package, the text below; cpio "newc" with fixed metadata, gzip through zlib
with mtime 0. Usage (lab): python3 bootchain_initrd.py BUSYBOX EFIVARFS_KO TAG OUT
"""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t securityfs securityfs /sys/kernel/security
echo "LAB-INIT uptime=$(cut -d' ' -f1 /proc/uptime) tag=$(cat /etc/lab-tag)"
insmod /lib/modules/efivarfs.ko && mount -t efivarfs efivarfs /sys/firmware/efi/efivars
echo "LAB-UNAME $(uname -r)"
echo "LAB-CMDLINE $(cat /proc/cmdline)"
for v in SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c SbatLevelRT-605dab50-e046-4300-abb6-3dd810dd8b23; do
    f=/sys/firmware/efi/efivars/$v
    if [ -e "$f" ]; then echo "LAB-EFIVAR $v $(od -An -tx1 "$f" | tr -d '\\n' | head -c 200)"; fi
done
echo "LAB-LOCKDOWN $(cat /sys/kernel/security/lockdown 2>&1)"
for bank in sha1 sha256 sha384 sha512; do
    [ -d /sys/class/tpm/tpm0/pcr-$bank ] || continue
    i=0
    while [ $i -le 23 ]; do
        echo "LAB-PCR $bank $i $(cat /sys/class/tpm/tpm0/pcr-$bank/$i)"
        i=$((i+1))
    done
done
log=/sys/kernel/security/tpm0/binary_bios_measurements
if [ -e $log ]; then
    cat $log >/tmp/evlog
    echo "LAB-EVENTLOG-BEGIN"
    gzip -9 -c /tmp/evlog | base64
    echo "LAB-EVENTLOG-END"
fi
echo "LAB-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"""
APPLETS = [
    "sh",
    "mount",
    "cat",
    "echo",
    "ls",
    "insmod",
    "grep",
    "sed",
    "od",
    "base64",
    "gzip",
    "poweroff",
    "cut",
    "head",
    "tr",
    "uname",
]
DIRS = ("bin", "dev", "etc", "lib", "lib/modules", "proc", "run", "sys", "tmp")


def _entry(out: io.BytesIO, ino: int, name: str, mode: int, data: bytes) -> None:
    fields = (ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
    out.write(b"\0" * (-(110 + len(name) + 1) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def build(busybox: bytes, efivarfs: bytes, tag: str) -> bytes:
    """The gzip'ed cpio image (the same bytes for the same inputs, on any machine)."""
    entries: list[tuple[str, int, bytes]] = [(d, 0o040755, b"") for d in DIRS]
    entries += [("bin/busybox", 0o100755, busybox), ("etc/lab-tag", 0o100644, tag.encode() + b"\n")]
    entries += [(f"bin/{a}", 0o120777, b"busybox") for a in APPLETS]
    entries += [("init", 0o100755, INIT.encode()), ("lib/modules/efivarfs.ko", 0o100644, efivarfs)]
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate(sorted(entries), start=1):
        _entry(out, ino, name, mode, data)
    _entry(out, 0, "TRAILER!!!", 0, b"")
    return gzip.compress(out.getvalue(), compresslevel=9, mtime=0)


if __name__ == "__main__":
    busybox_path, module_path, lab_tag, target = sys.argv[1:5]
    Path(target).write_bytes(build(Path(busybox_path).read_bytes(), Path(module_path).read_bytes(), lab_tag))
