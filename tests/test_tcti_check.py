"""Issue 21, defect 1: a device TCTI whose path is not a TPM never gets a byte written into it.

`--tcti device:PATH` with PATH a disk image, a block device, a FIFO, /dev/null, a directory... is refused
with exit 2 before the TSS opens anything, wherever a TCTI comes from: the option (before and after the
command name, for every command that talks to the TPM), LUKS_TPM_TCTI, TPM2TOOLS_TCTI, the boot
scripts' fixed lines, request-key.conf's line (through the real upcall, and in doctor's check of the
conf), and every spelling the TSS's loader takes (device, libtss2-tcti-device.so.0, a full library
path, pcap's child). The target's bytes are compared before and after each run.

A real TPM character device cannot be made here (no TPM driver); that a character device of class tpm
or tpmrm *is* accepted is shown with a sysfs tree of the test's own, read by the same function
(`tcti.device_problem(path, sysfs)`): the one fake in this file, for a case this host cannot provoke.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luks_tpm import bootpass, crypttab
from luks_tpm.boundary import Console, Plain, run
from luks_tpm.doctor import request_key_check
from luks_tpm.errors import ExitCode, LuksTpmError
from luks_tpm.output import Report
from luks_tpm.prompt import pin_source
from luks_tpm.tpm import tcti

from . import volumes
from .fixtures_luks import file_digest
from .fixtures_tpm import Swtpm
from .fixtures_upcall import Refused, Upcall, received, request
from .forked_cli import ForkedCli
from .helpers import format_command, luks_tpm

DEVICE_LIBRARY = "/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0"
# What the refusal says: "TCTI '...': PATH is a regular file; the device TCTI would write TPM commands
# into it", or "... is the character device 1:3 of class mem, not a TPM; ..."
REFUSED = re.compile(r"TCTI '.*': .* is (a |the character device).*; the device TCTI would write TPM commands")


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Things that are not TPMs, each of which a mistyped --tcti could name."""
    image = volumes.luks_format(tmp_path / "disk with space.img", volumes.passphrase_file(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "socket"))
    (tmp_path / "link").symlink_to(image)
    found = {
        "LUKS image": image,
        "symlink to it": tmp_path / "link",
        "FIFO": fifo,
        "socket": tmp_path / "socket",
        "directory": tmp_path,
        "/dev/null": Path("/dev/null"),
        "/dev/zero": Path("/dev/zero"),
        "/dev/full": Path("/dev/full"),
    }
    try:
        yield found
    finally:
        listener.close()


def test_the_spellings_of_the_device_tcti() -> None:
    assert tcti.device_paths("device:/x/disk.img") == ["/x/disk.img"]
    assert tcti.device_paths("libtss2-tcti-device.so.0:/x") == ["/x"]
    assert tcti.device_paths("libtss2-tcti-device.so:/x:y") == ["/x:y"]
    assert tcti.device_paths(f"{DEVICE_LIBRARY}:/x") == ["/x"]
    assert tcti.device_paths("pcap:device:/x") == ["/x"]
    assert tcti.device_paths("libtss2-tcti-pcap.so.0:libtss2-tcti-device.so.0:/x") == ["/x"]
    assert tcti.device_paths("device") == tcti.device_paths("device:") == ["/dev/tpmrm0"]  # none here
    for other in ("swtpm:path=/x", "mssim:host=localhost,port=2321", "tabrmd:", "", ":/dev/sda", "devices:/x"):
        assert tcti.device_paths(other) == [], other


def test_what_is_refused_and_what_is_not(targets: dict[str, Path], tmp_path: Path) -> None:
    for kind, path in targets.items():
        problem = tcti.device_problem(str(path))
        assert problem is not None, f"{kind} was taken for a TPM"
        with pytest.raises(LuksTpmError) as caught:
            tcti.check(f"device:{path}")
        assert caught.value.code == ExitCode.USAGE and problem in caught.value.message, (kind, caught.value)
    assert tcti.device_problem(str(tmp_path / "missing")) is None  # the TSS fails to open it: nothing written
    # The fake sysfs: /dev/null's numbers, given the class a TPM's have.
    rdev = os.stat("/dev/null").st_rdev
    for kind in ("tpm", "tpmrm"):
        sysfs = tmp_path / f"sys-{kind}"
        node = sysfs / "dev" / "char" / f"{os.major(rdev)}:{os.minor(rdev)}"
        node.mkdir(parents=True)
        (sysfs / "class" / kind).mkdir(parents=True)
        (node / "subsystem").symlink_to(sysfs / "class" / kind)
        assert tcti.device_problem("/dev/null", sysfs) is None
        assert tcti.device_problem(str(targets["LUKS image"]), sysfs) == "a regular file"


def _lines(image: Path, blank: Path, passphrase: Path) -> dict[str, list[str | Path]]:
    return {
        "doctor": ["doctor"],
        "status": ["status", image],
        "load-key": ["load-key", image],
        "enroll": ["enroll", image, "--mode", "derived", "--unlock-key-file", passphrase],
        "format": [*format_command(blank, passphrase), "--yes"],
        "reseal": ["reseal", image, "--unlock-key-file", passphrase],
        "remove": ["remove", image, "--token-id", "0"],
        "persist-srk": ["persist-srk"],
        "wipe --dry-run": ["wipe", "--dry-run", image],
        "fence": ["fence"],
    }


def test_every_command_refuses_before_writing(
    targets: dict[str, Path], tmp_path: Path, cli: ForkedCli, swtpm: Swtpm
) -> None:
    """Each command that talks to the TPM, with --tcti before and after its name, and in each spelling."""
    image = targets["LUKS image"]
    passphrase = tmp_path / "passphrase"  # the image's (see `targets`)
    # two tokens, one bound to a PCR: remove and reseal then need the TPM too
    cli.run("enroll", image, "--mode", "derived", "--unlock-key-file", passphrase, tcti=swtpm.tcti)
    cli.run("enroll", image, "--mode", "sealed", "--pcrs", "7", "--unlock-key-file", passphrase, tcti=swtpm.tcti)
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(32 << 20))
    before = {path: file_digest(path) for path in (image, blank)}
    failures = []
    spellings = ["device:{}", "libtss2-tcti-device.so.0:{}", DEVICE_LIBRARY + ":{}", "pcap:device:{}"]
    runs: list[tuple[str, list[str | Path]]] = []
    for name, argv in _lines(image, blank, passphrase).items():
        for number, spelling in enumerate(spellings):
            target = image if number % 2 == 0 else targets["/dev/null"]
            option = ["--tcti", spelling.format(target)]
            line = [*option, *argv] if number < 2 else [argv[0], *option, *argv[1:]]
            runs.append((f"{name} {' '.join(map(str, option))}", line))
    results = cli.run_many([line for _, line in runs], tcti=None, parallel=2, timeout=30)
    for (what, _), result in zip(runs, results, strict=True):
        if result.returncode != 2 or not REFUSED.search(result.stderr):
            failures.append(f"{what}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
        if "Traceback" in result.stderr:
            failures.append(f"{what}: a traceback")
    after = {path: file_digest(path) for path in (image, blank)}
    assert after == before, "a refused TCTI changed a byte of the disk image"
    assert not failures, f"{len(failures)} of {len(runs)} runs:\n" + "\n".join(failures)


@pytest.mark.parametrize("variable", ["LUKS_TPM_TCTI", "TPM2TOOLS_TCTI"])
def test_the_environment_variables(variable: str, targets: dict[str, Path]) -> None:
    image = targets["LUKS image"]
    before = file_digest(image)
    for argv in (["doctor"], ["load-key", image], ["status", image]):
        result = luks_tpm(*argv, tcti=None, expect=2, env={variable: f"device:{image}"})
        assert REFUSED.search(result.stderr), result.stderr
    assert file_digest(image) == before


def test_the_boot_scripts_lines(targets: dict[str, Path], tmp_path: Path, cli: ForkedCli) -> None:
    """`--tcti X fence` runs as a fixed line; `open --all` too, and is run here through its activation
    seam (the host has no device-mapper, so the line itself stops at that, before the TPM)."""
    image = targets["LUKS image"]
    before = file_digest(image)
    fence = cli.run("--tcti", f"device:{image}", "fence", tcti=None, expect=2)
    assert REFUSED.search(fence.stderr), fence.stderr
    entries = [crypttab.Entry("data", str(image))]

    class Nothing:  # the activation seam (bootpass.Mapper): never reached here
        def open(self, *_: object) -> None:
            raise AssertionError("a volume was opened through a refused TCTI")

        def close(self, *_: object) -> None:
            pass

    def work() -> Report:
        return bootpass.open_all(f"device:{image}", entries, pin_source(None), mapper=Nothing())

    assert run(work, Console(Plain())) == 2
    assert file_digest(image) == before


def test_request_key_conf(
    targets: dict[str, Path], upcalls: Callable[..., Upcall], syslog_socket: socket.socket, tmp_path: Path
) -> None:
    """A conf line naming a disk: each upcall is negated, saying why, and the disk is untouched; doctor's
    check of the conf says so before any upcall."""
    image = targets["LUKS image"]
    before = file_digest(image)
    upcall = upcalls(f"device:{targets['symlink to it']}")  # request-key splits its lines at white space
    with pytest.raises(Refused):
        request("user", upcall.app("disk"), "32")
    [line] = received(syslog_socket, upcall.prefix)
    assert REFUSED.search(line), line
    assert file_digest(image) == before
    conf = tmp_path / "luks-tpm.conf"
    link = targets["symlink to it"]
    conf.write_text(f"create user luks-tpm:app:* * /bin/true --tcti device:{link} request-key %k %t %d %c %S\n")
    check = request_key_check(conf)
    assert not check.ok and REFUSED.search(check.detail), check


def test_a_missing_device_is_no_tpm_and_nothing_is_created(tmp_path: Path, cli: ForkedCli) -> None:
    missing = tmp_path / "tpm-that-is-not-there"
    result = cli.run("--tcti", f"device:{missing}", "doctor", tcti=None, expect=4)  # no TPM answered
    assert "BAD tpm" in result.stdout
    assert cli.run("--tcti", f"device:{missing}", "fence", tcti=None, expect=4).returncode == 4
    assert not missing.exists()
