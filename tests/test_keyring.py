"""luks_tpm.keyring against the real kernel keyring, inside a private session keyring."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from luks_tpm import keyring
from luks_tpm.secret import Secret

from . import keyutils

pytestmark = pytest.mark.usefixtures("private_session_keyring")

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@dataclass(frozen=True)
class ProcKey:
    """One line of /proc/keys."""

    serial: int
    expiry: str  # "perm", "expd", or the time left: "45s", "1m", ...
    perm: int
    uid: int
    type: str
    description: str
    summary: str  # for logon keys: the payload length


def proc_keys() -> dict[int, ProcKey]:
    keys = {}
    for line in Path("/proc/keys").read_text().splitlines():
        serial, _flags, _usage, expiry, perm, uid, _gid, key_type, rest = line.split(None, 8)
        description, _, summary = rest.rpartition(": ")
        keys[int(serial, 16)] = ProcKey(
            int(serial, 16), expiry, int(perm, 16), int(uid), key_type, description, summary
        )
    return keys


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def volume_key_description() -> str:
    return f"cryptsetup:{uuid.uuid4()}-d0"


@pytest.fixture
def volume_key() -> Iterator[Secret]:
    with Secret.copy_of(bytearray(os.urandom(64)), zero_source=True) as secret:
        yield secret


def test_runs_in_a_fresh_anonymous_session_keyring(private_session_keyring: int) -> None:
    assert keyring.keyring_id(keyring.SESSION) == private_session_keyring
    assert keyring.describe(private_session_keyring).description == "_ses"
    assert keyutils.keyring_contents(keyring.SESSION) == []


def test_logon_key_appears_in_proc_keys_with_tight_permissions(
    private_session_keyring: int, volume_key: Secret
) -> None:
    description = volume_key_description()
    serial = keyring.add_logon_key(description, volume_key, keyring.SESSION)
    keyring.set_permissions(serial, keyring.logon_key_permissions())

    assert keyutils.keyring_contents(private_session_keyring) == [serial]
    entry = proc_keys()[serial]
    assert (entry.type, entry.description, entry.summary) == ("logon", description, "64")
    assert entry.uid == os.getuid()
    assert entry.perm == keyring.logon_key_permissions() == 0x39000000  # possessor v-slt, nobody else
    assert keyring.describe(serial) == keyring.KeyDescription(
        "logon", os.getuid(), os.getgid(), 0x39000000, description
    )


def test_logon_key_permissions_grant_nothing_but_possessor_view_search_link_setattr() -> None:
    perm = keyring.logon_key_permissions()
    assert perm & 0x00FFFFFF == 0  # owner, group, other
    assert perm & (keyring.KEY_POS_READ | keyring.KEY_POS_WRITE) == 0
    wanted = (keyring.KEY_POS_VIEW, keyring.KEY_POS_SEARCH, keyring.KEY_POS_LINK, keyring.KEY_POS_SETATTR)
    assert all(perm & bit for bit in wanted)


def test_a_logon_key_cannot_be_read_back(volume_key: Secret) -> None:
    serial = keyring.add_logon_key(volume_key_description(), volume_key, keyring.SESSION)
    with pytest.raises(keyring.KeyringError) as raised:
        keyutils.read(serial)
    assert raised.value.errno == errno.EOPNOTSUPP
    assert raised.value.function == "keyctl_read"
    assert "keyctl_read" in str(raised.value)


def test_search_finds_it_and_unlink_removes_it(volume_key: Secret) -> None:
    description = volume_key_description()
    serial = keyring.add_logon_key(description, volume_key, keyring.SESSION)
    keyring.set_permissions(serial, keyring.logon_key_permissions())
    assert keyutils.search(keyring.SESSION, "logon", description) == serial
    assert keyutils.search(keyring.SESSION, "user", description) is None
    assert keyutils.search(keyring.SESSION, "logon", volume_key_description()) is None

    keyring.unlink(serial, keyring.SESSION)
    assert keyutils.search(keyring.SESSION, "logon", description) is None
    assert wait_until(lambda: serial not in proc_keys()), "unlinked key was never garbage-collected"


def test_timeout_shows_in_proc_keys_and_expires_the_key(volume_key: Secret) -> None:
    description = volume_key_description()
    serial = keyring.add_logon_key(description, volume_key, keyring.SESSION)
    keyring.set_permissions(serial, keyring.logon_key_permissions())
    assert proc_keys()[serial].expiry == "perm"

    keyring.set_timeout(serial, 45)
    left = re.fullmatch(r"(\d+)s", proc_keys()[serial].expiry)
    assert left is not None and 40 <= int(left[1]) <= 45

    keyring.set_timeout(serial, 0)
    assert proc_keys()[serial].expiry == "perm"

    keyring.set_timeout(serial, 1)
    assert wait_until(lambda: keyutils.search(keyring.SESSION, "logon", description) is None)
    assert proc_keys()[serial].expiry == "expd"
    with pytest.raises(ValueError, match="timeout"):
        keyring.set_timeout(serial, -1)


def test_adding_the_same_description_again_updates_in_place(volume_key: Secret) -> None:
    description = volume_key_description()
    serial = keyring.add_logon_key(description, volume_key, keyring.SESSION)
    with Secret.copy_of(bytearray(os.urandom(32))) as shorter:
        assert keyring.add_logon_key(description, shorter, keyring.SESSION) == serial
    assert proc_keys()[serial].summary == "32"
    assert keyutils.keyring_contents(keyring.SESSION) == [serial]


def test_without_write_permission_a_key_cannot_be_updated(volume_key: Secret) -> None:
    description = volume_key_description()
    serial = keyring.add_logon_key(description, volume_key, keyring.SESSION)
    keyring.set_permissions(serial, keyring.logon_key_permissions())
    with pytest.raises(keyring.KeyringError) as raised:
        keyring.add_logon_key(description, volume_key, keyring.SESSION)
    assert (raised.value.errno, raised.value.function) == (errno.EACCES, "add_key")
    keyring.unlink(serial, keyring.SESSION)  # the way to replace it
    assert keyring.add_logon_key(description, volume_key, keyring.SESSION) != serial


def test_a_revoked_key_counts_as_absent_and_adding_again_replaces_it(volume_key: Secret) -> None:
    description = volume_key_description()
    serial = keyring.add_logon_key(description, volume_key, keyring.SESSION)
    keyring.set_permissions(serial, keyring.logon_key_permissions())
    keyutils.revoke(serial)  # what libcryptsetup 2.6.1 does to a key of that name on a failed activation
    assert keyutils.search(keyring.SESSION, "logon", description) is None
    with pytest.raises(keyring.KeyringError) as raised:
        keyring.describe(serial)
    assert raised.value.errno == errno.EKEYREVOKED

    again = keyring.add_logon_key(description, volume_key, keyring.SESSION)
    assert again != serial
    assert keyutils.search(keyring.SESSION, "logon", description) == again
    assert keyutils.keyring_contents(keyring.SESSION) == [again]


def _in_new_thread(function: Callable[[], T]) -> T:
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(function()))
    thread.start()
    thread.join()
    return results[0]


def test_a_key_is_invisible_to_the_same_uid_without_possession(volume_key: Secret) -> None:
    tight = keyring.add_logon_key(volume_key_description(), volume_key, keyring.SESSION)
    keyring.set_permissions(tight, keyring.logon_key_permissions())
    default = keyring.add_logon_key(volume_key_description(), volume_key, keyring.SESSION)

    def outsider() -> tuple[int | None, int | None, str]:
        """Same process, same uid, but a thread that left our session keyring: it no longer possesses them."""
        keyutils.join_session_keyring()
        errors: list[int | None] = []
        for serial in (tight, default):
            try:
                keyring.describe(serial)
                errors.append(None)
            except keyring.KeyringError as error:
                errors.append(error.errno)
        return errors[0], errors[1], keyring.describe(default).description

    tight_error, default_error, default_description = _in_new_thread(outsider)
    assert tight_error == errno.EACCES  # even for root: key permissions do not bow to capabilities
    assert default_error is None  # the kernel's default for logon keys gives the owner uid VIEW
    assert default_description.startswith("cryptsetup:")


def test_the_session_keyring_belongs_to_the_thread(private_session_keyring: int) -> None:
    started = threading.Event()
    proceed = threading.Event()
    seen: dict[str, int] = {}

    def older_thread() -> None:
        started.set()
        proceed.wait()
        seen["older"] = keyring.keyring_id(keyring.SESSION)

    older = threading.Thread(target=older_thread)
    older.start()
    started.wait()
    joined = keyutils.join_session_keyring()
    seen["newer"] = _in_new_thread(lambda: keyring.keyring_id(keyring.SESSION))
    proceed.set()
    older.join()

    assert joined != private_session_keyring
    assert keyring.keyring_id(keyring.SESSION) == joined
    assert seen == {"older": private_session_keyring, "newer": joined}


def test_a_description_without_colon_is_refused(volume_key: Secret) -> None:
    with pytest.raises(ValueError, match="prefix"):
        keyring.add_logon_key("cryptsetup-no-colon", volume_key, keyring.SESSION)
    assert keyutils.keyring_contents(keyring.SESSION) == []


def test_errors_are_oserrors_naming_the_call() -> None:
    missing = keyutils.search(keyring.SESSION, "logon", volume_key_description())
    assert missing is None
    with pytest.raises(OSError) as raised:
        keyring.describe(2**31 - 1)
    assert isinstance(raised.value, keyring.KeyringError)
    assert raised.value.errno == errno.ENOKEY
    assert str(raised.value) == f"keyctl_describe: {os.strerror(errno.ENOKEY)}"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("@t", -1), ("@p", -2), ("@s", -3), ("@u", -4), ("@us", -5), ("123", 123), ("2147483647", 2**31 - 1)],
)
def test_parse_keyring_accepts(spec: str, expected: int) -> None:
    assert keyring.parse_keyring(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "@", "@x", "@S", "@s ", " 5", "-3", "0", "+5", "12a", "0x10", "2147483648", "\u0661\u0662"]
)
def test_parse_keyring_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid keyring"):
        keyring.parse_keyring(spec)


NOBODY_SCRIPT = """
import errno, json, os
from luks_tpm import keyring
from luks_tpm.secret import Secret
from tests import keyutils

session = keyutils.join_session_keyring()
description = "cryptsetup:00000000-0000-4000-8000-000000000000-d0"
with Secret.copy_of(bytearray(os.urandom(64)), zero_source=True) as key:
    serial = keyring.add_logon_key(description, key, keyring.SESSION)
keyring.set_permissions(serial, keyring.logon_key_permissions())
keyring.set_timeout(serial, 60)
try:
    keyutils.read(serial)
    read_errno = None
except keyring.KeyringError as error:
    read_errno = error.errno
result = {
    "uid": os.getuid(),
    "found": keyutils.search(keyring.SESSION, "logon", description) == serial,
    "key": vars(keyring.describe(serial)),
    "read_errno": read_errno,
    "in_session": keyutils.keyring_contents(session) == [serial],
}
keyring.unlink(serial, keyring.SESSION)
result["gone"] = keyutils.search(keyring.SESSION, "logon", description) is None
print(json.dumps(result))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_an_unprivileged_user_can_use_its_own_logon_key() -> None:
    nobody = 65534
    completed = subprocess.run(
        [
            "setpriv",
            f"--reuid={nobody}",
            f"--regid={nobody}",
            "--clear-groups",
            sys.executable,
            "-c",
            NOBODY_SCRIPT,
        ],
        env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result == {
        "uid": nobody,
        "found": True,
        "key": {
            "type": "logon",
            "uid": nobody,
            "gid": nobody,
            "perm": keyring.logon_key_permissions(),
            "description": "cryptsetup:00000000-0000-4000-8000-000000000000-d0",
        },
        "read_errno": errno.EOPNOTSUPP,
        "in_session": True,
        "gone": True,
    }
