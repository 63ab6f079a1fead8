"""Boot a real Debian system under QEMU with swtpm as its TPM and our initramfs integration, through UEFI
Secure Boot (OVMF, Debian's signed shim, GRUB and kernel; the test's kernel arguments are in grub.cfg).

Each case is (scenario, builder): see machine.SCENARIOS and machine.BUILDERS. The test system has three
LUKS2 volumes marked x-luks-tpm in crypttab, all fenced (root `cryptroot` and data1 with derived tokens,
data2 with a token sealed to PCR 16), and a fourth, `spare`, with an unfenced derived token and in no
crypttab. The guest's /sbin/init (images/rootfs-init) prints LUKSTPM-* markers: the dm tables, mounts,
the hygiene checks (key material in /run, /tmp, /proc/cmdline, environments; logon keys left in
/proc/keys), PCR 15, and what `luks-tpm load-key` can still recover from the TPM; then it powers off.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from .machine import VOLUMES, Boot, VmRunner

pytestmark = pytest.mark.vm

ALL_BUILDERS = ("initramfs-tools", "dracut", "dracut-systemd")
# The systemd initrd is the slowest boot; it runs the unattended and one fallback case. The fence is
# raised by the same function on every builder (hooks/functions.sh): the attack runs on one.
CASES = [
    *[("unattended", b) for b in ALL_BUILDERS],
    *[("pcr-mismatch", b) for b in ALL_BUILDERS],
    *[("owner-cleared", b) for b in ("initramfs-tools", "dracut")],
    ("no-tpm", "initramfs-tools"),
    ("root-swap", "initramfs-tools"),
    *[("emergency", b) for b in ("initramfs-tools", "dracut")],
]
# PCR 15 (sha256) after exactly one fence, from zero: the contract's extend value (docs, decisions).
FENCED_PCR15 = hashlib.sha256(bytes(32) + hashlib.sha256(b"luks-tpm fence v1").digest()).hexdigest()
FENCED = ("cryptroot", "data1", "data2")
# images/mksystem's disks, in the order the runner attaches them
DEVICES = {"/dev/vda": "cryptroot", "/dev/vdb": "data1", "/dev/vdc": "data2", "/dev/vdd": "spare"}


def case_id(case: tuple[str, str]) -> str:
    return "-".join(case)


@pytest.fixture
def boot(vm: VmRunner, vm_case: tuple[str, str]) -> Boot:
    return vm.result(*vm_case)


def vm_cases(*scenarios: str) -> pytest.MarkDecorator:
    selected = [case for case in CASES if case[0] in scenarios]
    return pytest.mark.parametrize("vm_case", selected, ids=[case_id(c) for c in selected])


def assert_fence_raised(boot: Boot) -> None:
    """The initramfs raised the fence exactly once, before the root's init ran."""
    assert len(boot.lines(r"luks-tpm: fence raised \(PCR 15\)")) == 1, "expected one fence: " + boot.tail()
    boot.expect(rf"^LUKSTPM-PCR15 (?i:{FENCED_PCR15})$", "PCR 15 is not the value of one fence")


def assert_booted_and_clean(boot: Boot) -> None:
    """The root was reached, every volume is open by keyring reference and mounted, nothing leaked."""
    boot.expect(r"^LUKSTPM: root filesystem reached", "the root filesystem was not reached")
    for name in VOLUMES:
        boot.expect(rf"^LUKSTPM-TABLE {name}: .* :64:logon:cryptsetup:[0-9a-f-]+-d0 ", f"{name}: dm table")
        boot.expect(rf"^LUKSTPM-KEYRING {name}$", f"{name}: dm table does not reference a logon key")
        boot.expect(rf"^LUKSTPM-MOUNTED {name}$", f"{name}: filesystem not mounted")
    boot.expect(r"^LUKSTPM-HYGIENE checked", "hygiene checks did not run")
    boot.reject(r"^LUKSTPM-FAIL", "guest checks failed")
    boot.expect(r"^LUKSTPM-RESULT: PASS", "guest result")


def load_key_results(boot: Boot) -> dict[str, dict[str, Any]]:
    """The booted system's `luks-tpm --json load-key` of every listed volume, by volume name."""
    found = boot.lines(r"^LUKSTPM-LOADKEY exit ")
    assert len(found) == 1, f"{boot.scenario}/{boot.builder}: no load-key result. Last console lines:\n{boot.tail()}"
    report = json.loads(found[0].split(": ", 1)[1])
    return {DEVICES[volume["device"]]: volume for volume in report["volumes"]}


def assert_load_key(results: dict[str, dict[str, Any]], name: str, *, fenced: bool) -> None:
    result = results[name]
    if fenced:
        assert "error" in result, f"{name}: the fenced key was recovered after the boot: {result}"
        assert result["error"]["code"] == 5 and "PCR 15" in result["error"]["message"], result
    else:
        assert "serial" in result, f"{name}: the unfenced key was not recovered: {result}"


@vm_cases("unattended")
def test_unattended_unlock_in_one_pass(boot: Boot) -> None:
    for name in VOLUMES:
        boot.expect(rf"luks-tpm: {name}: opened$", f"{name} not opened by luks-tpm")
    assert len(boot.lines(r"luks-tpm: unlock pass took")) == 1, "expected exactly one unlock pass"
    boot.expect(r"luks-tpm: unlock pass took [0-9.]+s \(exit 0\)", "luks-tpm exit status")
    boot.reject(r"boot: answered passphrase prompt", "a passphrase was asked for")
    assert_booted_and_clean(boot)
    assert_fence_raised(boot)


@vm_cases("unattended")
def test_booted_system_cannot_recover_fenced_keys(boot: Boot) -> None:
    # Every fenced key, root's included, is refused after the boot; the unfenced control still works,
    # so the refusals are the fence's doing and not a broken luks-tpm in the booted system.
    results = load_key_results(boot)
    for name in FENCED:
        assert_load_key(results, name, fenced=True)
    assert_load_key(results, "spare", fenced=False)


@vm_cases("pcr-mismatch")
def test_pcr_mismatch_falls_back_to_passphrase(boot: Boot) -> None:
    boot.expect(r"luks-tpm: cryptroot: opened$", "cryptroot (derived) not opened by luks-tpm")
    boot.expect(r"luks-tpm: data1: opened$", "data1 (derived) not opened by luks-tpm")
    boot.expect(r"luks-tpm: data2: .*falling back to passphrase", "data2 (sealed, PCR changed) no fallback")
    boot.expect(r"luks-tpm: unlock pass took [0-9.]+s \(exit 5\)", "luks-tpm exit status 5")
    # The runner types the passphrase at the prompt: exactly one, for data2.
    assert len(boot.lines(r"boot: answered passphrase prompt")) == 1, boot.tail()
    assert_booted_and_clean(boot)
    # The volume opened by passphrase is open before the fence goes up.
    assert_fence_raised(boot)


@vm_cases("pcr-mismatch")
def test_fallback_prompt_is_quiet_about_our_marker(boot: Boot) -> None:
    # Debian's cryptroot warns about every option it does not know, systemd-cryptsetup too: the images'
    # crypttab has x-luks-tpm stripped (our own list keeps it).
    boot.expect(r"Please unlock disk data2|Please enter passphrase for disk|Enter passphrase for ", "no prompt")
    boot.reject(r"unknown option|Encountered unknown /etc/crypttab option", "console noise about x-luks-tpm")


@vm_cases("owner-cleared")
def test_owner_cleared_says_so_and_falls_back(boot: Boot) -> None:
    for name in VOLUMES:
        boot.expect(
            rf"luks-tpm: {name}: .*owner hierarchy was cleared.*falling back to passphrase", f"{name}: no clear message"
        )
    boot.expect(r"luks-tpm: unlock pass took [0-9.]+s \(exit 5\)", "luks-tpm exit status 5")
    assert len(boot.lines(r"boot: answered passphrase prompt")) == len(VOLUMES), boot.tail()
    assert_booted_and_clean(boot)
    assert_fence_raised(boot)


@vm_cases("no-tpm")
def test_no_tpm_waits_bounded_then_falls_back(boot: Boot) -> None:
    boot.expect(r"luks-tpm: no TPM \(/dev/tpmrm0\) after 3s; falling back to passphrase", "no-TPM message")
    boot.reject(r"luks-tpm: unlock pass took", "luks-tpm ran without a TPM")
    assert len(boot.lines(r"boot: answered passphrase prompt")) == len(VOLUMES), boot.tail()
    assert_booted_and_clean(boot)
    # Nothing to fence, said once, and no second wait for the TPM.
    boot.expect(r"luks-tpm: no TPM \(/dev/tpmrm0\): no fence to raise", "no-TPM fence message")
    boot.expect(r"^LUKSTPM-PCR15 no-tpm$", "the guest saw a TPM")


@vm_cases("emergency")
def test_emergency_shell_comes_after_the_fence(boot: Boot) -> None:
    # initramfs-tools runs its panic scripts, dracut its emergency hooks, before the shell.
    fence = boot.console.find("luks-tpm: fence raised (PCR 15)")
    prompt = max(boot.console.find("(initramfs) "), boot.console.find("pre-trigger:/# "))
    assert 0 <= fence < prompt, f"no fence before the shell: {boot.tail()}"
    boot.reject(r"luks-tpm: unlock pass took", "the volumes were unlocked before the shell")


@vm_cases("root-swap")
def test_root_swap_attacker_cannot_recover_fenced_keys(boot: Boot) -> None:
    # The legitimate initramfs cannot open the attacker's root from the TPM and asks; the runner types
    # the attacker's passphrase; the attacker's init runs with the fence up.
    boot.expect(r"luks-tpm: cryptroot: .*falling back to passphrase", "the attacker's root was not refused")
    assert len(boot.lines(r"boot: answered passphrase prompt")) == 1, boot.tail()
    boot.expect(r"^LUKSTPM: root filesystem reached", "the attacker's root was not reached")
    assert_fence_raised(boot)
    results = load_key_results(boot)
    assert sorted(results) == ["data1", "data2", "spare"]
    assert_load_key(results, "data1", fenced=True)
    assert_load_key(results, "data2", fenced=True)
    # The control: the same attack on an unfenced token works (this test can fail).
    assert_load_key(results, "spare", fenced=False)


@vm_cases("root-swap")
@pytest.mark.xfail(
    strict=True,
    reason="the unlock pass opens every marked volume before the root is known to "
    "be genuine; the attacker's root gets the data volumes the TPM opened (README: the fence)",
)
def test_root_swap_attacker_gets_no_volume_the_tpm_opened(boot: Boot) -> None:
    boot.expect(r"^LUKSTPM: root filesystem reached", "the attacker's root was not reached")
    boot.reject(r"^LUKSTPM-ATTACK-(READ|OPEN) ", "volumes opened by the TPM handed to the attacker's root")
