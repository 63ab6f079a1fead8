"""Every kind of path a user can pass (issue 8, "Every kind of path").

For each kind (regular image, a symlink to one, a LUKS2 block device on a loop device, a FIFO, a
Unix socket, /dev/null, /dev/zero, a directory, a dangling symlink, a detached LUKS2 header and the
data file it describes), `format`, `enroll`, `load-key --table`, `status`, `reseal` and `remove` are
run with a timeout. None may hang, crash or print more than one error line; paths that are not a
LUKS2 volume are refused with exit 2 or 3 (8 for an unsupported detached header); real volumes work.
A detached header is refused with a message that says so (or supported: commands that work on the
header alone may succeed), and `load-key --table` never prints a dm table whose data device is the
header file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import volumes
from .fixtures_tpm import Swtpm
from .forked_cli import TIMEOUT, ForkedCli
from .helpers import format_command

TIMEOUT_S = 8  # every refusal here is immediate; a hang is a bug
NOT_A_VOLUME = {2, 3}


def _error_lines(stderr: str, stdout: str = "") -> list[str]:
    """The error's words: lines on stderr, or with --json the error object on stdout."""
    lines = [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("Usage:", "Try '")) and not line.startswith("luks-tpm: hint:")
    ]
    try:
        error = json.loads(stdout).get("error") if stdout.strip() else None
    except ValueError:
        error = None
    return lines + ([str(error["message"])] if isinstance(error, dict) and error.get("message") else [])


def commands(path: Path, passphrase: Path) -> dict[str, list[str | Path]]:
    return {
        "format": [*format_command(path, passphrase), "--yes"],
        "enroll": ["enroll", path, "--mode", "derived", "--unlock-key-file", passphrase],
        "load-key": ["load-key", path, "--table"],
        "status": ["status", path],
        "reseal": ["reseal", path, "--unlock-key-file", passphrase],
        "remove": ["remove", path, "--token-id", "0"],
    }


def _check_refused(
    kind: str,
    path: Path,
    passphrase: Path,
    cli: ForkedCli,
    tcti: str,
    allowed: set[int] = NOT_A_VOLUME,
    words: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
) -> list[str]:
    failures = []
    chosen = {name: argv for name, argv in commands(path, passphrase).items() if name not in skip}
    # refused paths never get as far as the TPM, so the commands may run side by side
    results = cli.run_many(list(chosen.values()), tcti=tcti, parallel=3, timeout=TIMEOUT_S)
    for name, result in zip(chosen, results, strict=True):
        lines = _error_lines(result.stderr, result.stdout)
        if result.returncode == TIMEOUT:
            failures.append(f"{kind}: {name} hung (killed after {TIMEOUT_S} s)")
        elif result.returncode not in allowed:
            failures.append(
                f"{kind}: {name}: exit {result.returncode} (allowed {sorted(allowed)}): "
                f"{(lines or [result.stdout.strip()])[-1][:200]}"
            )
        elif "Traceback" in result.stderr or not lines:
            failures.append(f"{kind}: {name}: no clear error line: {result.stderr!r:.200}")
        elif words and not any(w in lines[-1].lower() for w in words):
            failures.append(f"{kind}: {name}: the message does not say {' or '.join(words)}: {lines[-1][:200]}")
    return failures


@pytest.fixture
def tpm(module_swtpm: Swtpm) -> Swtpm:
    return module_swtpm


def _works_everywhere(path: Path, passphrase: Path, cli: ForkedCli, tcti: str, data_device: str) -> None:
    """format, enroll, load-key --table, status, reseal (refused: no sealed token), remove on a real volume."""
    formatted = cli.json(*format_command(path, passphrase), "--yes", tcti=tcti)
    assert formatted["recovery_keyslot"] is not None
    enrolled = cli.json("enroll", path, "--mode", "sealed", "--unlock-key-file", passphrase, tcti=tcti)["token"]
    loaded = cli.json("load-key", path, "--table", tcti=tcti)
    assert f" {data_device} " in loaded["table"], loaded["table"]
    assert cli.run("status", path, tcti=tcti).returncode == 0
    resealed = cli.json("reseal", path, "--token-id", str(enrolled), "--unlock-key-file", passphrase, tcti=tcti)
    cli.run("remove", path, "--token-id", str(resealed["token"]), tcti=tcti)
    assert volumes.passphrase_opens(path, passphrase)


def test_regular_image_and_a_symlink_to_it(tmp_path: Path, tpm: Swtpm, passphrase: Path, cli: ForkedCli) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(32 << 20)
    _works_everywhere(image, passphrase, cli, tpm.tcti, str(image))
    link = tmp_path / "link.img"
    link.symlink_to(image)
    loaded = cli.json("load-key", link, "--table", tcti=tpm.tcti)
    assert loaded["table"], loaded


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[Path]:
    try:
        made = subprocess.run(
            ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"losetup cannot attach a loop device here: {error}")
    if made.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {made.stderr.strip()}")
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False, capture_output=True)


def test_luks2_on_a_loop_block_device(tmp_path: Path, tpm: Swtpm, passphrase: Path, cli: ForkedCli) -> None:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    image = tmp_path / "backing.img"
    with open(image, "wb") as handle:
        handle.truncate(32 << 20)
    with loop_device(image) as device:
        rdev = os.stat(device).st_rdev  # a table names a block device by MAJOR:MINOR (no path to split)
        _works_everywhere(device, passphrase, cli, tpm.tcti, f"{os.major(rdev)}:{os.minor(rdev)}")


def test_fifo_socket_char_devices_directory_dangling_link(
    tmp_path: Path, tpm: Swtpm, passphrase: Path, cli: ForkedCli
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "socket"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    kinds = {
        "FIFO": fifo,
        "socket": sock_path,
        "/dev/null": Path("/dev/null"),
        "/dev/zero": Path("/dev/zero"),
        "directory": tmp_path,
        "dangling symlink": dangling,
    }
    failures: list[str] = []
    try:
        for kind, path in kinds.items():
            failures += _check_refused(kind, path, passphrase, cli, tpm.tcti)
    finally:
        listener.close()
    assert not dangling.exists() and not (tmp_path / "nowhere").exists(), "a command created the link's target"
    assert not failures, f"{len(kinds)} kinds x 6 commands, {len(failures)} failed:\n" + "\n".join(failures)


def test_detached_header_is_refused_or_supported(tmp_path: Path, tpm: Swtpm, passphrase: Path, cli: ForkedCli) -> None:
    # a detached header (cryptsetup --header) holding a real derived token: the key of a luks-tpm format
    formatted = tmp_path / "formatted.img"
    with open(formatted, "wb") as handle:
        handle.truncate(32 << 20)
    made = cli.json(*format_command(formatted, passphrase), tcti=tpm.tcti)
    token = volumes.token_text(formatted, made["token"])
    key_file = tmp_path / "key"
    volumes.dump_volume_key(formatted, passphrase, key_file)
    header = tmp_path / "header.img"
    data = tmp_path / "data.img"
    with open(data, "wb") as handle:
        handle.truncate(8 << 20)
    with open(header, "wb") as handle:
        handle.truncate(4 << 20)
    volumes.luks_format(data, passphrase, uuid=made["uuid"], volume_key_file=key_file, header=header)
    key_file.unlink()
    volumes.import_token(data, token, header=header)
    assert volumes.passphrase_opens(data, passphrase, header=header)

    failures = []
    table = cli.run("--json", "load-key", header, "--table", tcti=tpm.tcti, expect=None, timeout=TIMEOUT_S)
    if table.returncode == 0 and f" {header} " in table.stdout:
        failures.append(
            f"load-key --table on the detached header printed a dm table over the header file: "
            f"{table.stdout.strip()[:300]}"
        )
    for name, argv in commands(header, passphrase).items():
        if name == "format":
            continue  # formatting over it is what --yes asks for
        result = cli.run(*argv, tcti=tpm.tcti, expect=None, timeout=TIMEOUT_S)
        lines = _error_lines(result.stderr, result.stdout)
        if result.returncode in {TIMEOUT, 1} or "Traceback" in result.stderr:
            failures.append(f"detached header: {name}: exit {result.returncode}: {result.stderr[-200:]!r}")
        elif result.returncode != 0 and not any("detached" in line.lower() for line in lines):
            failures.append(
                f"detached header: {name}: exit {result.returncode} without saying it is a detached "
                f"header: {(lines or ['(nothing)'])[-1][:200]}"
            )
    # the data file without its header is not a LUKS volume
    failures += _check_refused(
        "data of a detached header",
        data,
        passphrase,
        cli,
        tpm.tcti,
        allowed={2, 3},
        words=("luks", "header"),
        skip=("format",),
    )
    assert not failures, "\n".join(failures)


# ---- issue 21, defect 17: the dm table is one that dmsetup can read ---------------------------------------


def _fields(table: str) -> list[str]:
    """A crypt table line split as dmsetup splits it: start, length, target, cipher, key, iv offset,
    device, offset (and optional arguments)."""
    return table.split()


def test_table_of_an_image_whose_path_has_a_space(tmp_path: Path, tpm: Swtpm, passphrase: Path, cli: ForkedCli) -> None:
    """Refused for that device (exit 2, saying what to do) before its key is recovered; another device on
    the same line still gets its key and table; without --table the same image loads."""
    spaced = tmp_path / "my disk.img"
    plain = tmp_path / "plain.img"
    for image in (spaced, plain):
        with open(image, "wb") as handle:
            handle.truncate(32 << 20)
        cli.json(*format_command(image, passphrase), "--yes", tcti=tpm.tcti)
    error = cli.json("load-key", spaced, "--table", tcti=tpm.tcti, expect=2)["error"]
    assert "--table" in error["message"] and "losetup" in error["hint"], error
    both = cli.json("load-key", spaced, plain, "--table", tcti=tpm.tcti, expect=2)["volumes"]
    assert both[0]["error"]["code"] == 2 and "serial" not in both[0], both
    fields = _fields(both[1]["table"])
    assert len(fields) == 8 and fields[6] == str(plain), fields
    assert "serial" in cli.json("load-key", spaced, tcti=tpm.tcti)


def test_table_of_a_block_device_names_it_by_number(
    tmp_path: Path, tpm: Swtpm, passphrase: Path, cli: ForkedCli
) -> None:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    image = tmp_path / "backing file.img"  # a space in the backing file's name matters no more
    with open(image, "wb") as handle:
        handle.truncate(32 << 20)
    with loop_device(image) as device:
        cli.json(*format_command(device, passphrase), "--yes", tcti=tpm.tcti)
        fields = _fields(cli.json("load-key", device, "--table", tcti=tpm.tcti)["table"])
        rdev = os.stat(device).st_rdev
        assert len(fields) == 8 and fields[6] == f"{os.major(rdev)}:{os.minor(rdev)}", fields
