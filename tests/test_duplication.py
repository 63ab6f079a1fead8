"""luks_tpm.duplication without a TPM: fixed vectors for KDFa, KDFe, ECDH and whole TPM2_Import blobs,
each computed by the module, by an independent implementation (tests/duplication_reference.py, pyca
`cryptography`) and pinned here as hex (docs quote them); plus the SRK checks and the input limits.
tests/test_duplication_tpm.py makes swtpm import these very vectors and random blobs.
"""

from __future__ import annotations

import errno
import hashlib
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

from luks_tpm import duplication
from luks_tpm.clib import CLibraryError
from luks_tpm.ecdh import EphemeralKey, Point, is_on_curve
from luks_tpm.errors import ExitCode, LuksTpmError
from luks_tpm.secret import Secret
from luks_tpm.tpm import templates
from luks_tpm.tpm.esys import ffi, lib, marshal, unmarshal

from . import duplication_reference as ref
from .helpers import REPO

# ---- the fixed inputs -------------------------------------------------------------------------------

SRK_PRIVATE = hashlib.sha256(b"luks-tpm test SRK v1").digest()  # a test SRK whose private key we know
EPHEMERAL_PRIVATE = hashlib.sha256(b"luks-tpm test ephemeral v1").digest()
SEED_VALUE = bytes(range(0x40, 0x60))
VOLUME_KEY = bytes(range(64))
PIN = b"2468"
# The policies (docs/policy.md): "sha256 PCR 7 at reset (zeros)", and the same followed by PolicyAuthValue.
POLICIES = {
    b"": bytes.fromhex("8b5682d81b29435d08d79278150611dc7e5923b2fefcce684a09577b40130a8b"),
    PIN: bytes.fromhex("b8db92fae7c1e0c588e7352d2fc10f27c7b384e32f706a520cb10bf7ffee8970"),
}
POLICY = POLICIES[b""]

# ---- the pinned outputs -----------------------------------------------------------------------------

SRK_PUBLIC = bytes.fromhex(
    "005a0023000b0003047200000006008000430010000300100020ee573542344d80c31fdc2166a04dbe516b14712021e6e2bdbf335c80"
    "2d0ff22a0020b48c3665579a81c9a3aa60553190f6d202482cf2112c03c8c51cecee710d0533"
)
SRK_NAME = "000bd1a495bd1d807d74911420fcd5220309171026c4e706b87aa7bdc3288df5fb1f"
Z = "d7315f03df45a6dc116bc792a1bb99afcdc0387e0d0efb3ec43b307fcbd64cfd"
SEED = "24754c8976b295e9bc4daeab2f77577f5a2524d53e587e593aac67908ef30ba3"
HMAC_KEY = "48206caa25685f29a268a1cf59a847bb2ef99a594a56a1bf541c0f126df75a03"
IN_SYM_SEED = (
    "00440020e4accb3b94c7f690337599d151d02293d7cabfb8ce5c9b1ba7040e49d33bc5610020ef4607e468b9e03a6c2e96f61ea37501"
    "de27dda089b1404057c7dd1573494fb7"
)
# Per case (no PIN, PIN "2468"): symKey (it depends on the name), public, duplicate, name.
BLOBS = {
    b"": (
        "b2e9ccf5a0cbfd8a10edf4a32eb0bdca",
        "004e0008000b0000040000208b5682d81b29435d08d79278150611dc7e5923b2fefcce684a09577b40130a8b00100020719d5171df"
        "edaddfb9c79d66ef5e789b0b2219fbd68bbb1d0f09a901cdfcce09",
        "008c0020954ef1573f95099c691da5b07a7e5cf97791add8960c5d9be8d2cf36dba3aaaac8474b59cde242af14381f15ab3b5af40a"
        "1274df90e6b8fd218eb8b8258f29f165ea52fdb47bbda6e4415a4075f88b65f2ff9acb0703ea91f6c785111c71541b0df3d9190ea7"
        "df587e5dca436c95d10169c09ac75ad2ef439cbb0d9c5898e9b6fc46e4fcc7d256619cd4",
        "000bf84978fb5419b32645e4e460ee9217865640d13d2279d09ce24189a2967ab92d",
    ),
    PIN: (
        "5b0a0b20d57d201ff75421f944bb66f3",
        "004e0008000b000000000020b8db92fae7c1e0c588e7352d2fc10f27c7b384e32f706a520cb10bf7ffee897000100020719d5171df"
        "edaddfb9c79d66ef5e789b0b2219fbd68bbb1d0f09a901cdfcce09",
        "00900020e021abb259f91886ad31a282564b05c38e1fc935c291971466284df0b858d62be75ae499b5825acb5c26d13705149d6f74"
        "146a9b510546961284e7e68c80396868bd28979cdbb31279b84c31a8b0ef604a26a9d42554b6d4ff3c8f8c5cb33ce50752f1192c89"
        "43becb6432c51aea1713fdae2a105fafc9f6731cbbd3accbcef4c8c3b3e2e1f8b05d3a3bdf09dad4",
        "000bd742bf1b7eae6bbcf475daec8a38c5d6098350764ebdd175fcf0c327720204cf",
    ),
}

# (key, label, contextU, contextV, bits, KDFa output): the two the wrapper uses, and one of two blocks.
NAME_34 = "000b" + bytes(range(32)).hex()
KDFA_VECTORS = [
    (bytes(range(32)), b"STORAGE", NAME_34, "", 128, "8b9746d9cde648e20ad34f7c5099ae8f"),
    (bytes(range(32)), b"INTEGRITY", "", "", 256, "bacf689f634ece301e1f1b15b072d9c87db6a69585db42b1a0cb8f73ebe2692e"),
    (
        bytes(range(32)),
        b"luks-tpm test",
        "0102",
        "03",
        384,
        "e1c432d66bd7a8ad59404ac098b38d532cbc45d5377ade4b3058ea6f02c75b046904c78a5c6d162c341d0e87e3cf4014",
    ),
]
# (Z, label, partyUInfo, partyVInfo, bits, KDFe output)
KDFE_VECTORS = [
    (
        bytes(range(0xA0, 0xC0)),
        b"DUPLICATE",
        bytes(range(32)).hex(),
        bytes(range(32, 64)).hex(),
        256,
        "6ef8c9a0fb2b68c9ece8d5685d89c74778b46dd959aafab91f01309fc5b3bbb1",
    ),
    (
        bytes(range(0xA0, 0xC0)),
        b"luks-tpm test",
        "01",
        "02",
        384,
        "62f9a1991bd1bfb1b4344d14d40559ed4e99c418f61f667c2eb079b1ae9fb0f66348c3db04e72c085112daabb62f7cfb",
    ),
]
P256_ORDER = bytes.fromhex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551")


def secret(data: bytes) -> Secret:
    return Secret.copy_of(bytearray(data), zero_source=True)


def srk_point() -> tuple[bytes, bytes]:
    return ref.point_of(ref.private_key(SRK_PRIVATE))


def fixed_blob(pin: bytes) -> duplication.ImportBlob:
    srk = duplication.parse_srk_public(SRK_PUBLIC)
    with EphemeralKey(secret(EPHEMERAL_PRIVATE)) as ephemeral:
        return duplication.wrap_for_import(
            srk,
            secret(VOLUME_KEY),
            POLICIES[pin],
            secret(pin) if pin else None,
            ephemeral=ephemeral,
            seed_value=secret(SEED_VALUE),
        )


# ---- KDFs and ECDH ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "label", "u", "v", "bits", "expected"), KDFA_VECTORS)
def test_kdfa_vectors(key: bytes, label: bytes, u: str, v: str, bits: int, expected: str) -> None:
    with duplication.kdfa(secret(key), label, bytes.fromhex(u), bytes.fromhex(v), bits) as out:
        assert bytes(out.view()).hex() == expected
    assert ref.kdfa(key, label, bytes.fromhex(u), bytes.fromhex(v), bits).hex() == expected


@pytest.mark.parametrize(("z", "label", "u", "v", "bits", "expected"), KDFE_VECTORS)
def test_kdfe_vectors(z: bytes, label: bytes, u: str, v: str, bits: int, expected: str) -> None:
    with duplication.kdfe(secret(z), label, bytes.fromhex(u), bytes.fromhex(v), bits) as out:
        assert bytes(out.view()).hex() == expected
    assert ref.kdfe(z, label, bytes.fromhex(u), bytes.fromhex(v), bits).hex() == expected


def test_kdfs_make_whole_bytes_only() -> None:
    for bits in (0, 12, -8):
        with pytest.raises(ValueError):
            duplication.kdfa(secret(bytes(32)), b"X", b"", b"", bits)
        with pytest.raises(ValueError):
            duplication.kdfe(secret(bytes(32)), b"X", b"", b"", bits)


def test_ecdh_with_a_fixed_key_matches_cryptography() -> None:
    peer = Point(*srk_point())
    with EphemeralKey(secret(EPHEMERAL_PRIVATE)) as ephemeral:
        assert (ephemeral.public.x, ephemeral.public.y) == ref.point_of(ref.private_key(EPHEMERAL_PRIVATE))
        with ephemeral.shared_x(peer) as z:
            assert bytes(z.view()).hex() == Z


def test_ecdh_with_a_random_key_agrees_with_the_other_side() -> None:
    """The random key's Z is what the SRK's side computes from the ephemeral public point (the TPM's view)."""
    with EphemeralKey() as ephemeral, ephemeral.shared_x(Point(*srk_point())) as z:
        other_side = ref.exchange(SRK_PRIVATE, (ephemeral.public.x, ephemeral.public.y))
        assert bytes(z.view()) == other_side
    with EphemeralKey() as first, EphemeralKey() as second:
        assert first.public != second.public


@pytest.mark.parametrize(
    "scalar",
    [bytes(32), P256_ORDER, b"\xff" * 32, (int.from_bytes(P256_ORDER, "big") + 1).to_bytes(32, "big"), b"\x01" * 31],
    ids=["zero", "order", "all-ones", "order+1", "31-bytes"],
)
def test_ecdh_refuses_invalid_private_keys(scalar: bytes) -> None:
    with pytest.raises(ValueError):
        EphemeralKey(secret(scalar))


def test_ecdh_refuses_points_off_the_curve() -> None:
    x, y = srk_point()
    off = Point(x, bytes([y[0] ^ 1]) + y[1:])
    assert is_on_curve(Point(x, y)) and not is_on_curve(off)
    assert not is_on_curve(Point(x[1:], y)) and not is_on_curve(Point(bytes(32), bytes(32)))
    with EphemeralKey() as ephemeral, pytest.raises(CLibraryError) as raised:
        ephemeral.shared_x(off)
    assert raised.value.errno == errno.EINVAL


# ---- whole blobs ------------------------------------------------------------------------------------


def test_the_test_srk_is_the_standard_template_with_its_point() -> None:
    """SRK_PUBLIC is templates.srk() (the TSS marshals it) with the test key's point as unique."""
    template = templates.srk()
    x, y = srk_point()
    unique = template.publicArea.unique.ecc
    unique.x.size, unique.y.size = len(x), len(y)
    ffi.memmove(unique.x.buffer, x, len(x))
    ffi.memmove(unique.y.buffer, y, len(y))
    assert marshal("TPM2B_PUBLIC", template) == SRK_PUBLIC == ref.srk_public(x, y)
    srk = duplication.parse_srk_public(SRK_PUBLIC)
    assert srk.name.hex() == SRK_NAME and srk.point == Point(x, y)
    assert duplication.SRK_ATTRIBUTES == templates.SRK_ATTRIBUTES


@pytest.mark.parametrize("pin", [b"", PIN], ids=["no-pin", "pin"])
def test_blob_vectors(pin: bytes) -> None:
    sym_key, public, duplicate, name = BLOBS[pin]
    expected = ref.wrap(srk_point(), EPHEMERAL_PRIVATE, VOLUME_KEY, POLICIES[pin], pin, SEED_VALUE)
    assert (expected.z.hex(), expected.seed.hex(), expected.hmac_key.hex()) == (Z, SEED, HMAC_KEY)
    assert (expected.sym_key.hex(), expected.public.hex(), expected.duplicate.hex()) == (sym_key, public, duplicate)
    assert (expected.in_sym_seed.hex(), expected.name.hex()) == (IN_SYM_SEED, name)
    blob = fixed_blob(pin)
    assert (blob.public.hex(), blob.duplicate.hex(), blob.seed.hex(), blob.name.hex()) == (
        public,
        duplicate,
        IN_SYM_SEED,
        name,
    )
    opened = ref.unwrap(SRK_PRIVATE, blob.public, blob.duplicate, blob.seed)
    assert (opened.data, opened.auth, opened.seed_value) == (VOLUME_KEY, pin, SEED_VALUE)


@pytest.mark.parametrize("pin", [False, True])
def test_public_area_is_the_native_sealed_template_without_fixed_tpm_and_parent(pin: bool) -> None:
    """The TSS's own marshalling of templates.sealed_object (docs/sealing.md), with fixedTPM and
    fixedParent cleared and the unique field filled in, is byte for byte the blob's public area; and
    the TSS parses each part of the blob back to the same bytes."""
    blob = fixed_blob(PIN if pin else b"")
    template = templates.sealed_object(POLICIES[PIN if pin else b""], pin=pin)
    area = template.publicArea
    area.objectAttributes &= ~(lib.TPMA_OBJECT_FIXEDTPM | lib.TPMA_OBJECT_FIXEDPARENT)
    unique = hashlib.sha256(SEED_VALUE + VOLUME_KEY).digest()
    area.unique.keyedHash.size = len(unique)
    ffi.memmove(area.unique.keyedHash.buffer, unique, len(unique))
    assert marshal("TPM2B_PUBLIC", template) == blob.public
    for kind, data in (
        ("TPM2B_PUBLIC", blob.public),
        ("TPM2B_PRIVATE", blob.duplicate),
        ("TPM2B_ENCRYPTED_SECRET", blob.seed),
    ):
        assert marshal(kind, unmarshal(kind, data)) == data


def test_random_blobs_open_only_with_the_srk_and_hold_no_key_in_clear() -> None:
    first = duplication.seal_for_import(
        duplication.parse_srk_public(SRK_PUBLIC), secret(VOLUME_KEY), POLICY, secret(PIN)
    )
    second = duplication.seal_for_import(
        duplication.parse_srk_public(SRK_PUBLIC), secret(VOLUME_KEY), POLICY, secret(PIN)
    )
    assert first.seed != second.seed and first.duplicate != second.duplicate
    assert first.public != second.public  # a fresh seedValue makes a fresh unique, so the name moves too
    for blob in (first, second):
        assert not any(VOLUME_KEY[:16] in part for part in (blob.public, blob.duplicate, blob.seed))
        opened = ref.unwrap(SRK_PRIVATE, blob.public, blob.duplicate, blob.seed)
        assert (opened.data, opened.auth) == (VOLUME_KEY, PIN)
    other = hashlib.sha256(b"another SRK").digest()
    with pytest.raises(ValueError, match="integrity"):
        ref.unwrap(other, first.public, first.duplicate, first.seed)


# ---- what the module refuses ------------------------------------------------------------------------


def _field(offset: int, fmt: str, value: int) -> Callable[[bytes], bytes]:
    def mutate(public: bytes) -> bytes:
        return public[:offset] + struct.pack(fmt, value) + public[offset + struct.calcsize(fmt) :]

    return mutate


def _resized(public: bytes) -> bytes:
    return struct.pack(">H", len(public) - 3) + public[2:-1]  # x and y still claim 32 bytes each


# (what is wrong, how, a fragment of the message). Offsets in SRK_PUBLIC: size 0, type 2, nameAlg 4,
# attributes 6, authPolicy 10, symmetric 12/14/16, scheme 18, curve 20, kdf 22, x 24, y 58.
BAD_SRKS = [
    ("rsa", _field(2, ">H", 0x0001), "type is 0x0001"),
    ("sha384", _field(4, ">H", 0x000C), "nameAlg is 0x000c"),
    ("no-userwithauth", _field(6, ">I", 0x00030432), "objectAttributes is 0x00030432"),
    ("not-fixedtpm", _field(6, ">I", 0x00030470), "objectAttributes"),
    ("auth-policy", lambda p: struct.pack(">H", len(p)) + p[2:10] + b"\x00\x02ab" + p[12:], "authPolicy"),
    ("aes-256", _field(14, ">H", 256), "symmetric key bits is 0x0100"),
    ("cbc", _field(16, ">H", 0x0042), "symmetric mode"),
    ("ecdh-scheme", _field(18, ">H", 0x0019), "scheme is 0x0019"),
    ("p384", _field(20, ">H", 0x0004), "curveID is 0x0004"),
    ("kdf", _field(22, ">H", 0x0020), "kdf"),
    ("off-curve", lambda p: p[:-1] + bytes([p[-1] ^ 1]), "not on the P-256 curve"),
    ("short-x", lambda p: struct.pack(">H", len(p) - 3) + p[2:24] + b"\x00\x1f" + p[27:], "32-byte coordinates"),
    ("trailing", lambda p: struct.pack(">H", len(p) - 1) + p[2:] + b"\x00", "trailing bytes"),
    ("truncated", _resized, "truncated"),
    ("size-field", lambda p: b"\x00\x10" + p[2:], "size field"),
    ("empty", lambda p: b"", "truncated"),
]


@pytest.mark.parametrize(("mutate", "fragment"), [case[1:] for case in BAD_SRKS], ids=[case[0] for case in BAD_SRKS])
def test_anything_but_the_standard_srk_is_a_usage_error(mutate: Callable[[bytes], bytes], fragment: str) -> None:
    with pytest.raises(LuksTpmError) as raised:
        duplication.seal_for_import(duplication.parse_srk_public(mutate(SRK_PUBLIC)), secret(VOLUME_KEY), POLICY)
    error = raised.value
    assert error.code == ExitCode.USAGE and fragment in error.message and "\n" not in error.message
    assert error.message.startswith("not the target TPM's standard SRK") and error.hint


def test_input_limits() -> None:
    with pytest.raises(LuksTpmError, match="at most 32 bytes") as raised:
        duplication.seal_for_import(
            duplication.parse_srk_public(SRK_PUBLIC), secret(VOLUME_KEY), POLICY, secret(b"9" * 33)
        )
    assert raised.value.code == ExitCode.USAGE
    with pytest.raises(LuksTpmError, match="too large") as raised:
        duplication.seal_for_import(duplication.parse_srk_public(SRK_PUBLIC), secret(bytes(129)), POLICY)
    assert raised.value.code == ExitCode.UNSUPPORTED
    with pytest.raises(ValueError, match="policy"):
        duplication.seal_for_import(duplication.parse_srk_public(SRK_PUBLIC), secret(VOLUME_KEY), bytes(20))
    srk = duplication.parse_srk_public(SRK_PUBLIC)
    with EphemeralKey() as ephemeral, pytest.raises(ValueError, match="seedValue"):
        duplication.wrap_for_import(srk, secret(VOLUME_KEY), POLICY, None, ephemeral=ephemeral, seed_value=secret(b"s"))
    blob = duplication.seal_for_import(
        duplication.parse_srk_public(SRK_PUBLIC), secret(bytes(128)), POLICY, secret(b"9" * 32)
    )  # both limits
    assert ref.unwrap(SRK_PRIVATE, blob.public, blob.duplicate, blob.seed).auth == b"9" * 32


_NO_CRYPTOGRAPHY = textwrap.dedent(
    """
    import sys
    from luks_tpm import duplication
    from luks_tpm.secret import Secret

    public = bytes.fromhex(sys.argv[1])
    duplication.seal_for_import(duplication.parse_srk_public(public), Secret.copy_of(bytearray(range(64))), bytes(32))
    print(" ".join(sorted(name for name in sys.modules if name.partition(".")[0] in ("cryptography", "tpm2_pytss"))))
    """
)


def test_sealing_loads_neither_cryptography_nor_the_tss() -> None:
    """A build host seals with libcrypto alone: no pyca `cryptography`, and no TSS (no TPM is there)."""
    result = subprocess.run(
        [sys.executable, "-c", _NO_CRYPTOGRAPHY, SRK_PUBLIC.hex()],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"loaded by luks_tpm.duplication: {result.stdout.strip()}"


def test_docs_quote_these_vectors() -> None:
    """docs/sealing.md quotes the no-PIN case: the software half is a contract too."""
    text = (REPO / "docs" / "sealing.md").read_text()
    symmetric, public, duplicate, name = BLOBS[b""]
    for value in (Z, SEED, HMAC_KEY, IN_SYM_SEED, symmetric, public, duplicate, name):
        assert f"`{value}`" in text, value[:16]
