"""luks-tpm builds its key templates and PCR selections as raw ESYS structs (luks_tpm/tpm/templates.py,
pcr.py); tpm2-pytss's own builders are the reference. The derived primary's template is a contract: a
changed byte would make every derived binding in the field derive a different key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPML_PCR_SELECTION
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from luks_tpm.model import Bank
from luks_tpm.tpm import esys, templates
from luks_tpm.tpm.pcr import selection

from .helpers import REPO

POLICY = bytes(range(32))


def wire(template: object) -> str:
    return esys.marshal("TPM2B_PUBLIC", template).hex()


def reference_derived(policy: bytes) -> TPM2B_PUBLIC:
    attributes = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.NODA
        | (0 if policy else TPMA_OBJECT.USERWITHAUTH)
    )
    template = TPM2B_PUBLIC.parse("hmac:sha256", nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
    template.publicArea.authPolicy = policy
    template.publicArea.unique.keyedHash = templates.DERIVED_PRIMARY_UNIQUE
    return template


@pytest.mark.parametrize("policy", [b"", POLICY], ids=["no-policy", "policy"])
def test_derived_primary_template_is_the_contract(policy: bytes) -> None:
    assert wire(templates.derived_primary(policy)) == reference_derived(policy).marshal().hex()


def test_derived_primary_template_bytes_are_pinned() -> None:
    # The wire form of the unbound template (docs/derivation.md): keyedhash, sha256 name, attributes
    # fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|sign, no policy, HMAC-SHA256, unique.
    assert wire(templates.derived_primary(b"")) == (
        "0030" "0008" "000b" "00040472" "0000" "0005" "000b" "0020" + templates.DERIVED_PRIMARY_UNIQUE.hex()
    )  # fmt: skip
    assert templates.DERIVED_PRIMARY_UNIQUE.hex() == "4e198c68252156ebf53bf06bff167dd39c4bc6c39fc8f94355013bcc4b22a374"


@pytest.mark.parametrize("pin", [False, True], ids=["no-pin", "pin"])
def test_sealed_object_template(pin: bool) -> None:
    attributes = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | (0 if pin else TPMA_OBJECT.NODA)
    reference = TPM2B_PUBLIC.parse("keyedhash", nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
    reference.publicArea.authPolicy = POLICY
    assert wire(templates.sealed_object(POLICY, pin=pin)) == reference.marshal().hex()


def test_srk_template_is_the_standard_one() -> None:
    attributes = templates.SRK_ATTRIBUTES
    reference = TPM2B_PUBLIC.parse("ecc256:aes128cfb", nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
    assert wire(templates.srk()) == reference.marshal().hex()


def test_endorsement_key_template_is_the_tcg_low_range_ecc_one() -> None:
    def no_nv_template(index: int) -> bytes:
        raise NoSuchIndex(index)

    _, reference = create_ek_template("EK-ECC256", no_nv_template)
    assert wire(templates.endorsement_key()) == reference.marshal().hex()


@pytest.mark.parametrize("bank", list(Bank), ids=str)
@pytest.mark.parametrize("pcrs", [[0], [7], [0, 2, 4, 7, 15, 23]], ids=str)
def test_pcr_selection_matches_tpm2_pytss(bank: Bank, pcrs: list[int]) -> None:
    reference = TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, pcrs))}")
    assert esys.marshal("TPML_PCR_SELECTION", selection(bank, pcrs)) == reference.marshal()


def test_the_unlock_path_loads_neither_tpm2_pytss_classes_nor_cryptography() -> None:
    code = (
        "import sys\nimport luks_tpm.activation, luks_tpm.unlock, luks_tpm.requestkey, luks_tpm.tpm.keys\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('tpm2_pytss', 'cryptography'))))"
    )
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    # tpm2-pytss's compiled binding, and nothing of its Python package or of cryptography
    assert set(result.stdout.split()) == {"tpm2_pytss._libtpm2_pytss", "tpm2_pytss._libtpm2_pytss.lib"}
