"""Kernels shim would refuse are refused: Debian's signed kernels, then each link of their Authenticode
signature broken in turn (image, signed hash, attributes, signature, authority), and SBAT revocation."""

from __future__ import annotations

import datetime
import shutil
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from luks_tpm.bootchain import authenticode, eventlog, pecoff, predict, secureboot, signature
from luks_tpm.bootchain.errors import Reason, Unpredictable
from luks_tpm.bootchain.eventlog import EventType, make_event

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
        "the next boot will refuse kernel /vmlinuz-6.1.0-57-amd64: "
        "its signature does not verify with any certificate it carries"
    )


# ---- shim and GRUB on the ESP: the booted log is altered so the binaries on disk count as new ----


def _altered(run: str, change: dict[int, tuple[dict[str, bytes] | None, bytes | None]]) -> eventlog.EventLog:
    """The run's log with some events' digests and/or data replaced (by event index)."""
    booted = lab.log(run)
    events = []
    for e in booted.events:
        digests, data = change.get(e.index, (None, None))
        events.append(make_event(e.index, e.pcr, e.type, digests or dict(e.digests), e.data if data is None else data))
    return type(booted)(booted.digest_sizes, tuple(events))


def _application(log: eventlog.EventLog, which: int) -> eventlog.Event:
    return [e for e in log.events if e.pcr == 4 and e.type == EventType.EV_EFI_BOOT_SERVICES_APPLICATION][which]


def _predict(log: eventlog.EventLog, esp: Path, boot: Path) -> predict.Prediction:
    return predict.next_boot(log, lab.files(log, esp, boot))


def _unpredictable(reason: Reason, log: eventlog.EventLog, esp: Path, boot: Path) -> str:
    with pytest.raises(Unpredictable) as raised:
        _predict(log, esp, boot)
    assert raised.value.reason is reason, raised.value
    return raised.value.detail


def _other(digests: Mapping[str, bytes]) -> dict[str, bytes]:
    return {bank: bytes(len(d)) for bank, d in digests.items()}


@pytest.mark.parametrize(
    "which,change,pcrs",
    [
        (0, "PCR 4: shim on the ESP changed (same SbatLevel, PCR 7 unchanged)", (4,)),
        (1, "PCR 4: GRUB on the ESP changed (Debian 2.06-13+deb12u2)", (4, 8, 9)),
    ],
)
def test_a_new_loader_of_the_same_build_is_predicted(
    tmp_path: Path, which: int, change: str, pcrs: tuple[int, ...]
) -> None:
    """The booted shim's or GRUB's digest altered: the real one on the ESP is "new" (GRUB's built-in
    configuration is rerun over this boot's inputs), and the prediction is the real reboot's PCRs."""
    esp, boot = lab.boot_tree("base", tmp_path)
    loader = _application(lab.log(BOOTED), which)
    log = _altered(BOOTED, {loader.index: (_other(loader.digests), None)})
    prediction = _predict(log, esp, boot)
    assert change in prediction.changes
    actual = lab.pcrs("base-r2")
    assert all(prediction.values[bank][p] == actual[bank][p] for bank in actual for p in pcrs)


def test_a_grub_update_is_predicted_as_a_real_boot_measured_it(tmp_path: Path) -> None:
    """Debian 12's two signed GRUBs (deb12u2 booted, deb12u1 next), under an SbatLevel that still admits
    deb12u1 (`grub,4`). The lab booted deb12u1 with Secure Boot off (shim 16.1 refuses it with Secure
    Boot on), on the same disk: runs/grubu1-sboff. With Secure Boot off shim measures no kernel, so PCR 4
    is the predicted log's PCR 4 events up to GRUB; GRUB's PCRs 8 and 9 are the predicted ones."""
    esp, boot = lab.boot_tree("base", tmp_path)
    shutil.copyfile(lab.binary(lab.REVOKED_GRUB), esp / "EFI" / "BOOT" / "grubx64.efi")
    log = _altered(BOOTED, {_sbat_level(BOOTED).index: (None, _sbat_level_data(OLDER_LEVEL))})
    prediction = _predict(log, esp, boot)
    assert "PCR 4: GRUB on the ESP changed (Debian 2.06-13+deb12u1)" in prediction.changes
    measured = lab.pcrs("grubu1-sboff")
    for bank, values in measured.items():
        assert prediction.values[bank][8] == values[8] and prediction.values[bank][9] == values[9], bank
        up_to_grub = [e for e in prediction.events if e.pcr == 4][:4]
        assert eventlog.replay(log, up_to_grub)[bank][4] == values[4], bank
    assert prediction.values["sha256"][4] != lab.pcrs(BOOTED)["sha256"][4]


def test_the_previous_debian_grub_is_revoked_by_shims_sbat_level(tmp_path: Path) -> None:
    """Debian 12's previous signed GRUB (grub,4): shim 16.1 revokes it, the next boot would not start."""
    esp, boot = lab.boot_tree("base", tmp_path)
    shutil.copyfile(lab.binary(lab.REVOKED_GRUB), esp / "EFI" / "BOOT" / "grubx64.efi")
    detail = _unpredictable(Reason.SBAT_REVOKED, lab.log(BOOTED), esp, boot)
    assert detail == "the next boot will refuse GRUB on the ESP: SbatLevel revokes grub generation 4 (it requires 5)"


def test_a_new_shim_signed_under_another_authority_is_refused(tmp_path: Path) -> None:
    """GRUB placed as shim: signed by Debian's CA, not by the db certificate the firmware logged."""
    esp, boot = lab.boot_tree("base", tmp_path)
    shutil.copyfile(lab.binary(lab.GRUB), esp / "EFI" / "BOOT" / "BOOTX64.EFI")
    detail = _unpredictable(Reason.OTHER_AUTHORITY, lab.log(BOOTED), esp, boot)
    assert detail.startswith("the next boot will refuse shim on the ESP: it is not signed under an authority")


OLDER_LEVEL = b"sbat,1,2024010900\nshim,4\ngrub,3\ngrub.debian,4\n"


def _sbat_level(run: str) -> eventlog.Event:
    return next(e for e in lab.log(run).events if e.pcr == 7 and secureboot.variable_name(e) == "SbatLevel")


def _sbat_level_data(value: bytes) -> bytes:
    """The booted SbatLevel event's data (UEFI_VARIABLE_DATA) with another value."""
    data = _sbat_level(BOOTED).data
    assert data[32:50].decode("utf-16-le") == "SbatLevel"
    return data[:16] + struct.pack("<QQ", 9, len(value)) + data[32:50] + value


def test_a_new_shim_that_raises_sbat_level_is_refused(tmp_path: Path) -> None:
    esp, boot = lab.boot_tree("base", tmp_path)
    shim = _application(lab.log(BOOTED), 0)
    log = _altered(
        BOOTED,
        {shim.index: (_other(shim.digests), None), _sbat_level(BOOTED).index: (None, _sbat_level_data(OLDER_LEVEL))},
    )
    assert "raises SbatLevel to 2025021800" in _unpredictable(Reason.SHIM_CHANGED, log, esp, boot)


def _dbx_with(digest: bytes) -> bytes:
    """A dbx value: one EFI_SIGNATURE_LIST of EFI_CERT_SHA256 entries (owner GUID + hash)."""
    entries = bytes(16) + digest
    return uuid.UUID("c1c41626-504c-4092-aca9-41f936934328").bytes_le + struct.pack("<III", 28 + 48, 0, 48) + entries


def test_a_kernel_in_dbx_is_refused(tmp_path: Path) -> None:
    esp, boot = lab.boot_tree("kernel57", tmp_path)
    kernel = lab.binary(KERNELS[1]).read_bytes()
    booted = lab.log(BOOTED)
    dbx = next(e for e in booted.events if e.pcr == 7 and secureboot.variable_name(e) == "dbx")
    value = _dbx_with(authenticode.digest(kernel))
    data = dbx.data[:24] + struct.pack("<Q", len(value)) + dbx.data[32:38] + value
    log = _altered(BOOTED, {dbx.index: (None, data)})
    assert secureboot.forbidden_hashes(log) == {authenticode.digest(kernel)}
    files = lab.files(log, esp, boot, _snapshot(tmp_path / "s"))
    with pytest.raises(Unpredictable) as raised:
        predict.next_boot(log, files)
    assert raised.value.reason is Reason.REVOKED
    assert raised.value.detail.endswith("its hash is in the Secure Boot forbidden database (dbx)")
