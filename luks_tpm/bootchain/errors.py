"""The bootchain library's exceptions: each carries one line for the user and, where it helps, a hint.

The library is self-contained (no luks_tpm.errors import) so the lead can map these to
`LuksTpmError` causes and exit codes where the `predict` command is wired in.
"""

from __future__ import annotations

import enum


class BootchainError(Exception):
    """Base class: `str(error)` is one line; `hint` says what to do about it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class EventLogError(BootchainError):
    """The event log is damaged, truncated or not a crypto-agile TCG2 log."""


class ReplayMismatch(BootchainError):
    """Replaying the log does not give the TPM's current PCR values: the log cannot be trusted."""

    def __init__(self, differing: tuple[tuple[str, int], ...]) -> None:
        names = ", ".join(f"{bank}:{pcr}" for bank, pcr in differing)
        super().__init__(
            f"the event log does not reproduce the current PCRs ({names})",
            hint="the log is incomplete or something extended PCRs without logging; nothing can be predicted",
        )
        self.differing = differing


class PEFormatError(BootchainError):
    """The input is not a PE/COFF image whose Authenticode hash can be computed."""


class Reason(enum.StrEnum):
    """Why the next boot's PCRs cannot be predicted (callers branch on this, never on message text)."""

    UNKNOWN_EVENT = "unknown-event"  # an event inside the regenerated part that the emulation does not make
    UNMODELLED_CONFIG = "unmodelled-config"  # a grub.cfg construct or command the emulation does not model
    EMULATION_MISMATCH = "emulation-mismatch"  # the emulation over the booted inputs does not give the log
    BOOTED_INPUTS_GONE = "booted-inputs-gone"  # a booted config file is neither on disk nor in a snapshot
    MISSING_FILE = "missing-file"  # a file the next boot reads is not there
    SHIM_CHANGED = "shim-changed"  # a new shim whose SbatLevel or measurements cannot be derived
    GRUB_CHANGED = "grub-changed"  # a GRUB build the emulation does not model (not Debian's 2.06-13)
    OTHER_AUTHORITY = "other-authority"  # a binary not signed under an authority the log shows
    BAD_SIGNATURE = "bad-signature"  # a kernel changed after signing, or a signature that does not verify
    SBAT_REVOKED = "sbat-revoked"  # shim would refuse the new binary (SBAT generation below SbatLevel)
    REVOKED = "revoked"  # the new binary's hash is in dbx: firmware or shim would refuse it
    NOT_GRUB_BOOT = "not-grub-boot"  # the log is not of a firmware -> shim -> GRUB boot


class Unpredictable(BootchainError):
    """The next boot's PCR values cannot be predicted; `reason` says why (never a guess)."""

    def __init__(self, reason: Reason, detail: str, *, hint: str | None = None) -> None:
        super().__init__(f"next boot's PCRs are unpredictable ({reason}): {detail}", hint=hint)
        self.reason = reason
        self.detail = detail
