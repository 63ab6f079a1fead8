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

import pytest

from .checks import FENCED, assert_booted_and_clean, assert_fence_raised, assert_load_key, load_key_results
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
    ("data-swap", "initramfs-tools"),
    # The stop happens in a different place on each builder: initramfs-tools local-bottom, dracut pre-pivot,
    # dracut-systemd luks-tpm-fence.service.
    *[("fence-failure", b) for b in ALL_BUILDERS],
    ("fence-optional", "initramfs-tools"),
]


def case_id(case: tuple[str, str]) -> str:
    return "-".join(case)


@pytest.fixture
def boot(vm: VmRunner, vm_case: tuple[str, str]) -> Boot:
    return vm.result(*vm_case)


def vm_cases(*scenarios: str) -> pytest.MarkDecorator:
    selected = [case for case in CASES if case[0] in scenarios]
    return pytest.mark.parametrize("vm_case", selected, ids=[case_id(c) for c in selected])


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


def assert_asked_for_every_passphrase(boot: Boot) -> None:
    """A prompt for each volume, which the runner answered. systemd's: at least one (one in every run so
    far); systemd-ask-password keeps the answer in the kernel keyring and systemd-cryptsetup tries it on
    the volumes still waiting (the same passphrase opens them all). That every volume was opened, and by
    passphrase, the callers check on the guest's side."""
    answered = len(boot.lines(r"boot: answered passphrase prompt"))
    if boot.builder == "dracut-systemd":
        assert 1 <= answered <= len(VOLUMES), boot.tail()
    else:
        assert answered == len(VOLUMES), boot.tail()


def assert_guard_held_every_volume_back(boot: Boot, failed: str) -> None:
    """The unlock pass opened nothing from the TPM because FAILED (a regex of names) did not open: every
    marked volume went to its passphrase prompt (the cross-volume guard, docs/security.md)."""
    boot.expect(rf"luks-tpm: not opened from the TPM: {failed}; by the cross-volume guard", "the guard's line")
    boot.reject(r"luks-tpm: \w+: opened$", "a volume was opened from the TPM")
    boot.expect(r"luks-tpm: unlock pass took [0-9.]+s \(exit 5\)", "luks-tpm exit status 5")
    boot.expect(r"^LUKSTPM-TPM-OPENED *$", "the pass recorded volumes it opened from the TPM")


@vm_cases("pcr-mismatch")
def test_pcr_mismatch_falls_back_to_passphrase(boot: Boot) -> None:
    # data2's PCR 16 no longer matches; the derived root and data1 would open, but the guard opens all or
    # none: every volume asks for its passphrase, which the runner types, and the boot completes.
    boot.expect(r"luks-tpm: data2: .*PCR", "data2 (sealed, PCR changed): no reason given")
    assert_guard_held_every_volume_back(boot, "data2")
    assert_asked_for_every_passphrase(boot)
    assert_booted_and_clean(boot)
    # The volumes opened by passphrase are open before the fence goes up.
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
        boot.expect(rf"luks-tpm: {name}: .*owner hierarchy was cleared", f"{name}: no clear message")
    assert_guard_held_every_volume_back(boot, "cryptroot, data1, data2")
    assert_asked_for_every_passphrase(boot)
    assert_booted_and_clean(boot)
    assert_fence_raised(boot)


@vm_cases("no-tpm")
def test_no_tpm_waits_bounded_then_falls_back(boot: Boot) -> None:
    boot.expect(r"luks-tpm: no TPM \(/dev/tpmrm0\) after 3s; falling back to passphrase", "no-TPM message")
    boot.reject(r"luks-tpm: unlock pass took", "luks-tpm ran without a TPM")
    assert_asked_for_every_passphrase(boot)
    assert_booted_and_clean(boot)
    # Nothing to fence, said once, and no second wait for the TPM.
    boot.expect(
        r"luks-tpm: no TPM \(/dev/tpmrm0\): fence NOT raised \(the unlock pass did not use the TPM\)",
        "no-TPM fence message",
    )
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
    # The legitimate initramfs cannot open the attacker's root from the TPM (no token): by the guard it
    # opens no volume from the TPM. The runner types the attacker's passphrase at every prompt: it opens
    # the attacker's root; at data1's it fails (cryptroot's three tries), and cryptroot gives up on the
    # rest. The attacker's init runs with the fence up and no genuine volume open.
    boot.expect(r"luks-tpm: cryptroot: ", "the attacker's root was not refused")
    assert_guard_held_every_volume_back(boot, "cryptroot")
    boot.expect(r"cryptsetup: cryptroot: set up successfully", "the attacker's root did not open")
    assert len(boot.lines(r"cryptsetup: ERROR: data1: cryptsetup failed, bad password")) == 3, boot.tail()
    boot.expect(r"cryptsetup: ERROR: data1: maximum number of tries exceeded", "cryptroot did not give up on data1")
    boot.reject(r"cryptsetup: data[12]: set up successfully", "a genuine data volume opened")
    boot.expect(r"^LUKSTPM: root filesystem reached", "the attacker's root was not reached")
    assert_fence_raised(boot)
    results = load_key_results(boot)
    assert sorted(results) == ["data1", "data2", "spare"]
    assert_load_key(results, "data1", fenced=True)
    assert_load_key(results, "data2", fenced=True)
    # The control: the same attack on an unfenced token works (this test can fail).
    assert_load_key(results, "spare", fenced=False)


@vm_cases("root-swap")
def test_root_swap_attacker_gets_no_volume_the_tpm_opened(boot: Boot) -> None:
    boot.expect(r"^LUKSTPM: root filesystem reached", "the attacker's root was not reached")
    boot.reject(r"^LUKSTPM-ATTACK-(READ|OPEN) ", "volumes opened by the TPM handed to the attacker's root")


@vm_cases("data-swap")
def test_data_swap_opens_nothing_from_the_tpm(boot: Boot) -> None:
    # data1 is the attacker's look-alike carrying the genuine token: the key it yields does not verify, so
    # the guard opens no volume from the TPM. The operator types the real passphrase for root and data2,
    # the attacker's for data1 (the runner does, at data1's prompt): every volume is then open by
    # passphrase, none by the TPM, which the fence accepts (no volume the TPM opened sits beside it).
    boot.expect(r"luks-tpm: data1: ", "the look-alike was not refused")
    assert_guard_held_every_volume_back(boot, "data1")
    answers = boot.lines(r"boot: answered passphrase prompt")
    assert len(answers) == len(VOLUMES), boot.tail()
    assert sum("(passphrase-data1)" in line for line in answers) == 1, answers
    assert_booted_and_clean(boot)  # data1 mounted: the attacker's file system, opened by the operator
    boot.reject(r"cross-volume guard: .* opened without the TPM", "the boot was stopped")
    assert_fence_raised(boot)


def assert_stopped_at_the_fence(boot: Boot) -> None:
    """The TPM died after the unlock pass: the fence could not be raised, the boot stopped before the
    root's init (no LUKSTPM line at all) and the VM powered off by itself (no timeout)."""
    boot.expect(r"luks-tpm: unlock pass took [0-9.]+s \(exit 0\)", "the unlock pass did not use the TPM")
    boot.expect(r"^boot: killed swtpm after", "the runner did not kill swtpm")
    boot.expect(
        r"luks-tpm: luks-tpm fence failed \(exit \d+\): the fence is NOT raised and this boot used the TPM", "stop"
    )
    boot.expect(r"luks-tpm: STOPPING THE BOOT: powering off in 5 seconds", "the stop line")
    boot.reject(r"^LUKSTPM", "the root's init ran")
    assert boot.status == 0, f"the VM did not power off (runner status {boot.status}): {boot.tail()}"
    boot.expect(r"^boot: VM stopped after", "the VM did not stop by itself")


@vm_cases("fence-failure")
def test_fence_failure_stops_the_boot(boot: Boot) -> None:
    assert_stopped_at_the_fence(boot)


@vm_cases("fence-optional")
def test_fence_optional_boots_on_and_says_so(boot: Boot) -> None:
    boot.expect(r"luks-tpm: unlock pass took [0-9.]+s \(exit 0\)", "the unlock pass did not use the TPM")
    boot.expect(r"^boot: killed swtpm after", "the runner did not kill swtpm")
    boot.expect(
        r"luks-tpm: luks-tpm fence failed \(exit \d+\): fence NOT raised; booting on because of "
        r"luks_tpm.fence=optional: keys of fenced tokens stay obtainable until reboot",
        "the console did not say why the boot goes on",
    )
    boot.reject(r"STOPPING THE BOOT", "the boot stopped")
    boot.expect(r"^LUKSTPM: root filesystem reached", "the root's init did not run")
    # The booted system sees it too: PCR 15 could not be read as fenced.
    boot.expect(r"^LUKSTPM-FAIL: fence-not-raised$", "the root saw a fence")
