"""`luks-tpm fence`: extend PCR 15 so that no fenced token can be recovered until the next boot."""

from __future__ import annotations

import dataclasses

from .model import FENCE_BANK, FENCE_PCR, Bank
from .output import Report
from .tpm import Tpm
from .tpm import pcr as tpm_pcr


@dataclasses.dataclass(frozen=True)
class FenceRaised:
    fence: str  # always "up": raised now, or raised again
    pcr: int
    banks: tuple[Bank, ...]
    sha256: str  # PCR 15 of the sha256 bank afterwards, hex

    def lines(self) -> list[str]:
        return [
            f"fence raised: PCR {self.pcr} extended in {', '.join(map(str, self.banks))}; fenced tokens cannot be "
            "recovered until the next boot"
        ]


def raise_fence(tcti: str) -> Report:
    with Tpm(tcti) as tpm:
        banks = tpm_pcr.raise_fence(tpm)
        value = tpm_pcr.pcr_values(tpm, FENCE_BANK, [FENCE_PCR])[FENCE_PCR]
    return Report(FenceRaised("up", FENCE_PCR, tuple(banks), value.hex()))
