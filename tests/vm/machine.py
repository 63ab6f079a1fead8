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
    each distinct command line is a boot disk of its own), the kernel, Secure Boot, and the updates staged
    on the boot disk (images/mkboot --stage; "kernel:update" gets the builder's initramfs for that kernel)."""

    append: tuple[str, ...] = ()
    kernel: str = "base"  # images/kernel: base, update or a version
    secure_boot: bool = True
    stages: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scenario:
    mksystem: tuple[str, ...] = ()  # images/mksystem options
    append: tuple[str, ...] = ()  # extra kernel arguments
    tpm: bool = True  # attach the system's TPM to the VM
    until: str | None = "LUKSTPM-RESULT"  # the console line that ends the boot; None: the VM powers off
    kill_tpm_on: str | None = None  # kill the VM's swtpm when the console shows this (images/boot)

    @property
    def config(self) -> BootConfig:
        return BootConfig(append=self.append)


# The console line that ends the boot's unlock pass (hooks/functions.sh), on every builder.
UNLOCK_PASS_ENDED = "luks-tpm: unlock pass took"


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
    # the data-swap attack: data1 is the attacker's look-alike (same UUID, the genuine token copied into
    # its header, the attacker's passphrase, which the runner types at data1's prompt)
    "data-swap": Scenario(mksystem=("--data-swap",)),
    # the TPM dies once the unlock pass is done: the fence cannot be raised, the boot stops and powers off
    "fence-failure": Scenario(kill_tpm_on=UNLOCK_PASS_ENDED, until=None),
    # the same with luks_tpm.fence=optional: the boot goes on and says so
    "fence-optional": Scenario(append=("luks_tpm.fence=optional",), kill_tpm_on=UNLOCK_PASS_ENDED),
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

    def boot(
        self,
        boot_disk: Path,
        name: str,
        until: str | None,
        scenario: str = "",
        builder: str = "",
        kill_tpm_on: str | None = None,
    ) -> Boot:
        """Boot once (the runner types the system's passphrase at every prompt, or the one in the system's
        passphrase-NAME file at volume NAME's); the console log and the measurements go to WORK/logs/NAME/.
        A writable machine boots its own copy of the boot disk (made at its first boot), which keeps what
        its boots write (/boot: updates)."""
        logs = WORK / "logs" / name
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        if self.writable:
            if not (self.directory / "boot.img").exists():
                subprocess.run(["cp", "--sparse=always", str(boot_disk), str(self.directory / "boot.img")], check=True)
            boot_disk = self.directory / "boot.img"
        cmd: list[str | Path] = [IMAGES / "boot", "--boot-disk", boot_disk, "--log", logs / "console.log"]
        cmd += ["--vars", self.directory / "vars.fd", "--secure-boot", "on" if self.secure_boot else "off"]
        cmd += ["--timeout", str(BOOT_TIMEOUT), "--passphrase", self.system / "passphrase"]
        for answer in sorted(self.system.glob("passphrase-*")):
            cmd += ["--passphrase-for", f"{answer.name.removeprefix('passphrase-')}={answer}"]
        if until is not None:
            cmd += ["--until", until]
        if kill_tpm_on is not None:
            cmd += ["--kill-tpm-on", kill_tpm_on]
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


@dataclass(frozen=True)
class Journey:
    """Boots of one machine in a row: a writable machine (its disks, boot disk, variable store and TPM
    state kept from one boot to the next) of a system bound to the boot chain of BUILDER with CONFIG (its
    tokens approve the state a probe boot of that very boot disk measured: images/mksystem --boot-chain).
    Each boot applies the next update staged on the boot disk (images/rootfs-init)."""

    builder: str
    config: BootConfig
    boots: int
    secure_boot: bool = True


# The PCRs the recommended server binding covers (luks_tpm.settings.BOOT_CHAIN_PCRS, docs/boot-chain.md).
BOOT_CHAIN_PCRS = (4, 7, 8, 9)
# Issue 22's scenarios on one machine: boot 1 comes up unattended (a) and installs a kernel update (b);
# boot 2 runs the new kernel and changes the command line (c); boot 3 edits grub.cfg by hand (d); boot 4
# falls back to the passphrase. The kernel argument makes each boot try load-key after the fence.
CHAIN = BootConfig(
    append=("luks_tpm_test.load_key",),
    stages=("kernel:update", "cmdline:luks_tpm_test.cmdline=changed", "hand-edit"),
)
JOURNEYS = {
    "boot-chain": Journey("initramfs-tools", CHAIN, boots=4),
    # the same enrolled machine, booted with Secure Boot off (e)
    "secure-boot-off": Journey("initramfs-tools", CHAIN, boots=1, secure_boot=False),
    # (a) on a second builder: a dracut boot disk of its own (no staged update), its own probe and system
    "boot-chain-dracut": Journey("dracut", BootConfig(append=("luks_tpm_test.load_key",)), boots=1),
}


class VmRunner:
    """Builds what the selected boots need and runs the boots, VM_JOBS at a time. Work is submitted in
    dependency order (what a job waits for is submitted before it), so the pool's FIFO never deadlocks."""

    def __init__(self, wanted: set[tuple[str, str]], journeys: frozenset[str] = frozenset()) -> None:
        self.wanted = wanted
        self.journeys = journeys
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
        # The journeys' probes first (the longest chains of boots wait for them), then the builds (each
        # single-threaded: two at a time), then the journeys and the boots.
        for name in sorted(self.journeys):
            self.probe_future(JOURNEYS[name].builder, JOURNEYS[name].config)
        for scenario, builder in sorted(self.wanted):
            self._prepare(scenario, builder)
        for name in sorted(self.journeys):
            self.journey(name)
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
        """The boot disk for BUILDER's initramfs and CONFIG's kernel, command line and staged updates
        (images/mkboot). A staged "kernel:K" gets BUILDER's initramfs for K; "cmdline:ARGS" adds ARGS to
        the boot's arguments."""
        initrd = self.initrd(builder, config.kernel)
        cmdline = " ".join([*BUILDER_APPEND[builder], *config.append])
        staged = {stage: self.initrd(builder, stage[7:]) for stage in config.stages if stage.startswith("kernel:")}
        name = hashlib.sha256(f"{builder} {config.kernel} {cmdline} {config.stages}".encode()).hexdigest()[:12]
        out = WORK / "boot-disks" / f"{builder}-{name}.img"

        def stage(spec: str) -> str:
            if spec in staged:
                return f"{spec}:{staged[spec].result()}"
            return f"cmdline:{cmdline} {spec[8:]}" if spec.startswith("cmdline:") else spec

        def build() -> Path:
            out.parent.mkdir(parents=True, exist_ok=True)
            args: list[str | Path] = ["--initrd", initrd.result(), "--kernel", config.kernel, "--cmdline", cmdline]
            for spec in config.stages:
                args += ["--stage", stage(spec)]
            run(IMAGES / "mkboot", out, *args)
            return out

        return self._once(("boot-disk", builder, config.kernel, cmdline, config.stages), build)

    def system(self, options: tuple[str, ...]) -> Future[Path]:
        """A test system (images/mksystem OPTIONS). Scenarios that differ only in how they boot share one:
        each boot gets a machine of its own (copies of the TPM state; disks attached snapshot=on)."""
        return self._once(("system", options), lambda: _make_system(options))

    def _submit_boot(self, scenario: str, builder: str) -> Future[Boot]:
        config = SCENARIOS[scenario]
        # What the boot waits for is submitted before it (see the class docstring).
        disk, system = self.boot_disk(builder, config.config), self.system(config.mksystem)

        def boot() -> Boot:
            name = f"{scenario}-{builder}"
            machine = Machine.create(WORK / "machines" / name, system.result(), tpm=config.tpm)
            return machine.boot(disk.result(), name, config.until, scenario, builder, config.kill_tpm_on)

        return self._once(("boot", scenario, builder), boot)

    def result(self, scenario: str, builder: str) -> Boot:
        self._prepare(scenario, builder)
        return self._submit_boot(scenario, builder).result()

    def probe(self, builder: str, config: BootConfig = BootConfig()) -> Measurements:
        return self.probe_future(builder, config).result()

    def probe_future(self, builder: str, config: BootConfig = BootConfig()) -> Future[Measurements]:
        """The PCRs (every bank) and the event log of BUILDER's boot chain with CONFIG, read by a boot of
        a system whose disks open by passphrase (nothing bound to the TPM yet: a new TPM). Cached on disk by
        a hash of every boot input: the firmware and variable store template, the boot disk image (shim,
        GRUB, grub.cfg, kernel, initramfs, staged updates), the device set and the runner. A probe whose
        event log does not replay to the PCRs the guest read is refused, not cached."""
        disk, system = self.boot_disk(builder, config), self.system(("--passphrase-only",))

        def boot() -> Measurements:
            template = FIRMWARE[1] if config.secure_boot else FIRMWARE[2]
            key = _hash_files(FIRMWARE[0], template, disk.result(), IMAGES / "boot", IMAGES / "rootfs-init")
            key = hashlib.sha256(f"{key} {DEVICE_SET} {_swtpm_version()}".encode()).hexdigest()[:16]
            cached = WORK / "probes" / key
            if (cached / "state.json").exists():
                return measurements.load(cached)
            name = f"probe-{key}"
            machine = Machine.create(WORK / "machines" / name, system.result(), secure_boot=config.secure_boot)
            result = machine.boot(disk.result(), name, SCENARIOS["unattended"].until, "probe", builder)
            if result.measured is None:
                raise AssertionError(f"probe {builder} {config}: no measurements. Last console lines:\n{result.tail()}")
            wrong = result.measured.replay_mismatches()
            assert not wrong, f"probe {builder} {config}: the event log does not replay: {wrong}"
            partial = cached.with_name(f"{key}.tmp")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(WORK / "logs" / name, partial)
            partial.rename(cached)
            return measurements.load(cached)

        return self._once(("probe", builder, config), boot)

    def bound_system(self, builder: str, config: BootConfig) -> Future[Path]:
        """A test system whose root and data volumes are bound to BUILDER's boot chain with CONFIG, the
        recommended server binding (images/mksystem --boot-chain), approving the state its probe read."""
        probe = self.probe_future(builder, config)

        def build() -> Path:
            pcrs = probe.result().pcrs["sha256"]
            return _make_system(("--boot-chain", ",".join(f"{i}={pcrs[i]}" for i in BOOT_CHAIN_PCRS)))

        return self._once(("bound-system", builder, config), build)

    def journey(self, name: str) -> Future[list[Boot]]:
        """The boots of the journey NAME (JOURNEYS), in order, on one machine."""
        plan = JOURNEYS[name]
        disk, system = self.boot_disk(plan.builder, plan.config), self.bound_system(plan.builder, plan.config)

        def boots() -> list[Boot]:
            machine = Machine.create(
                WORK / "machines" / name, system.result(), writable=True, secure_boot=plan.secure_boot
            )
            until = SCENARIOS["unattended"].until
            return [
                machine.boot(disk.result(), f"{name}-{n}", until, name, plan.builder) for n in range(1, plan.boots + 1)
            ]

        return self._once(("journey", name), boots)


def _make_system(options: tuple[str, ...]) -> Path:
    name = "-".join(o.lstrip("-") for o in options) or "default"
    if len(name) > 40:  # PCR values: a name of their hash
        name = f"{options[0].lstrip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    out = WORK / "systems" / name
    run(IMAGES / "mksystem", out, *options)
    return out


def _hash_files(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


def _swtpm_version() -> str:
    # The TPM's PCR banks (which events carry which digests) are libtpms's defaults.
    return subprocess.run(["swtpm", "--version"], capture_output=True, text=True, check=False).stdout.strip()
