"""VM test machinery: build the initramfs images and test systems with images/, boot them with images/boot.

Boots are the slow part (TCG, ~30-50 s each), so they run two at a time (one per host core) in a pool
started the first time a test asks for a boot result; only the boots of the selected tests are run.
Kernel and initramfs builds are cached under .work/vm by images/ (keyed by input hashes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
IMAGES = TOP / "images"
WORK = TOP / ".work" / "vm"

# builder name -> images/ build command arguments
BUILDERS: dict[str, list[str]] = {
    "initramfs-tools": ["build-initramfs-tools"],
    "dracut": ["build-dracut"],
    "dracut-systemd": ["build-dracut", "--systemd"],
}
CRYPTTAB_UUIDS = re.findall(r"^[^#]\S*\s+UUID=(\S+)", (IMAGES / "data" / "crypttab").read_text(), re.MULTILINE)
# initramfs-tools opens every crypttab entry marked "initramfs"; dracut waits only for the root, unless
# told which LUKS devices the initramfs must open (rd.luks.uuid=, what dracut --hostonly-cmdline writes).
BUILDER_APPEND: dict[str, list[str]] = {
    "initramfs-tools": [],
    "dracut": [f"rd.luks.uuid={uuid}" for uuid in CRYPTTAB_UUIDS],
    "dracut-systemd": [f"rd.luks.uuid={uuid}" for uuid in CRYPTTAB_UUIDS],
}


@dataclass(frozen=True)
class Scenario:
    mksystem: tuple[str, ...] = ()  # images/mksystem options
    append: tuple[str, ...] = ()  # extra kernel arguments
    tpm: bool = True  # attach the system's TPM to the VM
    until: str = "LUKSTPM-RESULT"  # the console line that ends the boot


SCENARIOS = {
    # root and data1 derived, data2 sealed to PCR 16 (zero at boot), all fenced: all three open in one
    # pass; then the booted system tries to recover every key from the TPM (images/rootfs-init)
    "unattended": Scenario(append=("luks_tpm_test.load_key",)),
    # PCR 16 was extended on the host before sealing data2: the guest's value no longer matches
    "pcr-mismatch": Scenario(mksystem=("--pcr-mismatch",)),
    # TPM2_Clear after enrolling: every binding is gone
    "owner-cleared": Scenario(mksystem=("--clear-owner",)),
    # no TPM in the machine at all: bounded wait, then the passphrase path
    "no-tpm": Scenario(append=("luks_tpm.timeout=3",), tpm=False),
    # a shell in the initramfs before anything is unlocked (initramfs-tools break=, which needs an empty
    # panic= to give a shell; dracut rd.break=): the fence goes up before the shell's prompt, luks_tpm=0
    # (no unlock pass) or not
    "emergency": Scenario(
        append=("break=premount", "rd.break=pre-trigger", "panic=", "luks_tpm=0"),
        until=r"^\(initramfs\) |^pre-trigger:/# ",
    ),
    # the root-swap attack: the root disk is the attacker's (same UUID, their passphrase), the real data
    # volumes are attached; the attacker's init tries to recover their keys from the TPM
    "root-swap": Scenario(mksystem=("--root-swap",)),
}
# Two boots at a time (one per core of a CI runner); LUKS_TPM_VM_JOBS=1 on a machine shared with others.
VM_JOBS = int(os.environ.get("LUKS_TPM_VM_JOBS", "2"))
BOOT_TIMEOUT = 300  # a hang guard: a boot takes 40-90 s on a quiet machine, several times that on a busy one
VOLUMES = ("cryptroot", "data1", "data2")
DISKS = ("vda", "vdb", "vdc", "vdd")  # vdd: "spare", unfenced, in no crypttab (images/mksystem)


@dataclass
class Boot:
    scenario: str
    builder: str
    console: str
    seconds: float
    status: int

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.console.splitlines() if re.search(pattern, line)]

    def expect(self, pattern: str, what: str) -> None:
        """Assert the console matches; on failure show the tail of the guest console."""
        assert re.search(pattern, self.console, re.MULTILINE), (
            f"{self.scenario}/{self.builder}: {what}: no line matching {pattern!r} on the console "
            f"(runner status {self.status}, {self.seconds:.0f}s). Last console lines:\n{self.tail()}"
        )

    def reject(self, pattern: str, what: str) -> None:
        found = self.lines(pattern)
        assert not found, f"{self.scenario}/{self.builder}: {what}: {found}. Last console lines:\n{self.tail()}"


def run(*cmd: str | Path) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}")
    return result.stdout


def requirements_or_skip() -> Path:
    """The kernel dir; skips (with the reason) only when QEMU, swtpm or the kernel cannot be had."""
    missing = [
        tool
        for tool in ("qemu-system-x86_64", "swtpm", "mkinitramfs", "dracut", "cryptsetup")
        if shutil.which(tool) is None
    ]
    if missing:
        pytest.skip(f"VM tests need {', '.join(missing)} (scripts/bootstrap installs them)")
    result = subprocess.run([str(IMAGES / "kernel")], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"no Debian kernel package available for the test VM: {result.stderr.strip()[-500:]}")
    return Path(result.stdout.strip())


class VmRunner:
    """Builds what the selected boots need and runs the boots two at a time."""

    def __init__(self, kernel_dir: Path, wanted: set[tuple[str, str]]) -> None:
        self.kernel = next((kernel_dir / "boot").glob("vmlinuz-*"))
        self.wanted = wanted
        self.pool = ThreadPoolExecutor(max_workers=VM_JOBS)
        self.initrds: dict[str, Future[Path]] = {}
        self.systems: dict[tuple[str, ...], Future[Path]] = {}
        self.boots: dict[tuple[str, str], Future[Boot]] = {}

    def start(self) -> None:
        # Builds first (each build is single-threaded: two at a time), then the boots.
        for scenario, builder in sorted(self.wanted):
            self._prepare(scenario, builder)
        for key in sorted(self.wanted):
            self.boots[key] = self.pool.submit(self._boot, *key)

    def _prepare(self, scenario: str, builder: str) -> None:
        """Submit the initramfs build and the test system, once each (never twice at the same time)."""
        if builder not in self.initrds:
            self.initrds[builder] = self._submit_build(builder)
        # Scenarios that differ only in how they boot share one test system (disks are attached with
        # snapshot=on and each boot copies the TPM state).
        options = SCENARIOS[scenario].mksystem
        if options not in self.systems:
            self.systems[options] = self._submit_system(options)

    def _submit_build(self, builder: str) -> Future[Path]:
        out = WORK / f"initrd-{builder}.img"
        args = BUILDERS[builder]
        return self.pool.submit(lambda: (run(IMAGES / args[0], IMAGES / "data" / "crypttab", out, *args[1:]), out)[1])

    def _submit_system(self, options: tuple[str, ...]) -> Future[Path]:
        out = WORK / "systems" / ("-".join(o.lstrip("-") for o in options) or "default")
        return self.pool.submit(lambda: (run(IMAGES / "mksystem", out, *options), out)[1])

    def _boot(self, scenario: str, builder: str) -> Boot:
        initrd = self.initrds[builder].result()
        config = SCENARIOS[scenario]
        system = self.systems[config.mksystem].result()
        name = f"{scenario}-{builder}"
        log = WORK / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd: list[str | Path] = [
            IMAGES / "boot",
            "--kernel",
            self.kernel,
            "--initrd",
            initrd,
            "--log",
            log,
            "--timeout",
            str(BOOT_TIMEOUT),
            "--until",
            config.until,
            "--passphrase",
            system / "passphrase",
            "--append",
            " ".join(["root=/dev/mapper/cryptroot", *BUILDER_APPEND[builder], *config.append]),
        ]
        for disk in DISKS:
            cmd += ["--disk", system / f"{disk}.img"]
        if config.tpm:
            # Each boot gets its own copy of the TPM state: one swtpm per state dir, and boots run in parallel.
            state = WORK / "tpm" / name
            shutil.rmtree(state, ignore_errors=True)
            shutil.copytree(system / "tpm", state)
            cmd += ["--tpm-state", state]
        start = time.monotonic()
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
        seconds = time.monotonic() - start
        console = log.read_text(errors="replace") + "\n" + result.stderr
        return Boot(scenario, builder, console, seconds, result.returncode)

    def result(self, scenario: str, builder: str) -> Boot:
        if (scenario, builder) not in self.boots:
            self._prepare(scenario, builder)
            self.boots[(scenario, builder)] = self.pool.submit(self._boot, scenario, builder)
        return self.boots[(scenario, builder)].result()
