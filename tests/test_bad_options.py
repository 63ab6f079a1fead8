"""Every option's bad value (issue 8, "Every option's bad value"): exit 2, one line naming the option,
the header byte-identical, no traceback, no hang.

The options are enumerated from `luks-tpm COMMAND --help` for every command; `BAD` must hold bad
values for each of them (a new option without any fails `test_every_option_has_bad_values`). Values:
empty, unreadable (a directory, a path through a file, a missing file), endless (/dev/zero) and
oversized key/PIN files; PINs longer than luks-tpm accepts (65 bytes, 1000 bytes); PCR lists
that are empty, out of range or not numbers; PCR values malformed or of another bank's size;
ciphers libcryptsetup does not know; keyrings that do not exist; token ids out of range or absent;
numbers past 2**32 and 2**64 (they must not reach ctypes). The global `--tcti` is checked apart:
an unusable TCTI is "no TPM" (exit 4) by the README, still in one line.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import volumes
from .fixtures_luks import file_digest
from .fixtures_tpm import Swtpm
from .forked_cli import ForkedCli

GIANT = str(2**64)


@dataclasses.dataclass(frozen=True)
class Setup:
    tcti: str
    volume: Path  # keyslot 0, a derived token 0, a sealed token 1 (PCR 7), a sealed+PIN token 2
    blank: Path  # for format
    files: dict[str, Path]


def _make_setup(work: Path, swtpm: Swtpm, cli: ForkedCli) -> Setup:
    passphrase = volumes.passphrase_file(work)
    volume = volumes.luks_format(work / "volume.img", passphrase)
    pin = work / "pin"
    pin.write_bytes(b"2468")
    cli.run("enroll", volume, "--mode", "derived", "--unlock-key-file", passphrase, tcti=swtpm.tcti)
    cli.run("enroll", volume, "--mode", "sealed", "--pcrs", "7", "--unlock-key-file", passphrase, tcti=swtpm.tcti)
    cli.run(
        "enroll",
        volume,
        "--mode",
        "sealed",
        "--pcrs",
        "7",
        "--pin-file",
        pin,
        "--unlock-key-file",
        passphrase,
        tcti=swtpm.tcti,
    )
    blank = work / "blank.img"
    with open(blank, "wb") as handle:
        handle.truncate(32 << 20)
    empty = work / "empty"
    empty.write_bytes(b"")
    big = work / "big"
    with open(big, "wb") as handle:
        handle.truncate(9 << 20)
    crypttab = work / "crypttab"
    crypttab.write_text("onlyaname\n")
    files = {
        "passphrase": passphrase,
        "pin": pin,
        "empty": empty,
        "big": big,
        "dir": work,
        "through-file": passphrase / "x",
        "missing": work / "missing",
        "zero": Path("/dev/zero"),
        "null": Path("/dev/null"),
        "crypttab-garbage": crypttab,
    }
    for length in (65, 1000):
        path = work / f"pin-{length}"
        path.write_bytes(b"7" * length)
        files[f"pin-{length}"] = path
    return Setup(swtpm.tcti, volume, blank, files)


@pytest.fixture(scope="module")
def setups(tmp_path_factory: pytest.TempPathFactory, cli: ForkedCli) -> Iterator[list[Setup]]:
    """Two of everything (TPM, volumes, files), so two commands can run at once on two cores."""
    started = []
    try:
        made = []
        for number in range(2):
            work = tmp_path_factory.mktemp(f"options-{number}")
            swtpm = Swtpm(work / "swtpm")
            swtpm.start()
            started.append(swtpm)
            made.append(_make_setup(work, swtpm, cli))
        yield made
    finally:
        for swtpm in started:
            swtpm.stop()


@pytest.fixture
def setup(setups: list[Setup]) -> Setup:
    return setups[0]


def _file_values(files: dict[str, Path], *names: str) -> list[tuple[str, str]]:
    return [(name, str(files[name])) for name in names]


def bad_values(s: Setup) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(command, option) -> [(label, bad value)]."""
    f = s.files
    unreadable = ("empty", "dir", "through-file", "missing", "zero", "big", "null")
    pcrs = [
        ("empty", ""),
        ("24", "24"),
        ("letter", "a"),
        ("-1", "-1"),
        ("trailing comma", "7,"),
        ("leading comma", ",7"),
        ("double comma", "7,,8"),
        ("space", "7 8"),
        ("2**64", GIANT),
        ("hex", "0x7"),
        ("range", "7-9"),
        ("100", "100"),
    ]
    sha256 = "ab" * 32
    pcr_values = [
        ("no value", "7"),
        ("empty value", "7="),
        ("no index", f"={sha256}"),
        ("not hex", "7=" + "zz" * 32),
        ("31 bytes", "7=" + "ab" * 31),
        ("33 bytes", "7=" + "ab" * 33),
        ("sha1 size", "7=" + "ab" * 20),
        ("index 24", f"24={sha256}"),
        ("index letter", f"a={sha256}"),
        ("index 2**64", f"{GIANT}={sha256}"),
        ("colon", f"7:{sha256}"),
        ("odd hex", "7=" + "a" * 63),
    ]
    token_ids = [("-1", "-1"), ("32", "32"), ("letter", "x"), ("2**64", GIANT), ("empty", "")]
    owner_auth_files = ("dir", "through-file", "missing", "zero", "big", "null")  # an empty one: the empty auth
    return {
        ("format", "--cipher"): [
            ("unknown", "foo-bar-plain64"),
            ("no mode", "aes"),
            ("empty", ""),
            ("unknown mode", "aes-nosuchmode-plain64"),
            ("extra part", "aes-xts-plain64-x"),
        ],
        ("format", "--key-size"): [("128", "128"), ("0", "0"), ("letter", "x")],
        ("format", "--sector-size"): [("513", "513"), ("0", "0")],
        # the binary header holds 48 bytes of label (cryptsetup takes 48 too)
        ("format", "--label"): [("49 bytes", "l" * 49), ("1000 bytes", "l" * 1000)],
        ("format", "--uuid"): [("not a uuid", "not-a-uuid"), ("empty", "")],
        ("format", "--passphrase-file"): _file_values(f, *unreadable),
        ("format", "--pbkdf"): [("unknown", "scrypt")],
        ("format", "--pcrs"): pcrs,
        ("format", "--pcr-bank"): [("sha512", "sha512"), ("empty", "")],
        ("format", "--pbkdf-force-iterations"): [
            ("0", "0"),
            ("-1", "-1"),
            ("2**32", str(2**32)),
            ("2**64", GIANT),
            ("letter", "x"),
        ],
        ("enroll", "--mode"): [("unknown", "other"), ("empty", "")],
        ("enroll", "--pcrs"): pcrs,
        ("enroll", "--pcr-bank"): [("sha512", "sha512"), ("empty", "")],
        ("enroll", "--pcr-value"): pcr_values,
        ("enroll", "--pin-file"): _file_values(f, *unreadable, "pin-65", "pin-1000"),
        ("enroll", "--unlock-key-file"): _file_values(f, *unreadable),
        ("load-key", "--keyring"): [
            ("unknown name", "@x"),
            ("empty", ""),
            ("0", "0"),
            ("negative", "-5"),
            ("absent serial", "123456789"),
            ("2**64", GIANT),
            ("at only", "@"),
        ],
        ("load-key", "--timeout"): [("0", "0"), ("-1", "-1"), ("letter", "x"), ("2**64", GIANT), ("2**32", str(2**32))],
        ("load-key", "--token-id"): [*token_ids, ("absent", "20")],
        ("load-key", "--pin-file"): _file_values(f, *unreadable, "pin-65"),
        ("open", "--crypttab"): _file_values(f, "missing", "dir", "through-file", "crypttab-garbage"),
        ("open", "--token-id"): token_ids,
        ("open", "--pin-file"): _file_values(f, "missing", "dir"),
        ("reseal", "--token-id"): [*token_ids, ("absent", "20"), ("a derived token", "0")],
        ("reseal", "--pcrs"): pcrs,
        ("reseal", "--pcr-bank"): [("sha512", "sha512"), ("empty", "")],
        ("reseal", "--pcr-value"): pcr_values,
        ("reseal", "--pin-file"): _file_values(f, *unreadable, "pin-65", "pin-1000"),
        ("reseal", "--new-pin-file"): _file_values(f, *unreadable, "pin-65", "pin-1000"),
        ("reseal", "--unlock-key-file"): _file_values(f, *unreadable),
        ("remove", "--token-id"): [*token_ids, ("absent", "20")],
        ("persist-srk", "--owner-auth-file"): _file_values(f, *owner_auth_files),
        ("enroll", "--owner-auth-file"): _file_values(f, *owner_auth_files),
        ("reseal", "--owner-auth-file"): _file_values(f, *owner_auth_files),
        ("format", "--approver"): _file_values(f, "dir"),
        ("enroll", "--approver"): _file_values(f, "dir"),
        ("enroll", "--for-tpm"): _file_values(f, *unreadable, "crypttab-garbage"),
        ("rebind", "--approver"): _file_values(f, "dir", "missing", "crypttab-garbage"),
        ("rebind", "--pcr-value"): pcr_values,
    }


# Options that take no value (flags), and --tcti, whose bad values are "no TPM" (exit 4, README) and
# are tried by test_unusable_tcti_is_no_tpm_in_one_line.
NO_BAD_VALUE = {
    "--help",
    "--passphrase",
    "--no-recovery",
    "--yes",
    "--pin",
    "--table",
    "--all",
    "--readonly",
    "--allow-discards",
    "--force",
    "--fence",
    "--boot-chain",
    "--approve-current",
    "--transient-srk",
    "--json",
    "--verbose",
    "--debug",
    "--batch-mode",
    "--tcti",
}
COMMANDS = [
    "format", "enroll", "load-key", "open", "status", "reseal", "remove", "doctor", "persist-srk", "predict", "rebind",
    "srk-public",
]  # fmt: skip


def base_argv(command: str, option: str, s: Setup) -> list[str | Path]:
    """A command line that is right except for `option`'s value."""
    f = s.files
    if command == "format":
        recovery: list[str | Path] = [] if option == "--passphrase-file" else ["--passphrase-file", f["passphrase"]]
        return ["format", s.blank, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--yes", *recovery]
    if command == "enroll":
        extra: list[str | Path] = [] if option == "--unlock-key-file" else ["--unlock-key-file", f["passphrase"]]
        mode = [] if option == "--mode" else ["--mode", "sealed"]
        return ["enroll", s.volume, *mode, *extra]
    if command == "load-key":
        return ["load-key", s.volume, *(["--token-id", "2"] if option == "--pin-file" else [])]
    if command == "open":
        return ["open", "--all"] if option == "--crypttab" else ["open", s.volume, "data"]
    if command == "reseal":
        extra = [] if option == "--unlock-key-file" else ["--unlock-key-file", f["passphrase"]]
        with_pin = option in {"--pin-file", "--new-pin-file"}
        token = [] if option == "--token-id" else ["--token-id", "2" if with_pin else "1"]
        pin: list[str | Path] = ["--pin-file", f["pin"]] if option == "--new-pin-file" else []
        return ["reseal", s.volume, *token, *pin, *extra]
    if command == "remove":
        return ["remove", s.volume]
    if command == "persist-srk":
        return ["persist-srk"]
    if command == "rebind":
        return ["rebind", s.volume]
    raise AssertionError(command)


def _error_lines(stderr: str) -> list[str]:
    """The lines that say what is wrong: not click's usage banner, not hints, not blank."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("Usage:", "Try '")) and not line.startswith("luks-tpm: hint:")
    ]


def _names(line: str, option: str, value: str) -> bool:
    """Whether the error line names the option: `--pin-file`, `pin-file` or `PIN file`."""
    low = line.lower()
    name = option.lstrip("-")
    return (
        name in low
        or name.replace("-", " ") in low
        or (option == "--token-id" and (f"token {value}" in low or f"id {value}" in low))
    )


def _options(help_text: str) -> list[str]:
    return re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", help_text, re.MULTILINE)


def test_every_option_has_bad_values(setup: Setup, cli: ForkedCli) -> None:
    table = bad_values(setup)
    missing = []
    for command in COMMANDS:
        shown = cli.run(command, "--help", tcti=None)
        for option in _options(shown.stdout):
            if option not in NO_BAD_VALUE and (command, option) not in table:
                missing.append(f"{command} {option}")
    assert not missing, f"options without bad values to try: {missing}"


def test_bad_option_values_exit_2_in_one_line(setups: list[Setup], cli: ForkedCli) -> None:
    jobs: list[tuple[Setup, str, str, str, list[str | Path]]] = []
    tables = [bad_values(lane) for lane in setups]
    for (command, option), values in tables[0].items():
        for index in range(len(values)):
            lane = setups[len(jobs) % len(setups)]
            label, value = tables[setups.index(lane)][command, option][index]
            jobs.append((lane, command, option, label, [*base_argv(command, option, lane), option, value]))
    options = len(bad_values(setups[0]))
    paths = [path for lane in setups for path in (lane.volume, lane.blank)]
    pristine = {path: volumes.copy_image(path, path.with_suffix(".pristine")) for path in paths}
    before = {path: file_digest(path) for path in paths}
    failures: list[str] = []
    tried = 0
    by_lane = [[job for job in jobs if job[0] is lane] for lane in setups]
    for step in range(max(len(x) for x in by_lane)):
        batch = [x[step] for x in by_lane if step < len(x)]
        results = cli.run_many(
            [["--tcti", lane.tcti, *argv] for lane, *_, argv in batch], tcti=None, parallel=len(batch), timeout=20
        )
        for (lane, command, option, label, argv), result in zip(batch, results, strict=True):
            tried += 1
            what = f"{command} {option} {label}"
            # progress lines may come first; the error is the last line that is not a hint
            lines = _error_lines(result.stderr)
            if result.returncode != 2:
                failures.append(f"{what}: exit {result.returncode}: {(lines or ['(no message)'])[-1][:160]}")
            elif "Traceback" in result.stderr or not lines:
                failures.append(f"{what}: no one-line error: {result.stderr!r:.300}")
            elif not _names(lines[-1], option, argv[-1] if isinstance(argv[-1], str) else ""):
                failures.append(f"{what}: the message does not name {option}: {lines[-1][:160]}")
            for path in (lane.volume, lane.blank):
                if file_digest(path) != before[path]:
                    failures.append(f"{what}: changed {path.name}")
                    volumes.copy_image(pristine[path], path)
    summary = f"{tried} bad option values tried over {options} options, {len(failures)} failed"
    print(summary)
    assert not failures, summary + ":\n" + "\n".join(sorted(failures))


@pytest.mark.parametrize(
    "tcti",
    [
        "nosuchmodule:",
        "",
        "device:/nonexistent/tpm",
        "swtpm:path=/nonexistent",
        "swtpm:port=notaport",
        "mssim:host=127.0.0.1,port=1",
    ],
)
def test_unusable_tcti_is_no_tpm_in_one_line(tcti: str, setup: Setup, cli: ForkedCli) -> None:
    result = cli.run("--tcti", tcti, "load-key", setup.volume, tcti=None, expect=None, timeout=20)
    lines = _error_lines(result.stderr)
    assert result.returncode in (2, 4), f"--tcti {tcti!r}: exit {result.returncode}: {result.stderr}"
    assert lines and "Traceback" not in result.stderr, result.stderr
    assert "TCTI" in lines[-1] or "--tcti" in lines[-1] or "TPM" in lines[-1], lines[-1]


def test_contradicting_options_exit_2(setup: Setup, cli: ForkedCli) -> None:
    f = setup.files
    cases: list[list[str | Path]] = [
        ["format", setup.blank, "--passphrase-file", f["passphrase"], "--no-recovery", "--yes"],
        ["format", setup.blank, "--passphrase", "--no-recovery", "--yes"],
        ["enroll", setup.volume, "--mode", "derived", "--pin-file", f["pin"], "--unlock-key-file", f["passphrase"]],
        [
            "enroll",
            setup.volume,
            "--mode",
            "sealed",
            "--pcr-bank",
            "sha1",
            "--pcr-value",
            "7=" + "ab" * 32,
            "--unlock-key-file",
            f["passphrase"],
        ],
        ["open", "--all", setup.volume],
        ["open", setup.volume],
    ]
    pristine = volumes.copy_image(setup.volume, setup.volume.with_suffix(".before-contradictions"))
    before = file_digest(setup.volume)
    failures = []
    for argv in cases:
        result = cli.run(*argv, tcti=setup.tcti, expect=None)
        if result.returncode != 2 or not _error_lines(result.stderr) or "Traceback" in result.stderr:
            failures.append(f"{' '.join(map(str, argv))}: exit {result.returncode}: {result.stderr!r:.200}")
        if file_digest(setup.volume) != before:
            failures.append(f"{' '.join(map(str, argv))}: changed the header")
            volumes.copy_image(pristine, setup.volume)
    assert not failures, "\n".join(failures)
