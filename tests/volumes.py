"""Small LUKS2 volumes and header surgery for the hostile tests (issue 8).

Images are made by the real `cryptsetup` (small metadata and keyslot areas, PBKDF2 at 1000 iterations)
and copied sparsely, so a test can afford hundreds of them. Tokens are written with libcryptsetup
through `luks_tpm.cryptsetup`, as `cryptsetup token import` would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from luks_tpm import cryptsetup

PASSPHRASE = b"hostile test passphrase"


def run(
    *command: str | Path, stdin: bytes | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in command], input=stdin, capture_output=True, check=check, timeout=timeout)


def passphrase_file(directory: Path, content: bytes = PASSPHRASE) -> Path:
    path = directory / "passphrase"
    path.write_bytes(content)
    return path


def luks_format(
    image: Path,
    passphrase: Path,
    *,
    size: int = 4 << 20,
    uuid: str | None = None,
    volume_key_file: Path | None = None,
    metadata: str = "128k",
    keyslots: str = "1m",
    header: Path | None = None,
) -> Path:
    """A LUKS2 volume with one passphrase keyslot (0). `volume_key_file` chooses the key (512 bits)."""
    if not image.exists() or image.stat().st_size < size:
        with open(image, "ab") as handle:
            handle.truncate(size)
    command: list[str | Path] = [
        "cryptsetup",
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--luks2-metadata-size",
        metadata,
        "--luks2-keyslots-size",
        keyslots,
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        passphrase,
    ]
    if uuid:
        command += ["--uuid", uuid]
    if volume_key_file:
        command += ["--volume-key-file", volume_key_file, "--key-size", "512"]
    if header:
        command += ["--header", header]
    run(*command, image)
    return image


def copy_image(source: Path, target: Path) -> Path:
    run("cp", "--sparse=always", source, target)
    return target


def dump_volume_key(image: Path, passphrase: Path, key_file: Path) -> bytes:
    """The real volume key (for comparisons only; test data, never the product's)."""
    run(
        "cryptsetup",
        "luksDump",
        "--dump-volume-key",
        "--volume-key-file",
        key_file,
        "-q",
        "--key-file",
        passphrase,
        image,
    )
    return key_file.read_bytes()


def passphrase_opens(image: Path, passphrase: Path, header: Path | None = None) -> bool:
    extra: list[str | Path] = ["--header", header] if header else []
    result = run("cryptsetup", "open", "--test-passphrase", "--key-file", passphrase, *extra, image, check=False)
    return result.returncode == 0


def is_luks(image: Path) -> bool:
    return run("cryptsetup", "isLuks", image, check=False).returncode == 0


def tokens(image: Path) -> dict[int, dict[str, Any]]:
    """Every token's JSON, by id."""
    with cryptsetup.open_device(image, allow_detached=True) as device:
        found = {}
        for token_id, _kind in device.tokens():
            text = device.token_json_get(token_id)
            if text is not None:
                found[token_id] = json.loads(text)
        return found


def token_text(image: Path, token_id: int) -> str:
    with cryptsetup.open_device(image, allow_detached=True) as device:
        text = device.token_json_get(token_id)
    assert text is not None, f"{image} has no token {token_id}"
    return text


def set_token(image: Path, text: str, token_id: int | None = None) -> int | None:
    """Write a token (replacing `token_id`); None when libcryptsetup refuses it (its own validation)."""
    with cryptsetup.open_device(image, allow_detached=True) as device:
        if token_id is not None and device.token_json_get(token_id) is not None:
            device.token_remove(token_id)
        try:
            return device.token_json_set(text, cryptsetup.ANY_TOKEN if token_id is None else token_id)
        except cryptsetup.CryptsetupError:
            return None


def import_token(image: Path, text: str, header: Path | None = None) -> None:
    """`cryptsetup token import`, for headers luks-tpm's own binding refuses to open (detached ones)."""
    extra: list[str | Path] = ["--header", header] if header else []
    run("cryptsetup", "token", "import", *extra, image, stdin=text.encode())


def remove_token(image: Path, token_id: int) -> None:
    with cryptsetup.open_device(image, allow_detached=True) as device:
        device.token_remove(token_id)


def keyslots(image: Path) -> list[int]:
    with cryptsetup.open_device(image, allow_detached=True) as device:
        return device.keyslots()


def flush_tpm(tcti: str) -> None:
    """What a resource manager does when a client dies: flush its transient objects and sessions.
    swtpm on a socket has none, so a killed luks-tpm would otherwise leave the TPM full."""
    for kind in ("-t", "-l"):
        run("tpm2_flushcontext", "-T", tcti, kind, check=False)


def have(program: str) -> bool:
    return shutil.which(program) is not None
