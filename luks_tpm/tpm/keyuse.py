"""The TPM's key operations for one pass over one or many volumes.

The derived primary's HMAC and Unseal, each in a session salted with the SRK the token names and with
the token's policy applied. Over a pass of many volumes the sessions, the derived primaries (one per
policy) and PCR reads are shared; for one volume each is made for its command and ended at once.
`close()` flushes everything it made.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, closing
from typing import Any, Self

from ..model import ApprovedState, Bank, ImportedSeal, Parent, PcrPolicy, SealedBlob
from ..secret import Secret
from . import importparent, keys, pcr, srk
from .authorize import Tickets
from .context import Tpm
from .sessions import Sessions


class KeyUse:
    def __init__(self, tpm: Tpm, *, many_volumes: bool = False) -> None:
        """`many_volumes`: sessions, primaries and PCR reads serve every volume of the pass."""
        self.tpm = tpm
        self._many = many_volumes
        self._stack = ExitStack()
        self._sessions = self._stack.enter_context(closing(Sessions(tpm, reuse=many_volumes)))
        self._primaries: dict[bytes, Any] = {}  # policy digest -> derived primary
        self._pcrs: dict[tuple[Bank, tuple[int, ...]], dict[int, bytes]] = {}
        self._tickets = Tickets(tpm)
        self._import_parent: tuple[Any, Parent] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._primaries.clear()

    def srk(self, parent: Parent, endorsement: bytes | None, *, imported: bool = False) -> Any:
        """The parent a binding was made with: the SRK (srk.srk_for), or for a token sealed elsewhere for
        this TPM the import parent; refuses another TPM's or a cleared one's."""
        if not imported:
            return srk.srk_for(self.tpm, parent, endorsement)
        handle, found = self.import_parent()
        if found.name != parent.name:
            raise srk.mismatch(self.tpm, endorsement)
        return handle

    def import_parent(self) -> tuple[Any, Parent]:
        """This TPM's import parent, made once per pass."""
        if self._import_parent is None:
            self._import_parent = importparent.create(self.tpm)
        return self._import_parent

    def pcr_values(self, bank: Bank, pcrs: Sequence[int]) -> dict[int, bytes]:
        """PCR values, read once per pass over many volumes (they mostly share their PCRs). Only used to
        name what changed before asking the TPM, whose own policy check decides."""
        key = (bank, tuple(pcrs))
        if key not in self._pcrs:
            values = pcr.pcr_values(self.tpm, bank, pcrs)
            if not self._many:
                return values
            self._pcrs[key] = values
        return self._pcrs[key]

    def fence_is_up(self) -> bool:
        return pcr.fence_is_up(self.tpm)

    def _primary(self, policy_digest: bytes) -> Any:
        if policy_digest not in self._primaries:
            self._primaries[policy_digest] = self._stack.enter_context(keys.derived_primary(self.tpm, policy_digest))
        return self._primaries[policy_digest]

    def _ticket(self, policy: PcrPolicy, approved: ApprovedState | None) -> Any:
        if policy.approver is None:
            return None
        assert approved is not None, "a policy with an approver is satisfied with an approval"
        return self._tickets.ticket(approved.approver.public, approved.approval, policy.approved_digest())

    def hmac(
        self,
        srk_handle: Any,
        message: bytes,
        policy: PcrPolicy | None,
        policy_digest: bytes = b"",
        approved: ApprovedState | None = None,
    ) -> Secret:
        """TPM2_HMAC of `message` by the derived primary whose template carries `policy_digest`, in a
        salted session (a policy session satisfying `policy`, when the primary has one)."""
        primary = self._primary(policy_digest)
        if policy is None:
            with self._sessions.hmac(srk_handle) as session:
                return keys.hmac(self.tpm, primary, message, session)
        with self._sessions.policy(srk_handle, policy, self._ticket(policy, approved)) as session:
            return keys.hmac(self.tpm, primary, message, session)

    def unseal(
        self,
        srk_handle: Any,
        blob: SealedBlob | ImportedSeal,
        policy: PcrPolicy,
        pin: Secret | None,
        approved: ApprovedState | None = None,
    ) -> Secret:
        with self._sessions.policy(srk_handle, policy, self._ticket(policy, approved)) as session:
            return keys.unseal(self.tpm, blob, srk_handle, pin, session)
