"""The test VM's measured boot: UEFI Secure Boot with Debian's signed shim, GRUB and kernel, measured by
the firmware, shim and GRUB into the TPM, as the guest reports it (images/rootfs-init; decoded by
measurements.py). These checks read the unattended boots of test_boot.py (no boots of their own) and one
probe boot (VmRunner.probe).
"""

from __future__ import annotations

import hashlib

import pytest

from .machine import BUILDER_APPEND, FIRMWARE, SCENARIOS, WORK, Boot, Machine, VmRunner
from .measurements import Measurements

pytestmark = pytest.mark.vm

BUILDERS = ("initramfs-tools", "dracut", "dracut-systemd")
CASES = [("unattended", builder) for builder in BUILDERS]
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_IPL = 0xD
# The PCRs the boot chain measures: firmware (0-7), GRUB (8: commands, 9: files), shim (14: MOK lists).
BOOT_CHAIN_PCRS = (*range(10), 14)


@pytest.fixture
def boot(vm: VmRunner, vm_case: tuple[str, str]) -> Boot:
    return vm.result(*vm_case)


def measured(boot: Boot) -> Measurements:
    assert boot.measured is not None, f"{boot.builder}: the guest reported no measurements:\n{boot.tail()}"
    return boot.measured


cases = pytest.mark.parametrize("vm_case", CASES, ids=["-".join(c) for c in CASES])


@cases
def test_secure_boot_is_on_and_the_kernel_locked_down(boot: Boot) -> None:
    boot.expect(r"EFI stub: UEFI Secure Boot is enabled", "the kernel's EFI stub did not see Secure Boot")
    result = measured(boot)
    assert result.secure_boot == "enabled", result.secure_boot
    assert result.lockdown_mode == "integrity", result.lockdown


@cases
def test_event_log_replays_to_the_pcrs_the_guest_read(boot: Boot) -> None:
    result = measured(boot)
    assert not result.replay_mismatches()
    replayed = result.replayed()
    assert "sha256" in replayed, sorted(replayed)
    assert set(BOOT_CHAIN_PCRS) <= set(replayed["sha256"]), sorted(replayed["sha256"])
    for pcr in (4, 7, 8, 9):
        assert int(result.pcrs["sha256"][pcr], 16) != 0, f"PCR {pcr} is zero"


@cases
def test_grub_measured_the_kernel_initramfs_and_command_line_it_booted(vm: VmRunner, boot: Boot) -> None:
    # PCR 9: the files GRUB read, by plain sha256; PCR 8: the command line; PCR 4: shim's Authenticode
    # hashes of shim itself (by the firmware), GRUB and the kernel (twice: Debian's GRUB verifies it twice).
    events = measured(boot).events()
    files = {e.data.rstrip(b"\0").decode(): e.digests["sha256"] for e in events if e.pcr == 9 and e.type == EV_IPL}
    initrd = vm.initrd(boot.builder).result().read_bytes()
    kernels = [name for name in files if name.startswith("/vmlinuz-")]
    assert len(kernels) == 1, sorted(files)
    version = kernels[0].removeprefix("/vmlinuz-")
    assert files[f"/initrd.img-{version}"] == hashlib.sha256(initrd).digest()
    kernel = (WORK / "kernel" / version / "boot" / f"vmlinuz-{version}").read_bytes()
    assert files[kernels[0]] == hashlib.sha256(kernel).digest()
    cmdlines = [e.data.rstrip(b"\0").decode() for e in events if e.pcr == 8 and e.data.startswith(b"kernel_cmdline: ")]
    expected = " ".join(
        ["root=/dev/mapper/cryptroot ro console=ttyS0", "panic=-1 loglevel=4", *BUILDER_APPEND[boot.builder]]
    )
    assert cmdlines == [f"kernel_cmdline: {kernels[0]} {expected} luks_tpm_test.load_key"], cmdlines
    applications = [e for e in events if e.pcr == 4 and e.type == EV_EFI_BOOT_SERVICES_APPLICATION]
    assert len(applications) == 4, "expected shim, GRUB and the kernel twice in PCR 4"


@pytest.mark.parametrize("vm_case", [("unattended", "initramfs-tools")], ids=["unattended-initramfs-tools"])
def test_probe_predicts_the_boot_chain_pcrs(vm: VmRunner, boot: Boot) -> None:
    # The probe boots the same boot disk on a system with nothing enrolled (disks opened by passphrase):
    # every PCR of the boot chain, in every bank, is what the enrolled system's boot then reads.
    probe = vm.probe(boot.builder, SCENARIOS["unattended"].config)
    assert probe.eventlog.is_file()
    assert not probe.replay_mismatches()
    actual = measured(boot).pcrs
    assert sorted(probe.pcrs) == sorted(actual)
    for bank, values in probe.pcrs.items():
        for pcr in BOOT_CHAIN_PCRS:
            assert values[pcr] == actual[bank][pcr], f"{bank} PCR {pcr}: probe {values[pcr]}, boot {actual[bank][pcr]}"


def test_a_machine_boots_again_with_the_same_boot_chain_pcrs(vm: VmRunner) -> None:
    # One machine, two boots in a row: the variable store the first boot wrote, the same TPM state, and
    # writable disks whose writes (data1's mount) stay. What the firmware, shim and GRUB measure does not
    # change from one boot to the next: what sealing to PCRs 0-9 and 14 relies on.
    disk, system = vm.boot_disk("initramfs-tools", SCENARIOS["unattended"].config), vm.system(())

    def twice() -> tuple[Machine, list[Boot]]:
        machine = Machine.create(WORK / "machines" / "reboot", system.result(), writable=True)
        boots = [
            machine.boot(disk.result(), f"reboot-{n}", "LUKSTPM-RESULT", "reboot", "initramfs-tools") for n in (1, 2)
        ]
        return machine, boots

    machine, boots = vm.pool.submit(twice).result()
    for boot in boots:
        boot.expect(r"^LUKSTPM-RESULT: PASS", "the boot did not pass")
        boot.expect(r"luks-tpm: unlock pass took [0-9.]+s \(exit 0\)", "the TPM did not unlock the disks")
    assert (machine.directory / "vars.fd").read_bytes() != FIRMWARE[1].read_bytes(), "the firmware wrote no variable"
    assert (machine.directory / "vdb.img").read_bytes() != (machine.system / "vdb.img").read_bytes()
    first, second = (measured(boot).pcrs for boot in boots)
    for bank in first:
        for pcr in BOOT_CHAIN_PCRS:
            assert first[bank][pcr] == second[bank][pcr], f"{bank} PCR {pcr} changed between two boots"
