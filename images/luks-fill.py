"""luks-fill DISK VOLUME_KEY_FILE FS_IMAGE: write FS_IMAGE, encrypted, into DISK's LUKS2 data segment.

Why: the host has no device-mapper, so it cannot open the volume to put a filesystem in it. With the
volume key (dumped with cryptsetup from a passphrase keyslot) we encrypt exactly as dm-crypt would
(aes-xts-plain64, the segment's sector size) in userspace. The guest mounting it is the proof.
"""

import json
import subprocess
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def main() -> None:
    disk, key_file, image = sys.argv[1:4]
    meta = json.loads(
        subprocess.run(
            ["cryptsetup", "luksDump", "--dump-json-metadata", disk], check=True, capture_output=True, text=True
        ).stdout
    )
    segment = meta["segments"]["0"]
    if segment["encryption"] != "aes-xts-plain64" or int(segment.get("iv_tweak", "0")) != 0:
        sys.exit(f"luks-fill: unsupported segment {segment}")
    offset, sector = int(segment["offset"]), int(segment["sector_size"])
    with open(key_file, "rb") as f:
        key = f.read()
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(offset)
        index = 0
        while block := src.read(sector):
            block = block.ljust(sector, b"\0")
            # plain64 IV: the sector number, little endian; with 4096-byte sectors LUKS2 uses
            # iv_large_sectors, so it counts sectors of that size.
            tweak = index.to_bytes(16, "little")
            encryptor = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
            dst.write(encryptor.update(block) + encryptor.finalize())
            index += 1


if __name__ == "__main__":
    main()
