"""PCRs and policies: read PCRs, compute policy digests in trial sessions, satisfy them, raise the fence.

A binding's policy (docs/policy.md) is, in this order: PolicyPCR over the token's bank and PCRs,
PolicyPCR over sha256 PCR 15 = zeros when it is fenced, PolicyAuthValue when it has a PIN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import Cause, ExitCode, LuksTpmError, die
from ..model import FENCE_BANK, FENCE_DOWN, FENCE_MESSAGE, FENCE_PCR, Bank, PcrPolicy
from .authorize import authorize, trial_ticket
from .context import Tpm
from .esys import ffi, lib
from .responses import tpm_errors

_SELECT_BYTES = 3  # PCRs 0-23, the size every PC client TPM takes (and what policy digests hash)


def selection(bank: Bank, pcrs: Sequence[int]) -> Any:
    """A TPML_PCR_SELECTION of one bank."""
    selection = ffi.new("TPML_PCR_SELECTION *")
    selection.count = 1
    entry = selection.pcrSelections[0]
    entry.hash, entry.sizeofSelect = bank.algorithm, _SELECT_BYTES
    for index in pcrs:
        entry.pcrSelect[index // 8] |= 1 << (index % 8)
    return selection


def pcr_values(tpm: Tpm, bank: Bank, pcrs: Sequence[int]) -> dict[int, bytes]:
    values: dict[int, bytes] = {}
    remaining = sorted(set(pcrs))
    while remaining:  # PCR_Read returns at most 8 values per call
        with tpm_errors("reading PCRs"):
            returned, digests = tpm.esys.pcr_read(selection(bank, remaining))
        got = [
            index
            for sel in returned.pcrSelections[0 : returned.count]
            for index in range(sel.sizeofSelect * 8)
            if sel.pcrSelect[index // 8] & (1 << (index % 8))
        ]
        if not got:
            die(
                f"the TPM has no {bank} PCR bank",
                hint="enable it in the firmware's TPM settings, or bind to a bank the TPM has (enroll and reseal "
                "--pcr-bank; `luks-tpm doctor` lists them)",
                code=ExitCode.UNSUPPORTED,
                cause=Cause.UNSUPPORTED,
            )
        for index, digest in zip(got, digests.digests[0 : digests.count], strict=True):
            values[index] = bytes(ffi.buffer(digest.buffer, digest.size))
        remaining = [index for index in remaining if index not in values]
    return values


def pcr_banks(tpm: Tpm) -> list[Bank]:
    """Banks with at least one PCR allocated."""
    with tpm_errors("reading the PCR banks"):
        data = tpm.esys.get_capability(lib.TPM2_CAP_PCRS, 0, 16)
    by_algorithm = {bank.algorithm: bank for bank in Bank}
    return [
        by_algorithm[int(selection.hash)]
        for selection in data.data.assignedPCR.pcrSelections[0 : data.data.assignedPCR.count]
        if int(selection.hash) in by_algorithm and any(selection.pcrSelect[0 : selection.sizeofSelect])
    ]


def apply_policy(tpm: Tpm, session: Any, policy: PcrPolicy, *, trial: bool, ticket: Any = None) -> None:
    """Run the policy's commands in `session` (docs/policy.md). In a real session PolicyPCR gets an empty
    digest, which makes the TPM use the PCRs' current values (a mismatch then fails the command the policy
    guards). With an approver, `ticket` is the approval's (authorize.Tickets); a trial takes none."""
    with tpm_errors("applying the PCR policy"):
        if policy.pcrs:
            tpm.esys.policy_pcr(session, policy.pcr_digest if trial else b"", selection(policy.bank, policy.pcrs))
    if policy.approver is not None:
        authorize(tpm, session, policy, ticket if ticket is not None else trial_ticket())
    with tpm_errors("applying the PCR policy"):
        if policy.fence:
            tpm.esys.policy_pcr(session, FENCE_DOWN.pcr_digest if trial else b"", selection(FENCE_BANK, (FENCE_PCR,)))
        if policy.pin:
            tpm.esys.policy_auth_value(session)


def restart_policy(tpm: Tpm, session: Any) -> None:
    with tpm_errors("restarting the policy session"):
        tpm.esys.policy_restart(session)


def policy_digest(tpm: Tpm, policy: PcrPolicy) -> bytes:
    """The policy's digest, computed by the TPM itself in a trial session."""
    with tpm.trial_session() as session:
        apply_policy(tpm, session, policy, trial=True)
        with tpm_errors("computing the policy digest"):
            return tpm.esys.policy_get_digest(session)


def fence_is_up(tpm: Tpm) -> bool:
    try:
        return pcr_values(tpm, FENCE_BANK, [FENCE_PCR])[FENCE_PCR] != bytes(FENCE_BANK.size)
    except LuksTpmError as error:
        if error.cause is not Cause.UNSUPPORTED:
            raise
        raise LuksTpmError(
            f"the TPM has no {FENCE_BANK} PCR bank, which the fence (PCR {FENCE_PCR} of that bank) needs",
            hint=f"enable the {FENCE_BANK} bank in the firmware's TPM settings",
            code=ExitCode.UNSUPPORTED,
            cause=Cause.UNSUPPORTED,
        ) from None


def raise_fence(tpm: Tpm) -> list[Bank]:
    """Extend PCR 15 in every allocated bank with the bank's hash of FENCE_MESSAGE; the banks extended."""
    banks = pcr_banks(tpm)
    digests = ffi.new("TPML_DIGEST_VALUES *")
    digests.count = len(banks)
    for index, bank in enumerate(banks):
        value = digests.digests[index]
        value.hashAlg = bank.algorithm
        digest = bank.hash(FENCE_MESSAGE)
        ffi.memmove(value.digest.sha512, digest, len(digest))  # the union's members share one buffer
    with tpm_errors("extending PCR 15"):
        tpm.esys.pcr_extend(lib.ESYS_TR_PCR0 + FENCE_PCR, digests)
    return banks
