"""VM test machinery: build the initramfs images, boot disks and test systems with images/, boot them
through UEFI Secure Boot with images/boot.

Boots are the slow part (TCG, ~40-90 s each), so they run two at a time (one per host core) in a pool
started the first time a test asks for a boot result; only the boots of the selected tests are run.
Kernel, initramfs and boot disk builds are cached under .work/vm by images/ (keyed by input hashes), and
so are probe boots (VmRunner.probe: a boot chain's PCRs before anything is bound to them).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from . import measurements
from .measurements import Measurements

TOP = Path(__file__).resolve().parents[2]
IMAGES = TOP / "images"
WORK = TOP / ".work" / "vm"
OVMF = Path("/usr/share/OVMF")
# The firmware images/boot runs, and the variable store templates it copies (Secure Boot on / off).
FIRMWARE = (OVMF / "OVMF_CODE_4M.secboot.fd", OVMF / "OVMF_VARS_4M.ms.fd", OVMF / "OVMF_VARS_4M.fd")

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
class BootConfig:
    """How a machine boots, beyond its builder: the test's kernel arguments (they go into grub.cfg, so
    each distinct command line is a boot disk of its own), the kernel, and Secure Boot."""

    append: tuple[str, ...] = ()
    kernel: str = "base"  # images/kernel: base, update or a version
    secure_boot: bool = True


@dataclass(frozen=True)
class Scenario:
    mksystem: tuple[str, ...] = ()  # images/mksystem options
    append: tuple[str, ...] = ()  # extra kernel arguments
    tpm: bool = True  # attach the system's TPM to the VM
    until: str = "LUKSTPM-RESULT"  # the console line that ends the boot

    @property
    def config(self) -> BootConfig:
        return BootConfig(append=self.append)


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
BOOT_TIMEOUT = 400  # a hang guard: a boot takes 40-90 s on a quiet machine, several times that on a busy one
VOLUMES = ("cryptroot", "data1", "data2")
DISKS = ("vda", "vdb", "vdc", "vdd")  # vdd: "spare", unfenced, in no crypttab (images/mksystem)
# Every machine has the same devices (OVMF measures its boot entries into PCR 1): the four LUKS disks,
# the boot disk, and the TPM unless a scenario takes it out. Part of the probe cache key.
DEVICE_SET = f"q35 smm, 512 MiB, virtio-blk {' '.join(DISKS)} + boot disk (bootindex), tpm-tis"

T = TypeVar("T")


@dataclass
class Boot:
    scenario: str
    builder: str
    console: str
    seconds: float
    status: int
    measured: Measurements | None = None  # None when the guest's init did not run (e.g. emergency)

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


def requirements_or_skip() -> None:
    """Skips (with the reason) only when QEMU, swtpm, OVMF or the kernel cannot be had."""
    missing = [
        tool
        for tool in ("qemu-system-x86_64", "swtpm", "mkinitramfs", "dracut", "cryptsetup", "grub-mkconfig", "sgdisk")
        if shutil.which(tool) is None
    ]
    missing += [str(path) for path in FIRMWARE if not path.exists()]
    if missing:
        pytest.skip(f"VM tests need {', '.join(missing)} (scripts/bootstrap installs them)")
    result = subprocess.run([str(IMAGES / "kernel")], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"no Debian kernel package available for the test VM: {result.stderr.strip()[-500:]}")


@dataclass(frozen=True)
class Machine:
    """One VM: its UEFI variable store and TPM state, kept across its boots, and its LUKS disks (the
    system's images, attached snapshot=on; or, when writable, its own copies that its boots write to)."""

    directory: Path
    system: Path
    tpm: bool = True
    secure_boot: bool = True
    writable: bool = False

    @classmethod
    def create(cls, directory: Path, system: Path, **options: bool) -> Machine:
        """A new machine from a test system (images/mksystem): a copy of its TPM state and, when writable,
        of its disks; the variable store is made by its first boot."""
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        machine = cls(directory, system, **options)
        if machine.tpm:
            shutil.copytree(system / "tpm", directory / "tpm")
        if machine.writable:
            for disk in DISKS:
                subprocess.run(["cp", "--sparse=always", str(system / f"{disk}.img"), str(directory)], check=True)
        return machine

    def disks(self) -> list[Path]:
        return [(self.directory if self.writable else self.system) / f"{disk}.img" for disk in DISKS]

    def boot(self, boot_disk: Path, name: str, until: str, scenario: str = "", builder: str = "") -> Boot:
        """Boot once (the runner types the system's passphrase at every prompt); the console log and the
        measurements go to WORK/logs/NAME/."""
        logs = WORK / "logs" / name
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        cmd: list[str | Path] = [IMAGES / "boot", "--boot-disk", boot_disk, "--log", logs / "console.log"]
        cmd += ["--vars", self.directory / "vars.fd", "--secure-boot", "on" if self.secure_boot else "off"]
        cmd += ["--timeout", str(BOOT_TIMEOUT), "--until", until, "--passphrase", self.system / "passphrase"]
        for disk in self.disks():
            cmd += ["--disk", disk]
        if self.tpm:
            cmd += ["--tpm-state", self.directory / "tpm"]
        if self.writable:
            cmd.append("--writable")
        start = time.monotonic()
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
        seconds = time.monotonic() - start
        (logs / "runner.log").write_text(result.stderr)
        console = (logs / "console.log").read_text(errors="replace") + "\n" + result.stderr
        return Boot(scenario, builder, console, seconds, result.returncode, measurements.decode(console, logs))


class VmRunner:
    """Builds what the selected boots need and runs the boots, VM_JOBS at a time. Work is submitted in
    dependency order (builds before the boots that wait for them), so the pool's FIFO never deadlocks."""

    def __init__(self, wanted: set[tuple[str, str]]) -> None:
        self.wanted = wanted
        self.pool = ThreadPoolExecutor(max_workers=VM_JOBS)
        self.lock = threading.Lock()
        self.jobs: dict[tuple[object, ...], Future[object]] = {}

    def _once(self, key: tuple[object, ...], job: Callable[[], T]) -> Future[T]:
        """Submit JOB once per KEY; later calls get the same future."""
        with self.lock:
            if key not in self.jobs:
                self.jobs[key] = self.pool.submit(job)
            return self.jobs[key]  # type: ignore[return-value]

    def start(self) -> None:
        # Builds first (each build is single-threaded: two at a time), then the boots.
        for scenario, builder in sorted(self.wanted):
            self._prepare(scenario, builder)
        for key in sorted(self.wanted):
            self._submit_boot(*key)

    def _prepare(self, scenario: str, builder: str) -> None:
        self.boot_disk(builder, SCENARIOS[scenario].config)
        self.system(SCENARIOS[scenario].mksystem)

    def initrd(self, builder: str, kernel: str = "base") -> Future[Path]:
        out = WORK / f"initrd-{builder}-{kernel}.img"
        args = BUILDERS[builder]
        env = {**os.environ, "KV": kernel}

        def build() -> Path:
            cmd = [str(IMAGES / args[0]), str(IMAGES / "data" / "crypttab"), str(out), *args[1:]]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if result.returncode != 0:
                raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stderr[-4000:]}")
            return out

        return self._once(("initrd", builder, kernel), build)

    def boot_disk(self, builder: str, config: BootConfig) -> Future[Path]:
        """The boot disk for BUILDER's initramfs and CONFIG's kernel and command line (images/mkboot)."""
        initrd = self.initrd(builder, config.kernel)
        cmdline = " ".join([*BUILDER_APPEND[builder], *config.append])
        name = hashlib.sha256(f"{builder} {config.kernel} {cmdline}".encode()).hexdigest()[:12]
        out = WORK / "boot-disks" / f"{builder}-{name}.img"

        def build() -> Path:
            out.parent.mkdir(parents=True, exist_ok=True)
            run(IMAGES / "mkboot", out, "--initrd", initrd.result(), "--kernel", config.kernel, "--cmdline", cmdline)
            return out

        return self._once(("boot-disk", builder, config.kernel, cmdline), build)

    def system(self, options: tuple[str, ...]) -> Future[Path]:
        """A test system (images/mksystem OPTIONS). Scenarios that differ only in how they boot share one:
        each boot gets a machine of its own (copies of the TPM state; disks attached snapshot=on)."""
        out = WORK / "systems" / ("-".join(o.lstrip("-") for o in options) or "default")
        return self._once(("system", options), lambda: (run(IMAGES / "mksystem", out, *options), out)[1])

    def _submit_boot(self, scenario: str, builder: str) -> Future[Boot]:
        config = SCENARIOS[scenario]
        # What the boot waits for is submitted before it (see the class docstring).
        disk, system = self.boot_disk(builder, config.config), self.system(config.mksystem)

        def boot() -> Boot:
            name = f"{scenario}-{builder}"
            machine = Machine.create(WORK / "machines" / name, system.result(), tpm=config.tpm)
            return machine.boot(disk.result(), name, config.until, scenario, builder)

        return self._once(("boot", scenario, builder), boot)

    def result(self, scenario: str, builder: str) -> Boot:
        self._prepare(scenario, builder)
        return self._submit_boot(scenario, builder).result()

    def probe(self, builder: str, config: BootConfig = BootConfig()) -> Measurements:
        """The PCRs (every bank) and the event log of BUILDER's boot chain with CONFIG, read by a boot of
        a system whose disks open by passphrase (nothing bound to the TPM yet: a new TPM). Cached on disk by
        a hash of every boot input: the firmware and variable store template, the boot disk image (shim,
        GRUB, grub.cfg, kernel, initramfs), the device set and the runner. A probe whose event log does not
        replay to the PCRs the guest read is refused, not cached."""
        disk = self.boot_disk(builder, config).result()
        template = FIRMWARE[1] if config.secure_boot else FIRMWARE[2]
        key = _hash_files(FIRMWARE[0], template, disk, IMAGES / "boot", IMAGES / "rootfs-init")
        key = hashlib.sha256(f"{key} {DEVICE_SET} {_swtpm_version()}".encode()).hexdigest()[:16]
        cached = WORK / "probes" / key
        if (cached / "state.json").exists():
            return measurements.load(cached)

        system = self.system(("--passphrase-only",))

        def boot() -> Measurements:
            if (cached / "state.json").exists():  # another probe of the same inputs got there first
                return measurements.load(cached)
            name = f"probe-{key}"
            machine = Machine.create(WORK / "machines" / name, system.result(), secure_boot=config.secure_boot)
            result = machine.boot(disk, name, SCENARIOS["unattended"].until, "probe", builder)
            if result.measured is None:
                raise AssertionError(f"probe {builder} {config}: no measurements. Last console lines:\n{result.tail()}")
            wrong = result.measured.replay_mismatches()
            assert not wrong, f"probe {builder} {config}: the event log does not replay: {wrong}"
            partial = cached.with_name(f"{key}.tmp")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(WORK / "logs" / name, partial)
            partial.rename(cached)
            return measurements.load(cached)

        return self._once(("probe", key), boot).result()


def _hash_files(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


def _swtpm_version() -> str:
    # The TPM's PCR banks (which events carry which digests) are libtpms's defaults.
    return subprocess.run(["swtpm", "--version"], capture_output=True, text=True, check=False).stdout.strip()
