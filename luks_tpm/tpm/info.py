"""What the TPM says about itself: manufacturer and firmware, and its dictionary-attack state."""

from __future__ import annotations

import dataclasses

from .context import Tpm
from .esys import lib


@dataclasses.dataclass(frozen=True)
class LockoutState:
    in_lockout: bool
    failures: int
    max_failures: int
    recovery_seconds: int  # seconds for one failure to be forgotten
    lockout_seconds: int  # lockoutRecovery: how long the lockout authorization stays blocked

    def describe(self) -> str:
        if self.in_lockout:
            return f"in lockout; one failure is forgotten every {self.recovery_seconds} s"
        left = max(self.max_failures - self.failures, 0)
        return f"{left} of {self.max_failures} tries left before lockout"


def lockout_state(tpm: Tpm) -> LockoutState:
    props = tpm.properties(lib.TPM2_PT_PERMANENT, 0x12)
    return LockoutState(
        in_lockout=bool(props.get(lib.TPM2_PT_PERMANENT, 0) & lib.TPMA_PERMANENT_INLOCKOUT),
        failures=props.get(lib.TPM2_PT_LOCKOUT_COUNTER, 0),
        max_failures=props.get(lib.TPM2_PT_MAX_AUTH_FAIL, 0),
        recovery_seconds=props.get(lib.TPM2_PT_LOCKOUT_INTERVAL, 0),
        lockout_seconds=props.get(lib.TPM2_PT_LOCKOUT_RECOVERY, 0),
    )


def identity(tpm: Tpm) -> dict[str, str]:
    # TPM2_PT_MANUFACTURER, VENDOR_STRING_1..4, FIRMWARE_VERSION_1..2 (Part 2, table 23);
    # the TSS names only some of them.
    props = tpm.properties(lib.TPM2_PT_MANUFACTURER, 8)

    def text(*keys: int) -> str:
        raw = b"".join(props.get(k, 0).to_bytes(4, "big") for k in keys)
        return raw.replace(b"\0", b"").decode("ascii", "replace").strip()

    fw1, fw2 = props.get(0x10B, 0), props.get(0x10C, 0)
    return {
        "manufacturer": text(0x105),
        "vendor": text(0x106, 0x107, 0x108, 0x109),
        "firmware": f"{fw1 >> 16}.{fw1 & 0xFFFF}.{fw2 >> 16}.{fw2 & 0xFFFF}",
    }
