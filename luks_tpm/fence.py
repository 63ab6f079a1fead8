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
    # PCR 15 of the sha256 bank afterwards, hex; None on a TPM without that bank, where no token can be
    # fenced (fenced policies name sha256 PCR 15), and the other banks' PCR 15 is extended all the same.
    sha256: str | None

    def lines(self) -> list[str]:
        raised = (
            f"fence raised: PCR {self.pcr} extended in {', '.join(map(str, self.banks))}; fenced tokens cannot be "
            "recovered until the next boot"
        )
        if self.sha256 is not None:
            return [raised]
        return [f"{raised} (this TPM has no {FENCE_BANK} bank, so none of its tokens can be fenced)"]


def raise_fence(tcti: str) -> Report:
    with Tpm(tcti) as tpm:
        banks = tpm_pcr.raise_fence(tpm)
        value = tpm_pcr.pcr_values(tpm, FENCE_BANK, [FENCE_PCR])[FENCE_PCR] if FENCE_BANK in banks else None
    return Report(FenceRaised("up", FENCE_PCR, tuple(banks), None if value is None else value.hex()))
