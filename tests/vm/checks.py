"""Checks on a boot's console shared by the VM tests: what a good boot shows (every volume open by keyring
reference, mounted, nothing leaked, the fence raised once), and what the booted system could still
recover from the TPM (images/rootfs-init's LUKSTPM-* markers)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .machine import VOLUMES, Boot

# PCR 15 (sha256) after exactly one fence, from zero: the contract's extend value (docs, decisions).
FENCED_PCR15 = hashlib.sha256(bytes(32) + hashlib.sha256(b"luks-tpm fence v1").digest()).hexdigest()
FENCED = ("cryptroot", "data1", "data2")
# images/mksystem's disks, in the order the runner attaches them
DEVICES = {"/dev/vda": "cryptroot", "/dev/vdb": "data1", "/dev/vdc": "data2", "/dev/vdd": "spare"}


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
