"""Cores of a process taken by gdb at exact moments of a key's life, and where key bytes occur in them.

The process runs under gdb and finishes normally: killing it half-way would leave TPM objects loaded
on a TPM without a resource manager. At each moment gdb writes a core (`gcore`) and lets it go on.
Root can trace a process that made itself non-dumpable (luks-tpm does, first thing).

Moments (each at most once; `MOMENTS` is the order they happen in):
- verify:  entry of crypt_volume_key_verify; gdb reads the key pointer the caller passed
- pbkdf2:  libcryptsetup's PBKDF2 over that key (the first EVP_KDF_derive inside the verify call)
- add_key: entry of the add_key syscall; gdb reads the payload pointer
- after:   the first keyctl syscall after add_key returned (load-key's set-permissions)
- exit:    entry of exit_group, after the interpreter's finalization
"""

from __future__ import annotations

import functools
import mmap
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MOMENTS = ("verify", "pbkdf2", "add_key", "after", "exit")
_WINDOW = 16
_CHUNK = 8  # every 16-byte window of a needle contains one of its 8-byte-aligned 8-byte chunks

# Registers are the x86-64 ones: the first two arguments of a call (rsi, rdx), and add_key's payload
# and length at syscall entry (rdx, r10).
_SCRIPT = """\
set pagination off
set confirm off
set startup-with-shell off
set breakpoint pending on
# Dump every mapping, also those a library marked MADV_DONTDUMP: a key there is still in memory.
set use-coredump-filter off
set dump-excluded-mappings on
set $added = 0
set $after = 0
break crypt_volume_key_verify
commands
  silent
  printf "luks-tpm-moment verify %#lx %d\\n", $rsi, $rdx
  gcore {dir}/verify.core
  tbreak EVP_KDF_derive
  commands
    silent
    printf "luks-tpm-moment pbkdf2 0 0\\n"
    gcore {dir}/pbkdf2.core
    continue
  end
  continue
end
catch syscall add_key
commands
  silent
  set $added = $added + 1
  if $added == 1
    printf "luks-tpm-moment add_key %#lx %d\\n", $rdx, $r10
    gcore {dir}/add_key.core
  end
  continue
end
catch syscall keyctl
commands
  silent
  if $added == 2 && $after == 0
    set $after = 1
    printf "luks-tpm-moment after 0 0\\n"
    gcore {dir}/after.core
  end
  continue
end
catch syscall exit_group
commands
  silent
  printf "luks-tpm-moment exit 0 0\\n"
  gcore {dir}/exit.core
  continue
end
run
"""


@dataclass(frozen=True)
class Moment:
    name: str
    core: Path
    address: int | None  # where the caller's key is: the pointer passed to verify / add_key
    length: int | None


@dataclass(frozen=True)
class Run:
    moments: dict[str, Moment]
    exit_code: int | None
    output: str  # gdb's and the program's output, for messages (no key material: only addresses)


@functools.cache
def cannot_trace() -> str | None:
    """Why gdb cannot be used here, or None."""
    if platform.machine() != "x86_64":
        return f"the gdb moments read x86-64 registers; this is {platform.machine()}"
    if shutil.which("gdb") is None:
        return "gdb is not installed (scripts/bootstrap installs it)"
    probe = subprocess.run(
        ["gdb", "-batch", "-nx", "-ex", "run", "--args", "/bin/true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=_gdb_environment(),
    )
    if "exited normally" not in probe.stdout + probe.stderr:
        last = (probe.stderr.strip() or probe.stdout.strip()).splitlines()[-1:] or ["no output"]
        return f"gdb cannot trace a child here (ptrace restricted?): {last[0]}"
    return None


@contextmanager
def core_directory(fallback: Path) -> Iterator[Path]:
    """Where the cores go: tmpfs when there is one (they hold the key: not to a disk), removed afterwards."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else fallback
    directory = Path(tempfile.mkdtemp(prefix="luks-tpm-cores-", dir=base))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _gdb_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k != "DEBUGINFOD_URLS"}  # no network look-ups
    environment.update(extra or {})
    return environment


def run_at_moments(
    argv: Sequence[str], directory: Path, *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> Run:
    """Run `argv` under gdb, writing a core into `directory` at each moment that happens."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "moments.gdb"
    script.write_text(_SCRIPT.format(dir=directory))
    result = subprocess.run(
        ["gdb", "-batch", "-nx", "-x", str(script), "--args", *argv],
        cwd=cwd,
        env=_gdb_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    output = result.stdout + result.stderr
    moments: dict[str, Moment] = {}
    for name, address, length in re.findall(r"^luks-tpm-moment (\w+) (0x[0-9a-f]+|0) (\d+)$", output, re.M):
        if name in moments:
            raise AssertionError(f"moment {name} happened twice: {output}")
        core = directory / f"{name}.core"
        if not core.exists():
            raise AssertionError(f"gdb wrote no core at moment {name}: {output}")
        moments[name] = Moment(name, core, int(address, 16) or None, int(length) or None)
    exited = re.search(r"\[Inferior 1 \(process \d+\) exited (normally|with code (\d+))\]", output)
    code = None if exited is None else 0 if exited[1] == "normally" else int(exited[2], 8)
    return Run(moments, code, output)


@dataclass(frozen=True)
class Copies:
    """Where a needle's 16-byte windows occur in a core's memory."""

    windows: list[int]  # for each window offset 0..len-16: how many times it occurs
    starts: dict[int, list[int]]  # address the needle would start at -> window offsets found there
    before: dict[int, bytes]  # address -> the 2 bytes just before it (a TPM2B's size field, if it is one)

    @property
    def most(self) -> int:
        return max(self.windows)

    @property
    def least(self) -> int:
        return min(self.windows)

    def describe(self) -> str:
        if not self.starts:
            return "none"
        return "; ".join(
            f"{len(found)} of {len(self.windows)} windows at {start:#x}" for start, found in sorted(self.starts.items())
        )


def _segments(core: mmap.mmap) -> list[tuple[int, int, int]]:
    """(file offset, virtual address, size) of each PT_LOAD segment with contents: the process's memory
    (not the notes, which hold registers)."""
    if core[:4] != b"\x7fELF" or core[4] != 2:
        raise AssertionError("not a 64-bit ELF core")
    (phoff,) = struct.unpack_from("<Q", core, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", core, 0x36)
    segments = []
    for index in range(phnum):
        kind, _, offset, address, _, size = struct.unpack_from("<IIQQQQ", core, phoff + index * phentsize)
        if kind == 1 and size:
            segments.append((offset, address, size))
    return segments


def find_copies(core_path: Path, needles: dict[str, bytes]) -> dict[str, Copies]:
    """Every occurrence, in the core's memory segments, of every 16-byte window of each needle."""
    found: dict[str, Copies] = {}
    with open(core_path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as core:
        segments = _segments(core)
        for name, needle in needles.items():
            assert len(needle) >= _WINDOW
            windows = len(needle) - _WINDOW + 1
            chunks = [(at, needle[at : at + _CHUNK]) for at in range(0, len(needle) - _CHUNK + 1, _CHUNK)]
            counts = [0] * windows
            starts: dict[int, list[int]] = {}
            before: dict[int, bytes] = {}
            for offset, address, size in segments:
                end = offset + size
                candidates = set()  # file offsets where a copy of the needle would start
                for at, chunk in chunks:
                    hit = core.find(chunk, offset, end)
                    while hit >= 0:
                        candidates.add(hit - at)
                        hit = core.find(chunk, hit + 1, end)
                for start in candidates:
                    for window in range(windows):
                        first = start + window
                        if (
                            offset <= first <= end - _WINDOW
                            and core[first : first + _WINDOW] == needle[window : window + _WINDOW]
                        ):
                            counts[window] += 1
                            starts.setdefault(address + start - offset, []).append(window)
                            before[address + start - offset] = core[max(offset, start - 2) : max(offset, start)]
            found[name] = Copies(counts, starts, before)
    return found
