"""Kernels shim would refuse are refused: Debian's signed kernels, then each link of their Authenticode
signature broken in turn (image, signed hash, attributes, signature, authority), and SBAT revocation."""

from __future__ import annotations

import datetime
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from luks_tpm.bootchain import authenticode, pecoff, secureboot, signature
from luks_tpm.bootchain.errors import Reason
from luks_tpm.bootchain.eventlog import EventType

from . import bootchain_lab as lab
from .test_bootchain_authenticode import make_pe
from .test_bootchain_predict import BOOTED, _expect, _snapshot

KERNELS = [
    "linux-image-6.1.0-56-amd64/boot/vmlinuz-6.1.0-56-amd64",
    "linux-image-6.1.0-57-amd64/boot/vmlinuz-6.1.0-57-amd64",
]


def _authorities() -> list[bytes]:
    """What shim's verification of this boot used: the authorities logged at or after shim's image event."""
    log = lab.log(BOOTED)
    shim = next(e for e in log.events if e.pcr == 4 and e.type == EventType.EV_EFI_BOOT_SERVICES_APPLICATION)
    authorities = secureboot.authority_certificates(log, shim.index)
    assert len(authorities) == 1  # Debian's CA (shim's MokListRT), logged by shim when it verified GRUB
    return authorities


def _kernel() -> bytearray:
    return bytearray(lab.binary(KERNELS[1]).read_bytes())


def _signed_data(image: bytes) -> tuple[int, int]:
    """(offset, length) of the kernel's one PKCS#7 SignedData."""
    parsed = pecoff.parse(image)
    length = struct.unpack_from("<I", image, parsed.cert_offset)[0]
    return parsed.cert_offset + 8, length - 8


@pytest.mark.parametrize("relative", KERNELS)
def test_debian_kernels_are_accepted(relative: str) -> None:
    assert signature.problem(lab.binary(relative).read_bytes(), _authorities()) is None


def test_a_changed_kernel_is_refused() -> None:
    image = _kernel()
    text = next(s for s in pecoff.parse(bytes(image)).sections if s.name == ".text")
    image[text.raw_offset + 4096] ^= 0x01
    assert signature.problem(bytes(image), _authorities()) == (
        Reason.BAD_SIGNATURE,
        "it was changed after it was signed (its Authenticode hash is not the signed one)",
    )


def test_a_changed_kernel_with_its_signed_hash_rewritten_is_refused() -> None:
    image = _kernel()
    signed_hash = authenticode.digest(bytes(image))
    text = next(s for s in pecoff.parse(bytes(image)).sections if s.name == ".text")
    image[text.raw_offset + 4096] ^= 0x01
    start, length = _signed_data(bytes(image))
    where = bytes(image).index(signed_hash, start, start + length)
    image[where : where + 32] = authenticode.digest(bytes(image))
    assert signature.problem(bytes(image), _authorities()) == (
        Reason.BAD_SIGNATURE,
        "its signature does not cover the hash it carries",
    )


def test_a_broken_signature_is_refused() -> None:
    image = _kernel()
    start, length = _signed_data(bytes(image))
    image[start + length - 20] ^= 0x01  # inside the signer's encryptedDigest, the DER's last element
    assert signature.problem(bytes(image), _authorities()) == (
        Reason.BAD_SIGNATURE,
        "its signature does not verify with any certificate it carries",
    )


def _look_alike_ca() -> bytes:
    """A CA named exactly as Debian's ("CN=Debian Secure Boot CA") with another key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Debian Secure Boot CA")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def test_an_authority_with_the_same_name_and_another_key_is_not_the_authority() -> None:
    look_alike = _look_alike_ca()
    debian = [x509.load_der_x509_certificate(a).subject for a in _authorities()]
    assert x509.load_der_x509_certificate(look_alike).subject in debian  # only the key tells them apart
    assert signature.problem(bytes(_kernel()), [look_alike]) == (
        Reason.OTHER_AUTHORITY,
        "it is not signed under an authority the booted log shows (PCR 7)",
    )


def test_a_binary_signed_under_another_authority_is_refused() -> None:
    shim = lab.binary(lab.SHIM).read_bytes()  # signed by Microsoft's UEFI CA, not by Debian's
    assert signature.problem(shim, _authorities()) == (
        Reason.OTHER_AUTHORITY,
        "it is not signed under an authority the booted log shows (PCR 7)",
    )


def test_an_unsigned_image_is_refused() -> None:
    assert signature.problem(make_pe([b"code" * 100]), _authorities()) == (Reason.OTHER_AUTHORITY, "it is not signed")


@pytest.mark.parametrize("cut", [8, 200, 1000])
def test_an_unreadable_signature_is_refused(cut: int) -> None:
    image = _kernel()
    start, length = _signed_data(bytes(image))
    image[start + cut : start + length] = bytes(length - cut)  # the DER's lengths now point into zeros
    reason, why = signature.problem(bytes(image), _authorities()) or (None, "")
    assert reason is Reason.BAD_SIGNATURE and why.startswith("its signature cannot be read"), why


def _with_sbat(text: bytes) -> bytes:
    image = bytearray(make_pe([b"code" * 100, text]))
    position = image.index(b".s1\0\0\0\0\0")
    image[position : position + 8] = b".sbat\0\0\0"
    return bytes(image)


LEVEL = "sbat,1,2024010900\nshim,4\ngrub,3\ngrub.debian,4\nlinux,2\n"


@pytest.mark.parametrize(
    "sbat,problem",
    [
        (b"sbat,1,SBAT Version,sbat,1,https://x\nlinux,2,The Linux Developers,linux,6.1,https://x\n", None),
        (b"sbat,1,SBAT Version,sbat,1,https://x\nlinux.debian,1,Debian,linux,6.1,https://x\n", None),
        (
            b"sbat,1,SBAT Version,sbat,1,https://x\nlinux,1,The Linux Developers,linux,6.1,https://x\n",
            "SbatLevel revokes linux generation 1 (it requires 2)",
        ),
        (b"sbat,1,SBAT Version\nlinux,one,x\n", "its .sbat line 'linux,one,x' cannot be read"),
        (b"sbat,1\nlinux,\xd9\xa7,x\n", "its .sbat line 'linux,\u0667,x' cannot be read"),  # Arabic-Indic 7: no
    ],
)
def test_sbat(sbat: bytes, problem: str | None) -> None:
    assert signature.sbat_problem(_with_sbat(sbat), LEVEL) == problem


def test_no_sbat_section_passes() -> None:
    """shim requires .sbat only of what it loads itself; Debian's 6.1 kernels have none."""
    assert pecoff.section_data(bytes(_kernel()), ".sbat") is None
    assert signature.sbat_problem(bytes(_kernel()), LEVEL) is None


def test_predict_refuses_a_changed_kernel(tmp_path: Path) -> None:
    esp, boot = lab.boot_tree("kernel57", tmp_path)
    kernel = boot / "vmlinuz-6.1.0-57-amd64"
    image = bytearray(kernel.read_bytes())
    image[-100] ^= 0x01  # inside the signature
    kernel.unlink()
    kernel.write_bytes(bytes(image))
    error = _expect(Reason.BAD_SIGNATURE, BOOTED, esp, boot, _snapshot(tmp_path / "s"))
    assert error.detail == (
        "shim will refuse kernel /vmlinuz-6.1.0-57-amd64: its signature does not verify with any certificate it carries"
    )
