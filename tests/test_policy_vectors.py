"""Fixed vectors for the policy digests of docs/policy.md, computed here in plain Python and checked
against the TPM's own trial sessions, so neither the vectors nor the documented rule can drift.

The reference below marshals everything by hand (hashlib and struct only). Every pinned digest is
also replayed on swtpm in a trial policy session with the same pcrDigest; and a trial session given
an empty pcrDigest makes the TPM hash the current PCR values itself, which checks the pcrDigest rule
(the policy session's hash, sha256, over the token bank's values) for every bank swtpm allocates.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_SE, TPM2_ST
from tpm2_pytss.types import TPM2B_DIGEST, TPM2B_NAME, TPM2B_NONCE, TPML_PCR_SELECTION, TPMT_TK_VERIFIED

from luks_tpm.model import Bank, PcrPolicy, approval_digest

from .fixtures_tpm import Swtpm
from .helpers import REPO

# TPM 2.0 Part 2: TPM_CC and TPM_ALG_ID values.
TPM_CC_POLICY_AUTH_VALUE = 0x0000016B
TPM_CC_POLICY_PCR = 0x0000017F
TPM_CC_POLICY_AUTHORIZE = 0x0000016A
# docs/policy.md: PolicyAuthorize's policyRef for approved boot states, and a fixed approver name
# (nameAlg SHA-256 and a digest) for the vectors.
POLICY_REF = b"luks-tpm approved boot state v1"
APPROVER = bytes.fromhex("000b") + hashlib.sha256(b"luks-tpm test approver").digest()
ALGORITHMS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C}
PCR_SELECT_SIZE = 3  # 24 PCRs: the size every TSS (and luks-tpm) sends
FENCE_PCR = 15
SESSION_HASH = "sha256"  # the policy session's hash, which is also the objects' nameAlg


def pcr_selection(bank: str, pcrs: Sequence[int]) -> bytes:
    """TPML_PCR_SELECTION with one TPMS_PCR_SELECTION: count, hash, sizeofSelect, bitmap (LSB = PCR 0)."""
    bitmap = bytearray(PCR_SELECT_SIZE)
    for index in pcrs:
        bitmap[index // 8] |= 1 << (index % 8)
    return struct.pack(">IHB", 1, ALGORITHMS[bank], PCR_SELECT_SIZE) + bytes(bitmap)


def pcr_digest(values: dict[int, bytes]) -> bytes:
    """The PolicyPCR pcrDigest: the SESSION's hash over the selected values, in ascending PCR order."""
    return hashlib.new(SESSION_HASH, b"".join(values[index] for index in sorted(values))).digest()


def policy_pcr(digest: bytes, bank: str, values: dict[int, bytes]) -> bytes:
    return hashlib.new(
        SESSION_HASH,
        digest + struct.pack(">I", TPM_CC_POLICY_PCR) + pcr_selection(bank, sorted(values)) + pcr_digest(values),
    ).digest()


def policy_auth_value(digest: bytes) -> bytes:
    return hashlib.new(SESSION_HASH, digest + struct.pack(">I", TPM_CC_POLICY_AUTH_VALUE)).digest()


@dataclass(frozen=True)
class Case:
    """A token's policy as docs/policy.md orders it: token PCRs, then the fence, then the PIN."""

    name: str
    bank: str
    values: dict[int, bytes]
    fence: bool = False
    pin: bool = False
    approver: bytes | None = None  # version 2: `values` are an approved state, not part of the digest

    def steps(self) -> list[tuple[str, dict[int, bytes]]]:
        steps: list[tuple[str, dict[int, bytes]]] = []
        if self.values and self.approver is None:
            steps.append((self.bank, self.values))
        if self.fence:
            steps.append(("sha256", {FENCE_PCR: bytes(32)}))
        return steps

    def reference(self) -> bytes:
        digest = bytes(32)  # a policy session starts from zeros of its hash's size
        if self.approver is not None:  # PolicyAuthorize resets the digest, then names the key and the ref
            digest = hashlib.sha256(bytes(32) + struct.pack(">I", TPM_CC_POLICY_AUTHORIZE) + self.approver).digest()
            digest = hashlib.sha256(digest + POLICY_REF).digest()
        for bank, values in self.steps():
            digest = policy_pcr(digest, bank, values)
        return policy_auth_value(digest) if self.pin else digest


SHA256_PCR7 = {7: bytes(range(0x00, 0x20))}
SHA384_PCR0_7 = {0: bytes(range(0x30, 0x60)), 7: bytes(range(0x60, 0x90))}
SHA1_PCR7 = {7: bytes(range(0xA0, 0xB4))}

CASES = [
    Case("no PCRs, no PIN", "sha256", {}),
    Case("PIN only", "sha256", {}, pin=True),
    Case("sha256 PCR 7", "sha256", SHA256_PCR7),
    Case("sha384 PCRs 0,7", "sha384", SHA384_PCR0_7),
    Case("sha1 PCR 7", "sha1", SHA1_PCR7),
    Case("sha256 PCR 7 at reset (zeros)", "sha256", {7: bytes(32)}),
    Case("sha256 PCR 7 + PIN", "sha256", SHA256_PCR7, pin=True),
    Case("fence only", "sha256", {}, fence=True),
    Case("sha256 PCR 7 + fence", "sha256", SHA256_PCR7, fence=True),
    Case("sha256 PCR 7 + fence + PIN", "sha256", SHA256_PCR7, fence=True, pin=True),
    Case("approved states", "sha256", SHA256_PCR7, approver=APPROVER),
    Case("approved states + fence", "sha256", SHA256_PCR7, fence=True, approver=APPROVER),
    Case("approved states + fence + PIN", "sha256", SHA256_PCR7, fence=True, pin=True, approver=APPROVER),
]
EXPECTED = {
    "no PCRs, no PIN": "0000000000000000000000000000000000000000000000000000000000000000",
    "PIN only": "8fcd2169ab92694e0c633f1ab772842b8241bbc20288981fc7ac1eddc1fddb0e",
    "sha256 PCR 7": "ef23ccc71b928bf66889c4390f780400ae6a7a091201becfffd13998660b40e3",
    "sha384 PCRs 0,7": "9e920b1f614fc9738d598bbba2cf9c5a95a2444d300e53e592cb3c7d523eed20",
    "sha1 PCR 7": "3147a0d7d259e63b6af8f5c36051e279edc35ae97f5cebebf6868a6b5418eb6e",
    "sha256 PCR 7 at reset (zeros)": "8b5682d81b29435d08d79278150611dc7e5923b2fefcce684a09577b40130a8b",
    "sha256 PCR 7 + PIN": "ac8a571c1a6143c8c3a9e6c0c7c08ecde425828516069d6b62ddef95ac74bbf2",
    "fence only": "7e247a603cd1052cabc095741b8ee2f7458aabeee960b8ec97d7f090171a039a",
    "sha256 PCR 7 + fence": "f9bebcf45d023c423cb0b3ec55a302819b941662d49e3b6976e6c586751a5f5c",
    "sha256 PCR 7 + fence + PIN": "33558b60aaf1ba581909d36f64436f7a9f31c344b7cb7c8dd21e39f83d4a9b38",
    "approved states": "d11f2eb2c2ba007f55a003f3a32019800c019c15636c7c7074344f770fb79d85",
    "approved states + fence": "0802584e204bfec2166ee69359631ef5e262fb0f8e78aa8f15305863a07ff1a0",
    "approved states + fence + PIN": "0c2aae9de18e58d8ff751a8b3a460abb017aa0529954837b9d90b9960681344f",
}
# What the approver signs for the state SHA256_PCR7 (aHash = H(approved policy || policyRef)).
APPROVAL_DIGEST = "9c4a75fdce38bae2408ade9fdd2a0f3717e3236581cc343e295aeef2aa1ea798"


@pytest.fixture
def esapi(swtpm: Swtpm) -> Iterator[ESAPI]:
    context = ESAPI(swtpm.tcti)
    try:
        yield context
    finally:
        context.close()


def trial_digest(
    esapi: ESAPI, steps: list[tuple[str, dict[int, bytes] | list[int]]], pin: bool, approver: bytes | None = None
) -> bytes:
    """The TPM's digest for the steps; a list of PCRs instead of values gives an empty pcrDigest. With an
    approver, PolicyAuthorize first (a trial session takes a NULL ticket)."""
    session = esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, "null", TPM2_ALG.SHA256)
    try:
        if approver is not None:
            ticket = TPMT_TK_VERIFIED(tag=TPM2_ST.VERIFIED, hierarchy=TPM2_RH.NULL)
            esapi.policy_authorize(
                session, TPM2B_DIGEST(bytes(32)), TPM2B_NAME(approver), ticket, policy_ref=TPM2B_NONCE(POLICY_REF)
            )
        for bank, values in steps:
            selection = TPML_PCR_SELECTION.unmarshal(pcr_selection(bank, sorted(values)))[0]
            given = pcr_digest(values) if isinstance(values, dict) else b""
            esapi.policy_pcr(session, given, selection)
        if pin:
            esapi.policy_auth_value(session)
        return bytes(esapi.policy_get_digest(session))
    finally:
        esapi.flush_context(session)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_reference_gives_the_pinned_digest(case: Case) -> None:
    assert case.reference().hex() == EXPECTED[case.name]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_tpm_trial_session_gives_the_pinned_digest(esapi: ESAPI, case: Case) -> None:
    steps: list[tuple[str, dict[int, bytes] | list[int]]] = list(case.steps())
    assert trial_digest(esapi, steps, case.pin, case.approver).hex() == EXPECTED[case.name]


@pytest.mark.parametrize("bank", sorted(ALGORITHMS))
def test_pcr_digest_uses_the_session_hash_over_the_banks_values(esapi: ESAPI, bank: str) -> None:
    """Given no pcrDigest, the TPM hashes the current values itself: the rule, straight from the TPM."""
    pcrs = [0, 7, 16]
    _, _, digests = esapi.pcr_read(TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, pcrs))}"))
    if digests.count != len(pcrs):  # an unallocated bank reads back as no values
        pytest.skip(f"this swtpm has no {bank} PCR bank allocated")
    values = {index: bytes(digest) for index, digest in zip(pcrs, digests.digests[0 : digests.count], strict=True)}
    assert all(len(value) == len(hashlib.new(bank).digest()) for value in values.values())
    from_tpm = trial_digest(esapi, [(bank, pcrs)], pin=False)
    assert from_tpm == policy_pcr(bytes(32), bank, values)
    if bank != SESSION_HASH:  # the bank's own hash would be the wrong rule, and the TPM shows it
        wrong = hashlib.new(bank, b"".join(values[i] for i in pcrs)).digest()
        assert (
            from_tpm
            != hashlib.sha256(
                bytes(32) + struct.pack(">I", TPM_CC_POLICY_PCR) + pcr_selection(bank, pcrs) + wrong
            ).digest()
        )


@pytest.mark.parametrize(
    ("bank", "pcrs"),
    [("sha256", [7]), ("sha384", [0, 7]), ("sha1", [7]), ("sha256", [15]), ("sha256", [0, 2, 4, 7, 9, 11, 14, 23])],
)
def test_tss_marshals_the_selection_as_the_reference(bank: str, pcrs: list[int]) -> None:
    """luks-tpm builds selections with TPML_PCR_SELECTION.parse: the bytes hashed must be these."""
    assert TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, pcrs))}").marshal() == pcr_selection(bank, pcrs)


def test_fence_value_is_the_documented_one() -> None:
    """`luks-tpm fence` extends PCR 15 with H_bank("luks-tpm fence v1"); a fenced policy wants it zero."""
    assert hashlib.sha256(b"luks-tpm fence v1").hexdigest() in (REPO / "docs" / "policy.md").read_text()


def test_docs_show_these_vectors() -> None:
    text = (REPO / "docs" / "policy.md").read_text()
    shown = set(re.findall(r"\b[0-9a-f]{64}\b", text))
    missing = [name for name, digest in EXPECTED.items() if digest not in shown]
    assert not missing, f"docs/policy.md lacks the digests of: {missing}"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_the_package_computes_the_pinned_digest(case: Case) -> None:
    """luks_tpm.model checks every token's `policy` against its fields with its own computation."""
    policy = PcrPolicy(Bank(case.bank), tuple(sorted(case.values)), case.values, case.pin, case.fence, case.approver)
    assert policy.digest().hex() == EXPECTED[case.name]


def test_the_approval_digest_is_the_documented_one() -> None:
    """What an approver signs for a state: H(the state's PolicyPCR digest || policyRef)."""
    approved = policy_pcr(bytes(32), "sha256", SHA256_PCR7)
    assert hashlib.sha256(approved + POLICY_REF).hexdigest() == APPROVAL_DIGEST
    policy = PcrPolicy(Bank.SHA256, (7,), SHA256_PCR7, approver=APPROVER)
    assert policy.approved_digest() == approved and approval_digest(approved).hex() == APPROVAL_DIGEST
    assert APPROVAL_DIGEST in (REPO / "docs" / "policy.md").read_text()
