"""The approver (docs/policy.md): the key whose signatures approve the boot chain's states for version 2
tokens, so that they follow kernel, initrd, GRUB and shim updates without the volume key.

It is an ECC P-256 signing key of this TPM, made under the SRK; its blob is kept in a file only root can
read, on the running system's (encrypted) root: whoever can read that file and use this TPM can approve
what boots next. A root that the boot's cross-volume guard did not accept (an attacker's, after a root
swap) has no such file: the genuine root's file system was never opened for it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import Cause, ExitCode, LuksTpmError, die
from .files import read_bytes
from .model import Approval, Approver, Parent, PcrPolicy, SealedBlob
from .tpm import Tpm
from .tpm import authorize as tpm_authorize
from .tpm import srk as tpm_srk

_FORMAT = "luks-tpm approver"


@dataclasses.dataclass(frozen=True)
class ApproverKey:
    blob: SealedBlob
    parent: Parent  # the SRK it was made under

    @property
    def approver(self) -> Approver:
        return Approver(self.blob.public, Approver.name_of(self.blob.public))

    def sign(self, tpm: Tpm, policy: PcrPolicy) -> Approval:
        """An approval of the state `policy.values` for tokens whose policy has this approver."""
        srk = tpm_srk.srk_for(tpm, self.parent, None)
        return Approval(dict(policy.values), tpm_authorize.sign(tpm, srk, self.blob, policy.approved_digest()))


def _damaged(path: Path, what: str) -> LuksTpmError:
    return LuksTpmError(
        f"--approver {path}: {what}",
        hint="give the approver key's file, restore it from a backup, or re-enroll the volumes with a new "
        "approver (`enroll --boot-chain`)",
        code=ExitCode.USAGE,
        cause=Cause.NO_APPROVER,
    )


def load(path: Path) -> ApproverKey | None:
    """The approver kept in `path`, or None when there is none. A regular file of bounded size: a FIFO
    or /dev/zero there must not hang or exhaust the command (files.read_bytes refuses them, exit 2)."""
    if not os.path.lexists(path):
        return None
    try:
        text = read_bytes(path, what="approver key", option="--approver", limit=1 << 16).decode()
    except UnicodeDecodeError as error:
        raise _damaged(path, f"cannot read the approver key ({error.reason})") from None
    try:
        data = json.loads(text)
        parent = data["parent"]
        handle = None if parent["handle"] is None else int(parent["handle"], 16)
        blob = SealedBlob(
            base64.b64decode(data["public"], validate=True), base64.b64decode(data["private"], validate=True)
        )
        key = ApproverKey(blob, Parent(handle, bytes.fromhex(parent["name"])))
        if data.get("type") != _FORMAT or data.get("version") != 1:
            raise ValueError("not a version 1 approver file")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _damaged(path, "not a luks-tpm approver key file") from None
    return key


def load_or_create(tpm: Tpm, path: Path) -> ApproverKey:
    """This system's approver: the one kept in `path`, or a new one made now and kept there."""
    found = load(path)
    if found is not None:
        return found
    srk, parent = tpm_srk.current_srk(tpm)
    key = ApproverKey(tpm_authorize.create_approver(tpm, srk), parent)
    _save(path, key)
    return key


def required(path: Path) -> ApproverKey:
    found = load(path)
    if found is None:
        die(
            f"--approver {path}: no approver key there: approved boot states cannot be signed on this system",
            hint="enroll with --boot-chain on this system (it makes one), or give --approver FILE",
            code=ExitCode.USAGE,
            cause=Cause.NO_APPROVER,
        )
    return found


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """One approving run at a time (the update hooks, the path unit and the boot service may overlap):
    each rewrites tokens whole, and two at once would leave a token twice."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _save(path: Path, key: ApproverKey) -> None:
    """Write the file whole or not at all, readable by root alone."""
    data = {
        "type": _FORMAT,
        "version": 1,
        "public": base64.b64encode(key.blob.public).decode(),
        "private": base64.b64encode(key.blob.private).decode(),
        "parent": {
            "handle": None if key.parent.handle is None else f"{key.parent.handle:#x}",
            "name": key.parent.name.hex(),
        },
    }
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(data, file, indent=2)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
