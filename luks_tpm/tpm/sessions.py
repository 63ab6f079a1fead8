"""Sessions salted with an SRK for the commands that carry key material, shared across one pass.

Every HMAC, Unseal and Create whose parameters are key material runs in a session salted with the SRK
the token names, encrypting commands and responses (AES-128-CFB). Over a pass of many volumes one
session per SRK and kind serves every command; for a single command the TPM ends the session itself
(continueSession clear), which saves a FlushContext. A policy session that a command used successfully
is reset by the TPM (TPM 2.0 Part 1, policy sessions); one whose command failed still holds its policy,
so PolicyRestart is sent before its next use, and only then.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from ..model import PcrPolicy
from .context import Tpm
from .esys import lib
from .pcr import apply_policy, restart_policy
from .responses import TpmError


@dataclasses.dataclass(frozen=True)
class SessionUse:
    """A session for one command, and whether that command is its last (then the TPM ends it on success)."""

    handle: Any
    last: bool


class Sessions:
    """The salted sessions of one pass; close() flushes those still loaded."""

    def __init__(self, tpm: Tpm, *, reuse: bool) -> None:
        self.tpm = tpm
        self._reuse = reuse
        self._stack = ExitStack()
        self._open: dict[tuple[Any, bool], Any] = {}  # (SRK handle, policy?) -> session
        self._holding_policy: set[Any] = set()  # policy sessions whose policy no successful command consumed

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def _take(self, srk: Any, *, policy: bool) -> SessionUse:
        key = (srk, policy)
        if key not in self._open:
            kind = lib.TPM2_SE_POLICY if policy else lib.TPM2_SE_HMAC
            session = self._stack.enter_context(self.tpm.session(kind, salt_key=srk))
            if not self._reuse:
                return SessionUse(session, last=True)
            self._open[key] = session
        return SessionUse(self._open[key], last=False)

    @contextmanager
    def _released_on_failure(self, use: SessionUse) -> Iterator[SessionUse]:
        try:
            yield use
        except TpmError:
            if use.last:  # the TPM did not end it: free its slot before the next token tries
                self.tpm.release(use.handle)
            raise

    @contextmanager
    def hmac(self, srk: Any) -> Iterator[SessionUse]:
        """A salted HMAC session for one command."""
        with self._released_on_failure(self._take(srk, policy=False)) as use:
            yield use

    @contextmanager
    def policy(self, srk: Any, policy: PcrPolicy, ticket: Any = None) -> Iterator[SessionUse]:
        """A salted policy session in which `policy` was just applied (with an approver: authorized by
        `ticket`), for one command."""
        use = self._take(srk, policy=True)
        with self._released_on_failure(use):
            if use.handle in self._holding_policy:
                restart_policy(self.tpm, use.handle)
            self._holding_policy.add(use.handle)
            apply_policy(self.tpm, use.handle, policy, trial=False, ticket=ticket)
            yield use
            self._holding_policy.discard(use.handle)  # reached only when the command succeeded
