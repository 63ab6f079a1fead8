"""The example tokens of docs/token-format.md are real: each reads as undamaged, and each one's `policy` is
what luks-tpm computes from its fields and what the sealed object's public area carries."""

from __future__ import annotations

import base64
import json
import re

import pytest

from luks_tpm.tokenformat import SealedToken, parse

from .helpers import REPO

EXAMPLES = [
    block
    for block in re.findall(r"```json\n(.*?)```", (REPO / "docs" / "token-format.md").read_text(), re.DOTALL)
    if '"type": "luks-tpm"' in block
]


def test_the_page_has_examples_of_both_versions() -> None:
    assert {json.loads(block)["version"] for block in EXAMPLES} == {1, 2}


@pytest.mark.parametrize("block", EXAMPLES, ids=[f"example-{n}" for n in range(len(EXAMPLES))])
def test_example_reads_and_its_policy_is_its_fields(block: str) -> None:
    token = parse(json.dumps(json.loads(block)), 0)  # raises on any damage
    if token.policy:
        assert token.pcr_policy(pin=isinstance(token, SealedToken) and token.pin).digest() == token.policy
    if isinstance(token, SealedToken):
        public = token.blob.public
        assert public[12:44] == token.policy  # TPM2B size, type, nameAlg, objectAttributes, then authPolicy
        assert base64.b64decode(json.loads(block)["blob"]["public"]) == public
