"""Fixed vectors for the software half of application keys (docs/derivation.md, "Application keys").

The TPM half (PRK = TPM2_HMAC of the unbound derived primary over `message`) cannot be pinned: no
swtpm state can be made from a known seed. What follows it is deterministic: given a PRK, the key is
HKDF-Expand-SHA256 with the documented info. The reference here is written from the documentation with
hmac alone and cross-checked against cryptography's HKDF-Expand; any implementation in luks_tpm must
reproduce these bytes, and a change to the domain is a contract change (docs/README.md).
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .helpers import REPO

NAME = re.compile(r"[A-Za-z0-9._@+:-]{1,200}")
MIN_LENGTH, MAX_LENGTH = 16, 64


def message(uid: int, name: str) -> bytes:
    """What the TPM's HMAC key is applied to: "luks-tpm/app/v1" NUL uid NUL name."""
    return b"luks-tpm/app/v1\0" + str(uid).encode("ascii") + b"\0" + name.encode("ascii")


def info(uid: int, name: str, length: int) -> bytes:
    return (
        b"luks-tpm application key\0"
        + str(uid).encode("ascii")
        + b"\0"
        + name.encode("ascii")
        + length.to_bytes(2, "big")
    )


def expand(prk: bytes, uid: int, name: str, length: int) -> bytes:
    """HKDF-Expand (RFC 5869 section 2.3): T(i) = HMAC(PRK, T(i-1) | info | i), first `length` bytes."""
    assert MIN_LENGTH <= length <= MAX_LENGTH and NAME.fullmatch(name) and 0 <= uid < 2**32 - 1
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info(uid, name, length) + bytes([counter]), "sha256")
        okm += block
    return okm[:length]


PRK = bytes.fromhex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")


@dataclass(frozen=True)
class Vector:
    uid: int
    name: str
    length: int
    key: str


VECTORS = [
    Vector(0, "myservice", 32, "90f2b2201ed2161dd005b9f8813fc0e2786324a8f596f11b5352e568dd4f6ba8"),
    Vector(1000, "myservice", 32, "7f862737815e49ccd456ea315b904307fabe18202dd00d6e3e1b9dca66a9e50c"),
    Vector(1000, "myservice", 16, "f9f53f185db8369b29fbfeb007145f60"),
    Vector(
        1000,
        "myservice",
        64,
        "19465b024c1ec12294411c4e46c6f9ef45d7b8ea6657e5d43fe1e6b96bfd42f3"
        "f48ddc472b29e35e709c2907c5a973bd2873cb1a938469859dd36d19a9f3aef6",
    ),
    Vector(
        65534,
        "backup@host:v2.1+x_y-z",
        48,
        "013b957f656145e5d1cf54952e852c2001ba6116689cf05968fa64667b66d49b2d84cbf715512cc8456318132bd54d56",
    ),
    Vector(4294967294, "a", 16, "911f722ab9622087414e0b7161a0732c"),
]


@pytest.mark.parametrize("vector", VECTORS, ids=[f"{v.uid}-{v.name}-{v.length}" for v in VECTORS])
def test_vector(vector: Vector) -> None:
    key = expand(PRK, vector.uid, vector.name, vector.length)
    assert key.hex() == vector.key
    assert HKDFExpand(hashes.SHA256(), vector.length, info(vector.uid, vector.name, vector.length)).derive(PRK) == key


def test_message_and_info_layout() -> None:
    assert message(1000, "myservice") == b"luks-tpm/app/v1\x001000\x00myservice"
    assert info(1000, "myservice", 32) == b"luks-tpm application key\x001000\x00myservice\x00\x20"


def test_domains_are_separate() -> None:
    """No application message is a volume message ("luks-tpm/v1" NUL ...): they differ before the first NUL;
    and uid, name and length are each unambiguous (NUL-separated decimal uid, a name without NUL, L last)."""
    assert message(0, "x").split(b"\0", 1)[0] != b"luks-tpm/v1"
    assert message(1, "0x") != message(10, "x")
    keys = {expand(PRK, uid, name, 32) for uid, name in ((0, "a"), (1, "a"), (0, "b"), (1000, "a"))}
    assert len(keys) == 4
    assert expand(PRK, 0, "a", 16) != expand(PRK, 0, "a", 32)[:16]  # L is in info: no key is another's prefix


def test_docs_show_these_vectors() -> None:
    text = (REPO / "docs" / "derivation.md").read_text()
    missing = [f"{v.uid}/{v.name}/{v.length}" for v in VECTORS if v.key not in text]
    assert not missing, f"docs/derivation.md lacks the application key vectors {missing}"
    assert PRK.hex() in text
