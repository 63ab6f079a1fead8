"""Sealing for a TPM that is not here (docs/sealing.md): the target's provisioning file, and a sealed token
made from it on another machine (`enroll --for-tpm`).

The target exports its identity with `luks-tpm --json srk-public`: the standard SRK (which TPM), the
import parent (what blobs are wrapped to: tpm.importparent says why not the SRK) and the EK's name
(cleared or another TPM, later). The build host reads that file, unlocks the volume with its passphrase,
and seals the volume key to the import parent in TPM2_Import's format (luks_tpm.duplication), under the
PCR values given for the target, the fence and a PIN as asked. It touches no TPM. The token (version 3)
cannot be verified here: the target proves it when it first unlocks the volume.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from pathlib import Path
from typing import Any

from . import duplication
from .cryptsetup import open_device
from .enrollment import Enrolled, volume_key_with_passphrase, write_token
from .errors import Cause, ExitCode, LuksTpmError, die
from .files import read_bytes
from .model import ImportedSeal, Mode, Parent, PcrPolicy
from .output import Report
from .prompt import NewPinSource, PassphraseSource
from .settings import Enrollment
from .tokenformat import SealedToken, utc_now
from .tpm import Tpm, importparent
from .tpm import srk as tpm_srk
from .tpm.esys import marshal
from .tpm.responses import tpm_errors

TARGET_TYPE = "luks-tpm-target"
TARGET_VERSION = 1


@dataclasses.dataclass(frozen=True)
class KeyPublic:
    public: bytes  # a marshalled TPM2B_PUBLIC
    name: bytes  # its TPM name

    def json(self) -> dict[str, str]:
        return {"public": base64.b64encode(self.public).decode(), "name": self.name.hex()}


@dataclasses.dataclass(frozen=True)
class Target:
    srk: KeyPublic
    import_parent: KeyPublic
    endorsement: bytes | None


@dataclasses.dataclass(frozen=True)
class TargetFile:
    """What `--json srk-public` prints: the provisioning file, a contract (docs/sealing.md)."""

    type: str
    srk: dict[str, str]  # public (base64 TPM2B_PUBLIC), name (hex)
    import_parent: dict[str, str]
    endorsement: str | None  # the EK's name, hex; null when the TPM has no usable EK

    def lines(self) -> list[str]:
        return [
            f"SRK: {self.srk['name']}",
            f"import parent: {self.import_parent['name']}",
            f"endorsement key: {self.endorsement or 'unknown'}",
            "`luks-tpm --json srk-public > FILE` writes the provisioning file that `enroll --for-tpm FILE` reads",
        ]


def export(tcti: str) -> Report:
    with Tpm(tcti) as tpm:
        srk_handle, srk = tpm_srk.current_srk(tpm)
        with tpm_errors("reading the storage root key"):
            srk_public = marshal("TPM2B_PUBLIC", tpm.esys.read_public(srk_handle))
        parent_handle, parent = importparent.create(tpm)
        import_parent = KeyPublic(importparent.public_area(tpm, parent_handle), parent.name)
        endorsement = tpm_srk.endorsement_name(tpm)
        warnings = tuple(tpm.warnings)
    srk_key = KeyPublic(srk_public, srk.name)
    ek = endorsement.hex() if endorsement else None
    return Report(TargetFile(TARGET_TYPE, srk_key.json(), import_parent.json(), ek), warnings)


def _bad_file(path: Path, why: str) -> LuksTpmError:
    return LuksTpmError(
        f"--for-tpm {path}: {why}",
        hint="give the file `luks-tpm --json srk-public` wrote on the target machine, unchanged",
        code=ExitCode.USAGE,
        cause=Cause.USAGE,
    )


def read_target(path: Path) -> Target:
    """The provisioning file, checked: its type and version, and each key's name against its public area."""
    try:
        data = json.loads(read_bytes(path, what="provisioning file", option="--for-tpm", limit=65536))
        if data.get("type") != TARGET_TYPE or data.get("version") != TARGET_VERSION:
            raise ValueError(f"not a version {TARGET_VERSION} {TARGET_TYPE} file")
        keys = [_key(data[field]) for field in ("srk", "import_parent")]
        endorsement = data.get("endorsement")
        ek = bytes.fromhex(endorsement) if isinstance(endorsement, str) and endorsement else None
    except binascii.Error:
        raise _bad_file(path, "a public area is not valid base64") from None
    except json.JSONDecodeError:
        raise _bad_file(path, "not JSON") from None
    except ValueError as error:
        raise _bad_file(path, str(error)) from None
    except (KeyError, TypeError, AttributeError):
        raise _bad_file(path, "not a provisioning file (a field is missing or of the wrong type)") from None
    duplication.parse_import_parent(keys[1].public)  # a usage error naming the field when it is not one
    for key, field in zip(keys, ("srk", "import_parent"), strict=True):
        if key.name != duplication.tpm_name(key.public[2:]):
            raise _bad_file(path, f"{field}.name is not the name of {field}.public")
    return Target(keys[0], keys[1], ek)


def _key(raw: Any) -> KeyPublic:
    public = base64.b64decode(raw["public"], validate=True)
    return KeyPublic(public, bytes.fromhex(raw["name"]))


def _policy(enrollment: Enrollment) -> PcrPolicy:
    """The token's policy, from the given values alone: nothing here can read the target's PCRs."""
    missing = [index for index in enrollment.pcrs if index not in enrollment.pcr_values]
    if missing:
        die(
            f"--for-tpm needs the target's value of every bound PCR: give --pcr-value for PCR "
            f"{', '.join(map(str, missing))}",
            hint="the target's `luks-tpm predict` or its event log gives them",
            code=ExitCode.USAGE,
        )
    values = dict(enrollment.pcr_values)
    return PcrPolicy(enrollment.bank, enrollment.pcrs, values, enrollment.pin, enrollment.fence)


def enroll_for(
    target_file: Path, device_path: Path, enrollment: Enrollment, passphrase: PassphraseSource, pin: NewPinSource
) -> Report:
    """A version 3 token for the target TPM, from the volume's passphrase: written, not verifiable here."""
    target = read_target(target_file)
    parent = duplication.parse_import_parent(target.import_parent.public)
    policy = _policy(enrollment)
    path = str(device_path)
    with open_device(path, write=True) as device:
        key = volume_key_with_passphrase(device, passphrase)
        pin_secret = pin() if enrollment.pin else None
        try:
            with key:
                blob = duplication.seal_for_import(parent, key, policy.digest(), pin_secret)
                token = SealedToken(
                    digest=device.default_digest(),
                    key_size=len(key),
                    parent=Parent(None, target.import_parent.name),
                    created=utc_now(),
                    pcr_bank=policy.bank,
                    pcrs=policy.pcrs,
                    pcr_values=dict(policy.values),
                    fence=policy.fence,
                    policy=policy.digest(),
                    endorsement=target.endorsement,
                    pin=policy.pin,
                    blob=ImportedSeal(blob.public, blob.duplicate, blob.seed),
                )
        finally:
            if pin_secret is not None:
                pin_secret.close()
        token_id = write_token(device, token)
    line = (
        f"{path}: token {token_id} ({token.describe()}) sealed for the TPM of {target_file}; not verified: "
        "only that TPM can, at its first unlock (`luks-tpm status` there)"
    )
    return Report(Enrolled(path, token_id, Mode.SEALED, token.pcrs, token.fence, False, line))
