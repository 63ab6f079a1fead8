"""Issue 21, class "every file-taking option and every file the tool reads": each against a FIFO, a socket,
/dev/zero, a directory, a huge (sparse) file and content that is not UTF-8.

The options are enumerated from the command line's own definitions (every option of every command whose
value is a path: a new one is tried without being listed here). The files luks-tpm reads by itself are
/etc/crypttab (status, wipe, open --all) and /etc/request-key.d/luks-tpm.conf (doctor): they are replaced
inside a mount namespace of the test's own (the machine's files are never touched), with bind mounts;
a directory cannot be bind-mounted over a file, so /etc/crypttab is tried as a directory through
--crypttab, which reads it with the same function.

Every input that is not a regular file of acceptable size is refused at once: exit 2, one line naming
the option or the file, nothing written, never a hang (each run is killed after 8 s) and never a
traceback; for doctor, its request-key check says what is wrong. Content that is not UTF-8 is bytes like
any other: key, PIN and authorization files are exact bytes (a PIN of such bytes is enrolled and then
unlocks), a crypttab's entries are kept as bytes and reported escaped; never exit 1, and --json is valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from luks_tpm.cli import main

from . import volumes
from .fixtures_luks import file_digest
from .fixtures_tpm import Swtpm
from .forked_cli import TIMEOUT, ForkedCli
from .json_schema import validate

NOT_UTF8 = b"\xff\xfe\x80caf\xe9"  # also the PIN of the volume's PIN token
HUGE = 3 << 30
KINDS = ("FIFO", "socket", "/dev/zero", "directory", "huge", "not UTF-8")


def path_options() -> list[tuple[str, str]]:
    """(command, option) for every option of every command whose value is a path."""
    return sorted(
        (name, param.opts[0])
        for name, command in main.commands.items()
        for param in command.params
        if isinstance(param, click.Option) and isinstance(param.type, click.Path)
    )


@dataclasses.dataclass(frozen=True)
class Setup:
    tcti: str
    work: Path
    volume: Path  # keyslot 0; token 0 derived, 1 sealed to PCR 7, 2 sealed with the PIN NOT_UTF8
    pristine: Path
    blank: Path
    passphrase: Path
    pin: Path
    kinds: dict[str, Path]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, module_swtpm: Swtpm, cli: ForkedCli) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("files")
    passphrase = volumes.passphrase_file(work)
    volume = volumes.luks_format(work / "volume.img", passphrase)
    pin = work / "pin"
    pin.write_bytes(NOT_UTF8)
    unlock: list[str | Path] = ["--unlock-key-file", passphrase]
    cli.run("enroll", volume, "--mode", "derived", *unlock, tcti=module_swtpm.tcti)
    cli.run("enroll", volume, "--mode", "sealed", "--pcrs", "7", *unlock, tcti=module_swtpm.tcti)
    cli.run("enroll", volume, "--mode", "sealed", "--pin-file", pin, *unlock, tcti=module_swtpm.tcti)
    kinds = work / "kinds"
    kinds.mkdir()
    os.mkfifo(kinds / "fifo")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(kinds / "socket"))
    listener.listen(1)
    with open(kinds / "huge", "wb") as huge:
        huge.truncate(HUGE)
    # not UTF-8, and a crypttab line too (an entry marked for luks-tpm whose device is such bytes)
    (kinds / "not-utf8").write_bytes(NOT_UTF8 + b" /dev/disk" + NOT_UTF8 + b" none luks,x-luks-tpm\n")
    paths = {
        "FIFO": kinds / "fifo",
        "socket": kinds / "socket",
        "/dev/zero": Path("/dev/zero"),
        "directory": kinds,
        "huge": kinds / "huge",
        "not UTF-8": kinds / "not-utf8",
    }
    try:
        yield Setup(
            module_swtpm.tcti, work, volume, volumes.copy_image(volume, work / "pristine.img"),
            work / "blank.img", passphrase, pin, paths,
        )  # fmt: skip
    finally:
        listener.close()


def argv(command: str, option: str, value: Path, s: Setup) -> list[str | Path]:
    """A command line right but for `option`, whose value is `value`."""
    unlock: list[str | Path] = [] if option == "--unlock-key-file" else ["--unlock-key-file", s.passphrase]
    lines: dict[str, list[str | Path]] = {
        "format": ["format", s.blank, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--yes"],
        "enroll": ["enroll", s.volume, "--mode", "sealed", *unlock],
        "load-key": ["load-key", s.volume, "--token-id", "2"],
        "open": ["open", "--all"] if option == "--crypttab" else ["open", s.volume, "data"],
        "reseal": ["reseal", s.volume, "--token-id", "2", *unlock]
        + ([] if option == "--new-pin-file" else ["--new-pin-file", s.pin]),
        "wipe": ["wipe", "--dry-run", s.volume],
        "persist-srk": ["persist-srk"],
        "rebind": ["rebind", s.volume],
    }
    if option == "--approver" and command in ("format", "enroll"):  # read only for a boot-chain binding
        lines[command] = [*lines[command], "--boot-chain"]
    return [*lines[command], option, value]


def _error_lines(stderr: str) -> list[str]:
    """The lines that say what is wrong: not click's usage banner, not hints, not blank."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("Usage:", "Try '", "luks-tpm: hint:"))
    ]


def _names(line: str, option: str) -> bool:
    name = option.lstrip("-")
    return name in line or name.replace("-", " ") in line or (option == "--unlock-key-file" and "key-file" in line)


def judge(what: str, kind: str, result: subprocess.CompletedProcess[str], option: str, allowed: set[int]) -> list[str]:
    if result.returncode == TIMEOUT:
        return [f"{what} {kind}: hung"]
    problems = []
    if "Traceback" in result.stderr or "internal error" in result.stdout + result.stderr:
        problems.append("a bug")
    if kind != "not UTF-8":
        lines = _error_lines(result.stderr)
        if result.returncode != 2:
            problems.append(f"exit {result.returncode}")
        elif not lines or not _names(lines[-1], option):
            problems.append(f"the error does not name {option}: {lines[-1:]}")
    elif result.returncode not in allowed:
        problems.append(f"exit {result.returncode}")
    return [f"{what} {kind}: {problem}: {result.stderr.strip()[-200:]!r}" for problem in problems]


SHORT = {"--pin-file", "--new-pin-file", "--owner-auth-file", "--lockout-auth-file"}
# Not UTF-8: what each option does with such bytes (besides: never exit 1).
NOT_UTF8_CODES = {
    "--passphrase-file": {0},  # a recovery passphrase of those bytes
    "--unlock-key-file": {0, 5},  # bytes that open no keyslot (reseal needs none: a token gives the key)
    "--pin-file": {0, 8},  # enroll: the PIN; load-key: the token's PIN, it unlocks; open: no device-mapper here
    "--new-pin-file": {0},
    "--owner-auth-file": {0},  # ignored with a warning: this TPM has no owner authorization
    "--lockout-auth-file": {0},  # likewise for the lockout authorization
    "--crypttab": {0, 8},  # wipe lists the entry (its device cannot be read); open --all: no device-mapper
    "--approver": {2},  # not an approver key file (the boot-chain commands say so, naming --approver)
    "--for-tpm": {2},  # not a provisioning file
}


def test_every_path_option_against_every_kind_of_file(setup: Setup, cli: ForkedCli) -> None:
    options = path_options()
    assert len(options) >= 14, options  # the enumeration works (and shrinks only if options go)
    failures: list[str] = []
    runs = [(command, option, kind) for command, option in options for kind in KINDS]
    for command, option, kind in runs:
        volumes.copy_image(setup.pristine, setup.volume)
        setup.blank.write_bytes(bytes(32 << 20))
        before = file_digest(setup.volume)
        short = kind == "not UTF-8" and option in SHORT  # bytes that fit a PIN or an authorization
        line = argv(command, option, setup.pin if short else setup.kinds[kind], setup)
        result = (
            cli.run("--json", *line, tcti=setup.tcti, expect=None, timeout=8)
            if kind == "not UTF-8"
            else (cli.run(*line, tcti=setup.tcti, expect=None, timeout=8))
        )
        what = f"{command} {option}"
        failures += judge(what, kind, result, option, NOT_UTF8_CODES[option])
        if kind == "not UTF-8" and result.returncode != TIMEOUT:
            data = json.loads(result.stdout)
            validate("error" if "error" in data else command, data)
        elif file_digest(setup.volume) != before:
            failures.append(f"{what} {kind}: changed the volume")
    summary = f"{len(runs)} runs ({len(options)} options x {len(KINDS)} kinds), {len(failures)} failed"
    print(summary)
    assert not failures, summary + ":\n" + "\n".join(failures)


def test_a_pin_of_bytes_that_are_not_utf8_unlocks(setup: Setup, cli: ForkedCli) -> None:
    """The PIN token was enrolled with NOT_UTF8: the same bytes unlock it, others do not."""
    volumes.copy_image(setup.pristine, setup.volume)
    assert cli.json("load-key", setup.volume, "--token-id", "2", "--pin-file", setup.pin, tcti=setup.tcti)["token"] == 2


# ---- the files luks-tpm reads by itself, replaced in a mount namespace of the test's own ----------------


def _own_namespace(pid: int) -> bool:
    """Whether process `pid` is in another mount namespace than this one (not the machine's)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    except OSError:
        return False


@contextlib.contextmanager
def namespace(work: Path) -> Iterator[ForkedCli]:
    """A fork server in a mount namespace of its own (private propagation: nothing leaks out). It is used
    only once it is seen to be in its own namespace: `unshare` creates it a moment after it starts, and a
    mount made before that would land on the machine."""
    runner = ForkedCli(work, prefix=["unshare", "--mount", "--propagation", "private"])
    try:
        deadline = time.monotonic() + 10
        while not _own_namespace(runner.pid):
            assert time.monotonic() < deadline, "the fork server did not get a mount namespace of its own"
            time.sleep(0.01)
        yield runner
    finally:
        runner.close()


def nsenter(runner: ForkedCli, *command: str | Path) -> None:
    """Run `command` (a mount) in the runner's namespace, and never in the machine's."""
    assert _own_namespace(runner.pid), "refusing to mount: the runner is not in a namespace of its own"
    enter = ["nsenter", "-t", str(runner.pid), "-m", "--", *map(str, command)]
    done = subprocess.run(enter, check=False, capture_output=True)
    assert done.returncode == 0, f"{' '.join(map(str, command))}: {done.stderr.decode(errors='replace')}"


def test_the_files_read_by_default(setup: Setup, tmp_path: Path) -> None:
    if os.geteuid() != 0 or subprocess.run(["unshare", "--mount", "true"], check=False).returncode != 0:
        pytest.skip("needs root and mount namespaces (unshare --mount)")
    conf_dir = tmp_path / "request-key.d"
    conf_dir.mkdir()
    failures: list[str] = []
    with namespace(tmp_path) as runner:
        nsenter(runner, "mount", "--bind", conf_dir, "/etc/request-key.d")
        for kind, path in setup.kinds.items():
            conf = conf_dir / "luks-tpm.conf"
            if kind == "directory":
                conf.mkdir()
            else:
                conf.touch()  # a mount point, in the namespace's /etc/request-key.d (conf_dir bound there)
                nsenter(runner, "mount", "--bind", path, "/etc/request-key.d/luks-tpm.conf")
                nsenter(runner, "mount", "--bind", path, "/etc/crypttab")
            try:
                failures += _default_files(runner, setup, kind)
            finally:
                if kind == "directory":
                    conf.rmdir()
                else:
                    nsenter(runner, "umount", "/etc/crypttab")
                    nsenter(runner, "umount", "/etc/request-key.d/luks-tpm.conf")
                    conf.unlink()
    assert Path("/etc/crypttab").is_file(), "the machine's crypttab was touched"
    assert not failures, "\n".join(failures)


def _default_files(runner: ForkedCli, s: Setup, kind: str) -> list[str]:
    failures: list[str] = []
    lines = {"status": ["status"], "wipe": ["wipe", "--dry-run"], "open --all": ["open", "--all"]}
    if kind != "directory":  # no directory can be bind-mounted over /etc/crypttab (see the docstring)
        for what, line in lines.items():
            result = runner.run(*line, tcti=s.tcti, expect=None, timeout=8)
            allowed = {0, 3, 5, 8}  # not UTF-8: an entry marked for luks-tpm whose device is not there
            failures += judge(what, kind, result, "crypttab", allowed)
    doctor = runner.run("--json", "doctor", tcti=s.tcti, expect=None, timeout=8)
    if doctor.returncode == TIMEOUT or "Traceback" in doctor.stderr:
        return [*failures, f"doctor with a {kind} request-key.conf: {doctor.stderr[-200:]}"]
    (check,) = [c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "request-key"]
    if check["ok"] or (kind != "not UTF-8" and "cannot read" not in check["detail"]):
        failures.append(f"doctor with a {kind} request-key.conf: {check}")
    return failures
