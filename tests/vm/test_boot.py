"""Boot a real Debian kernel under QEMU with swtpm as its TPM and our initramfs integration.

Each case is (scenario, builder): see conftest.SCENARIOS and conftest.BUILDERS. The test system has three
LUKS2 volumes (root `cryptroot` and data1 with derived tokens, data2 with a token sealed to PCR 16), all
marked x-luks-tpm in crypttab. The guest's /sbin/init (images/rootfs-init) prints LUKSTPM-* markers:
the dm tables, mounts, and the hygiene checks (key material in /run, /tmp, /proc/cmdline, environments;
logon keys left in /proc/keys), then powers off.
"""

from __future__ import annotations

import pytest

from .machine import VOLUMES, Boot, VmRunner

pytestmark = pytest.mark.vm

ALL_BUILDERS = ("initramfs-tools", "dracut", "dracut-systemd")
# The systemd initrd is the slowest boot; it runs the unattended and one fallback case.
CASES = [
    *[("unattended", b) for b in ALL_BUILDERS],
    *[("pcr-mismatch", b) for b in ALL_BUILDERS],
    *[("owner-cleared", b) for b in ("initramfs-tools", "dracut")],
    ("no-tpm", "initramfs-tools"),
]


def case_id(case: tuple[str, str]) -> str:
    return "-".join(case)


@pytest.fixture
def boot(vm: VmRunner, vm_case: tuple[str, str]) -> Boot:
    return vm.result(*vm_case)


def vm_cases(*scenarios: str) -> pytest.MarkDecorator:
    selected = [case for case in CASES if case[0] in scenarios]
    return pytest.mark.parametrize("vm_case", selected, ids=[case_id(c) for c in selected])


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


@vm_cases("unattended")
def test_unattended_unlock_in_one_pass(boot: Boot) -> None:
    for name in VOLUMES:
        boot.expect(rf"luks-tpm: {name}: opened$", f"{name} not opened by luks-tpm")
    assert len(boot.lines(r"luks-tpm: unlock pass took")) == 1, "expected exactly one unlock pass"
    boot.expect(r"luks-tpm: unlock pass took [0-9.]+s \(exit 0\)", "luks-tpm exit status")
    boot.reject(r"boot: answered passphrase prompt", "a passphrase was asked for")
    assert_booted_and_clean(boot)


@vm_cases("pcr-mismatch")
def test_pcr_mismatch_falls_back_to_passphrase(boot: Boot) -> None:
    boot.expect(r"luks-tpm: cryptroot: opened$", "cryptroot (derived) not opened by luks-tpm")
    boot.expect(r"luks-tpm: data1: opened$", "data1 (derived) not opened by luks-tpm")
    boot.expect(r"luks-tpm: data2: .*falling back to passphrase", "data2 (sealed, PCR changed) no fallback")
    boot.expect(r"luks-tpm: unlock pass took [0-9.]+s \(exit 5\)", "luks-tpm exit status 5")
    # The runner types the passphrase at the prompt: exactly one, for data2.
    assert len(boot.lines(r"boot: answered passphrase prompt")) == 1, boot.tail()
    assert_booted_and_clean(boot)


@vm_cases("owner-cleared")
def test_owner_cleared_says_so_and_falls_back(boot: Boot) -> None:
    for name in VOLUMES:
        boot.expect(
            rf"luks-tpm: {name}: .*owner hierarchy was cleared.*falling back to passphrase", f"{name}: no clear message"
        )
    boot.expect(r"luks-tpm: unlock pass took [0-9.]+s \(exit 5\)", "luks-tpm exit status 5")
    assert len(boot.lines(r"boot: answered passphrase prompt")) == len(VOLUMES), boot.tail()
    assert_booted_and_clean(boot)
    assert boot.seconds < 150, f"fallback took {boot.seconds:.0f}s"


@vm_cases("no-tpm")
def test_no_tpm_waits_bounded_then_falls_back(boot: Boot) -> None:
    boot.expect(r"luks-tpm: no TPM \(/dev/tpmrm0\) after 3s; falling back to passphrase", "no-TPM message")
    boot.reject(r"luks-tpm: unlock pass took", "luks-tpm ran without a TPM")
    assert len(boot.lines(r"boot: answered passphrase prompt")) == len(VOLUMES), boot.tail()
    assert_booted_and_clean(boot)
