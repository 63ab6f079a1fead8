"""The Debian package (make deb): its man page and completion agree with the command line, it holds
everything `make install` installs plus a self-contained runtime, and it installs, runs from an empty
environment, documents itself and purges without a trace on this very machine.

The install test really installs the package with apt-get (it needs root and apt), and purges it again
whatever happens; it takes a lock so that two test runs on one machine do not trip over each other.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from luks_tpm.errors import ExitCode

from .fixtures_tpm import Swtpm
from .helpers import REPO

PACKAGING = REPO / "packaging"
RUNTIME = "/usr/lib/luks-tpm/python"


def _clidoc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("packaging_clidoc", PACKAGING / "clidoc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


clidoc = _clidoc()


@functools.cache
def _help(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "luks_tpm", *args, "--help"], capture_output=True, text=True, check=True, cwd=REPO
    )
    return result.stdout


def _section(text: str, title: str) -> list[str]:
    """The lines of a --help section ("Options:", "Commands:")."""
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    return lines[start:end]


def _help_options(*command: str) -> set[str]:
    """Every option spelling `luks-tpm [COMMAND] --help` lists."""
    flags = set()
    for line in _section(_help(*command), "Options:"):
        spelled = re.match(r"^  (-\S.*?)(?: {2,}|$)", line)
        if spelled:
            flags |= set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", spelled[1]))
    return flags


def _help_commands() -> list[str]:
    return [m[1] for line in _section(_help(), "Commands:") if (m := re.match(r"^  (\S+)", line))]


def _plain(roff: str) -> str:
    """Roff source as the words a reader sees: escapes and font changes gone, blanks collapsed."""
    text = re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")
    text = "\n".join(line for line in text.splitlines() if not line.startswith((".TP", ".PP", ".nf", ".fi")))
    return _words(text)


def _words(text: str) -> str:
    # click wraps after a hyphen ("DA-\nprotected"); roff may too
    return re.sub(r"(?<=\w-) ", "", re.sub(r"\s+", " ", text))


@pytest.fixture(scope="module")
def manpage() -> str:
    page: str = clidoc.manpage((PACKAGING / "luks-tpm.8.in").read_text(), None, "2000-01-01")
    return page


def _man_sections(page: str, heading: str) -> dict[str, str]:
    """The man page's subsections under a .SH heading, by their first word (the command's name)."""
    body = page.split(f".SH {heading}\n", 1)[1].split("\n.SH ", 1)[0]
    parts = re.split(r'^\.SS "(\S+)[^\n]*\n', body, flags=re.MULTILINE)
    return {parts[i].replace("\\-", "-"): parts[i + 1] for i in range(1, len(parts), 2)}


# --- man page ------------------------------------------------------------------------------------------


def test_man_page_has_every_command_and_option_of_help(manpage: str) -> None:
    commands = _man_sections(manpage, "COMMANDS")
    assert sorted(commands) == sorted(_help_commands())
    for name, section in commands.items():
        documented = set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", _plain(section)))
        missing = _help_options(name) - documented - {"-h", "--help"}
        assert not missing, f"{name}: options in --help but not in the man page: {missing}"
    global_part = _plain(manpage.split(".SH GLOBAL OPTIONS\n", 1)[1].split("\n.SH ", 1)[0])
    missing = {f for f in _help_options() if f not in re.findall(r"--?[A-Za-z][\w-]*", global_part)}
    assert not missing, f"global options missing from the man page: {missing}"


def test_man_page_says_what_help_says(manpage: str) -> None:
    """Each option's help text reaches the man page word for word (escaping has not mangled it)."""
    plain = _plain(manpage)
    for command in ["", *_help_commands()]:
        lines = _section(_help(*filter(None, [command])), "Options:")
        records = re.split(r"\n(?=  -)", "\n".join(lines))
        for record in records:
            parts = re.split(r" {2,}", record.strip(), maxsplit=1)
            if len(parts) == 2 and parts[0] not in ("-h, --help",):
                words = _words(parts[1])
                assert words in plain, f"{command or 'global'} {parts[0]}: help text {words!r} not in the man page"


def test_man_page_documents_every_exit_code_and_the_crypttab_option(manpage: str) -> None:
    status = manpage.split(".SH EXIT STATUS\n", 1)[1].split("\n.SH ", 1)[0]
    for code in ExitCode:
        assert f".TP\n.B {int(code)}\n" in status, f"exit code {int(code)} ({code.name}) is not documented"
    for section in ("DESCRIPTION", "UNLOCKING AT BOOT", "ENVIRONMENT", "FILES", "EXAMPLES", "SECURITY"):
        assert f"\n.SH {section}\n" in manpage
    assert "x\\-luks\\-tpm" in manpage.split(".SH UNLOCKING AT BOOT\n", 1)[1]


def test_man_page_renders_without_warnings(manpage: str, tmp_path: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (man-db brings it; scripts/bootstrap installs it)")
    page = tmp_path / "luks-tpm.8"
    page.write_text(manpage)
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and not result.stderr, result.stderr


# --- bash completion -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def completion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = tmp_path_factory.mktemp("completion") / "luks-tpm"
    script.write_text(clidoc.completion())
    return script


def _complete(script: Path, line: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for TAB at the end of LINE, through the completion function as bash calls it."""
    driver = textwrap.dedent("""\
        source "$1"
        COMP_LINE=$2 COMP_POINT=${#2}
        read -r -a COMP_WORDS <<<"$COMP_LINE"
        [[ $COMP_LINE == *' ' ]] && COMP_WORDS+=("")
        COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
        _luks_tpm luks-tpm "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
        printf '%s\\n' "${COMPREPLY[@]}"
        """)
    result = subprocess.run(
        ["bash", "-c", driver, "complete", str(script), line],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
        env={"PATH": os.environ["PATH"]},
    )
    return [word for word in result.stdout.splitlines() if word]


def test_completion_offers_commands_and_their_options(completion: Path) -> None:
    assert _complete(completion, "luks-tpm ") == _help_commands()
    assert _complete(completion, "luks-tpm re") == [c for c in _help_commands() if c.startswith("re")]
    assert set(_complete(completion, "luks-tpm -")) == _help_options()
    for command in _help_commands():
        assert set(_complete(completion, f"luks-tpm {command} -")) == _help_options(command), command
    # global options (with their values) before the command do not hide it
    assert _complete(completion, "luks-tpm --tcti swtpm:path=/run/s.sock -v st") == ["status"]
    assert _complete(completion, "luks-tpm --json enroll --pcr-") == ["--pcr-bank", "--pcr-value"]


def test_completion_offers_option_values(completion: Path, tmp_path: Path) -> None:
    assert _complete(completion, "luks-tpm enroll /dev/sdb --mode ") == ["derived", "sealed"]
    assert _complete(completion, "luks-tpm format --key-size 2") == ["256"]
    (tmp_path / "pin.txt").write_bytes(b"1234")
    assert _complete(completion, "luks-tpm enroll --pin-file pi", cwd=tmp_path) == ["pin.txt"]
    assert _complete(completion, "luks-tpm --tcti ") == []  # a free-form value: nothing to guess
    # after a value, options again
    assert "--pcrs" in _complete(completion, "luks-tpm enroll --mode sealed --")


def test_completion_offers_devices_for_device_arguments(completion: Path, tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"")
    (tmp_path / "other").write_bytes(b"")
    assert _complete(completion, "luks-tpm status di", cwd=tmp_path) == ["disk.img"]
    assert _complete(completion, "luks-tpm status disk.img o", cwd=tmp_path) == ["other"]  # DEVICES...
    assert _complete(completion, "luks-tpm open disk.img ", cwd=tmp_path) == []  # NAME: free-form
    assert _complete(completion, "luks-tpm enroll --mode derived d", cwd=tmp_path) == ["disk.img"]


def test_completion_script_passes_shellcheck(completion: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/bootstrap installs it)")
    result = subprocess.run(["shellcheck", "-s", "bash", str(completion)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


# --- the package ---------------------------------------------------------------------------------------


def _needs(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the package needs {', '.join(missing)} (scripts/bootstrap installs them)")


@pytest.fixture(scope="module")
def deb() -> Path:
    """dist/luks-tpm_<version>_<arch>.deb, built now unless it is up to date (packaging/build-deb)."""
    _needs("dpkg-deb", "dpkg-shlibdeps", "gcc", "pkg-config")
    result = subprocess.run([str(PACKAGING / "build-deb")], capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return REPO / result.stdout.strip().splitlines()[-1]


def _contents(deb: Path) -> set[str]:
    """The package's files and symlinks (not its directories), as absolute paths."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    paths = set()
    for line in listing.splitlines():
        mode, *_, name = line.split(None, 5)
        if not mode.startswith("d"):
            paths.add("/" + name.split(" -> ", 1)[0].removeprefix("./"))
    return paths


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout


def test_package_holds_make_install_and_a_runtime_of_its_own(deb: Path, tmp_path: Path) -> None:
    contents = _contents(deb)
    subprocess.run(["make", "-s", "-C", str(REPO), "install", f"DESTDIR={tmp_path}", "PREFIX=/usr"], check=True)
    installed = {"/" + p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if not p.is_dir()}
    assert installed and installed <= contents, f"make install files not in the package: {installed - contents}"
    for path in (
        "/usr/sbin/luks-tpm",
        "/usr/share/man/man8/luks-tpm.8.gz",
        "/usr/share/bash-completion/completions/luks-tpm",
        "/usr/share/doc/luks-tpm/copyright",
        f"{RUNTIME}/luks_tpm/__main__.py",
        "/usr/share/doc/luks-tpm/changelog.gz",
    ):
        assert path in contents, path
    # byte-code is made by postinst (py3compile), as in any Debian Python package
    assert not [p for p in contents if p.endswith(".pyc")]
    assert not [p for p in contents if "-packages" in p], "nothing may go into a site-packages directory"
    assert f"{RUNTIME}/click/__init__.py" in contents
    assert [p for p in contents if re.fullmatch(rf"{RUNTIME}/_cffi_backend\..*so", p)], "cffi's backend"
    # tpm2-pytss's compiled ESYS binding alone: its Python layer would pull in cryptography (tpm/esys.py)
    binding = [p for p in contents if re.fullmatch(rf"{RUNTIME}/tpm2_pytss/_libtpm2_pytss\..*so", p)]
    assert binding and [p for p in contents if p.startswith(f"{RUNTIME}/tpm2_pytss/")] == binding
    assert not [p for p in contents if p.startswith((f"{RUNTIME}/cryptography", f"{RUNTIME}/cffi/"))]
    sources = {f"{RUNTIME}/{p.relative_to(REPO).as_posix()}" for p in (REPO / "luks_tpm").rglob("*.py")}
    assert sources <= contents, f"modules missing from the package: {sorted(sources - contents)}"


def test_package_declares_its_debian_dependencies_and_the_initramfs_trigger(deb: Path, tmp_path: Path) -> None:
    depends = {re.sub(r"\s*\(.*\)", "", d.strip()) for d in _field(deb, "Depends").split(",")}
    for package in (
        "python3",
        "libtss2-esys-3.0.2-0",
        "libtss2-tcti-device0",
        "libtss2-tctildr0",
        "libcryptsetup12",
        "libkeyutils1",
        "keyutils",
        "libc6",
    ):
        assert package in depends, f"Depends lacks {package}: {depends}"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")], check=True)
    triggers = (tmp_path / "control" / "triggers").read_text()
    assert re.search(r"^activate-noawait update-initramfs$", triggers, re.MULTILINE), triggers
    # shim and GRUB updates approve the next boot (docs/boot-chain.md), as do the kernel and initramfs hooks
    for watched in ("/usr/lib/shim", "/usr/lib/grub/x86_64-efi-signed"):
        assert re.search(rf"^interest-noawait {watched}$", triggers, re.MULTILINE), triggers
    assert "luks-tpm-rebind trigger" in (tmp_path / "control" / "postinst").read_text()
    for hook in (
        "/etc/kernel/postinst.d/zzz-luks-tpm",
        "/etc/kernel/postrm.d/zzz-luks-tpm",
        "/etc/initramfs/post-update.d/luks-tpm",
        "/lib/systemd/system/luks-tpm-rebind.service",
        "/lib/systemd/system/luks-tpm-rebind.path",
    ):
        assert hook in _contents(deb), hook
    conffiles = tmp_path / "control" / "conffiles"
    etc = {p for p in _contents(deb) if p.startswith("/etc/")}
    assert set(conffiles.read_text().split() if conffiles.exists() else []) == etc


def test_package_runtime_has_no_fapi(deb: Path, tmp_path: Path) -> None:
    """tpm2-pytss built without FAPI: FAPI drags curl, gnutls, krb5, ldap and p11-kit into the initramfs."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    modules = list((tmp_path / RUNTIME.lstrip("/") / "tpm2_pytss").glob("_libtpm2_pytss*.so"))
    assert len(modules) == 1
    needed = subprocess.run(["readelf", "-d", str(modules[0])], capture_output=True, text=True, check=True).stdout
    assert "libtss2-esys" in needed and "libtss2-fapi" not in needed, needed


# --- installed on this machine -------------------------------------------------------------------------

PROBE_CONTROL = """\
Package: luks-tpm-test-trigger-probe
Version: 1
Architecture: all
Maintainer: luks-tpm tests <tests@luks-tpm.invalid>
Description: records update-initramfs trigger runs (a luks-tpm test; purged again by it)
"""
PROBE_POSTINST = """\
#!/bin/sh
[ "$1" = triggered ] && echo "$2" >>{record}
exit 0
"""


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def _installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", package], capture_output=True, text=True, check=False
    )
    return result.returncode == 0 and "installed" in result.stdout.split()


@pytest.fixture
def machine_lock() -> Iterator[None]:
    """Root, apt, and no luks-tpm installed by someone else; one such test on the machine at a time."""
    if os.geteuid() != 0:
        pytest.skip("installing the package needs root")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("installing the package needs apt-get and dpkg (a Debian system)")
    with open("/run/lock/luks-tpm-package-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed("luks-tpm"):
            pytest.skip("luks-tpm is already installed on this machine: not replacing it")
        yield


def _probe(tmp_path: Path, record: Path) -> Path:
    """A package interested in the update-initramfs trigger, as initramfs-tools and dracut are."""
    root = tmp_path / "probe"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(PROBE_CONTROL)
    (root / "DEBIAN" / "triggers").write_text("interest-noawait update-initramfs\n")
    postinst = root / "DEBIAN" / "postinst"
    postinst.write_text(PROBE_POSTINST.format(record=record))
    postinst.chmod(0o755)
    deb = tmp_path / "probe.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


def _run_installed(*args: str, tcti: str) -> Any:
    """The installed command from /, with nothing at all in its environment."""
    result = subprocess.run(
        ["env", "-i", "/usr/sbin/luks-tpm", "--tcti", tcti, "--json", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert result.returncode == 0, f"luks-tpm {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
    return json.loads(result.stdout)


def test_install_run_purge(deb: Path, machine_lock: None, swtpm: Swtpm, tmp_path: Path) -> None:
    record = tmp_path / "triggered"
    probe = _probe(tmp_path, record)
    files = _contents(deb)
    try:
        assert _apt("install", str(probe)).returncode == 0
        result = _apt("install", str(deb))  # a path, not a name: apt installs that file and its Depends
        assert result.returncode == 0, result.stdout + result.stderr
        assert _installed("luks-tpm")
        assert "update-initramfs" in record.read_text(), "installing did not trigger update-initramfs"
        tag = f"cpython-{sys.version_info[0]}{sys.version_info[1]}"
        compiled = Path(RUNTIME, "luks_tpm", "__pycache__", f"activation.{tag}.pyc")
        assert compiled.is_file(), "postinst did not byte-compile the runtime"

        version = subprocess.run(
            ["env", "-i", "/usr/sbin/luks-tpm", "--version"], capture_output=True, text=True, check=True, cwd="/"
        ).stdout
        assert version.strip().endswith(_field(deb, "Version").strip())
        image, passphrase = tmp_path / "disk.img", tmp_path / "passphrase"
        passphrase.write_bytes(b"package test passphrase")
        with open(image, "wb") as handle:
            handle.truncate(32 << 20)
        _run_installed(
            "format",
            str(image),
            "--passphrase-file",
            str(passphrase),
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            tcti=swtpm.tcti,
        )
        status = _run_installed("status", str(image), tcti=swtpm.tcti)
        assert status["volumes"][0]["tokens"][0]["unlocks"] is True, status

        page = subprocess.run(
            ["man", "-P", "cat", "luks-tpm"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "MANWIDTH": "100"},
        )
        assert page.returncode == 0 and "EXIT STATUS" in page.stdout and "x-luks-tpm" in page.stdout, page.stderr
        completes = subprocess.run(
            ["bash", "-c", "source /usr/share/bash-completion/completions/luks-tpm && complete -p luks-tpm"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "_luks_tpm" in completes.stdout, completes.stderr
        # Byte-code dpkg does not know about (an interpreter run without -B): the purge must take it too.
        subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", "-o", "2", f"{RUNTIME}/luks_tpm"], check=True)
    finally:
        record.write_text("")
        purge = _apt("purge", "luks-tpm")
        _apt("purge", "luks-tpm-test-trigger-probe")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not _installed("luks-tpm")
    assert "update-initramfs" in record.read_text(), "removing did not trigger update-initramfs"
    left = sorted(p for p in files if os.path.lexists(p))
    assert not left, f"left behind after purge: {left}"
    assert not os.path.exists("/usr/lib/luks-tpm"), os.listdir("/usr/lib/luks-tpm")
    assert not os.path.exists("/usr/share/doc/luks-tpm")
