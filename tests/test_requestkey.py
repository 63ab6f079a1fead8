"""`luks-tpm request-key` through the real upcall: request_key(2) -> kernel -> /sbin/request-key -> luks-tpm.

Every test writes its own file in /etc/request-key.d/ whose patterns match only this run's descriptions
(other test runs may share the machine: a random application-name prefix, the test volume's own UUID),
and the fixture removes it whatever happens. Requests are made from the test's private session keyring,
with `keyctl request2` (as a shell user would) or request_key(2) in process (to set the fsuid).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import shutil
import socket
import subprocess
import time
import uuid as uuid_module
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from luks_tpm import keyring
from luks_tpm.doctor import request_key_check
from luks_tpm.tpm import Tpm, esys
from luks_tpm.tpm import keys as tpm_keys
from luks_tpm.tpm import srk as tpm_srk
from luks_tpm.tpm.context import secret_from_tpm2b
from luks_tpm.tpm.sessions import Sessions

from . import keyutils
from .fixtures_luks import TEST_PASSPHRASE, file_digest, make_luks_image
from .fixtures_tpm import Swtpm
from .fixtures_upcall import (
    ENOKEY_TEXT,
    NEGATE_SECONDS,
    NOBODY,
    Upcall,
    drop,
    received,
    refused,
    request,
    take,
)
from .helpers import REPO, format_derived, imported_modules, luks_tpm, luks_tpm_json
from .tpm_proxy import (
    TPM_CC_HMAC,
    TPM_CC_START_AUTH_SESSION,
    TPMA_SESSION_ENCRYPT,
    TpmProxy,
    command_sessions,
    parse_start_auth_session,
    start_auth_session_handle,
)

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


@contextlib.contextmanager
def fsuid(uid: int) -> Iterator[None]:
    """This thread's filesystem uid, which the kernel gives a requested key (root keeps its euid)."""
    _libc.setfsuid(uid)
    try:
        yield
    finally:
        _libc.setfsuid(0)


def expected_app_key(tcti: str, uid: int, name: str, length: int) -> bytes:
    """The documented derivation, computed here with no code from luks_tpm.derive."""
    message = b"luks-tpm/app/v1\x00" + str(uid).encode() + b"\x00" + name.encode()
    with Tpm(tcti) as tpm:
        srk, _ = tpm_srk.current_srk(tpm)
        with (
            contextlib.closing(Sessions(tpm, reuse=False)) as sessions,
            sessions.hmac(srk) as session,
            tpm_keys.derived_primary(tpm) as primary,
            tpm_keys.hmac(tpm, primary, message, session) as secret,
        ):
            prk = bytes(secret.view())
    info = b"luks-tpm application key\x00" + str(uid).encode() + b"\x00" + name.encode() + length.to_bytes(2, "big")
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


def logon_key_line(serial: int) -> str:
    return next(line for line in Path("/proc/keys").read_text().splitlines() if int(line.split()[0], 16) == serial)


# ---- volume keys ---------------------------------------------------------------------------------------


def test_volume_key_lands_as_an_unreadable_logon_key(
    swtpm: Swtpm, upcall: Upcall, tmp_path: Path, passphrase_file: Path
) -> None:
    image = tmp_path / "volume.img"
    uuid = format_derived(image, swtpm.tcti, passphrase_file)["uuid"]
    upcall.serve_volume(uuid)
    header = file_digest(image)

    serial = request("logon", f"cryptsetup:{uuid}-d0", str(image))
    described = keyring.describe(serial)
    assert (described.type, described.description, described.uid) == ("logon", f"cryptsetup:{uuid}-d0", 0)
    assert described.perm == keyring.logon_key_permissions()
    assert logon_key_line(serial).endswith(": 64")  # the payload: 64 bytes, the volume key's size
    with pytest.raises(keyring.KeyringError) as caught:
        keyutils.read(serial)
    assert caught.value.errno == errno.EOPNOTSUPP
    assert file_digest(image) == header


def test_volume_found_by_uuid_among_block_devices(
    swtpm: Swtpm, upcall: Upcall, tmp_path: Path, passphrase_file: Path
) -> None:
    image = tmp_path / "volume.img"
    uuid = format_derived(image, swtpm.tcti, passphrase_file)["uuid"]
    upcall.serve_volume(uuid)
    assert ENOKEY_TEXT in refused("logon", f"cryptsetup:{uuid}-d0", "-")  # no block device has it yet
    attached = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=False)
    if attached.returncode:
        pytest.skip(f"cannot attach a loop device: {attached.stderr.strip()}")
    try:
        time.sleep(NEGATE_SECONDS + 1)  # the failed request's negative key expires
        serial = request("logon", f"cryptsetup:{uuid}-d0", "-")
        assert keyring.describe(serial).type == "logon" and logon_key_line(serial).endswith(": 64")
    finally:
        subprocess.run(["losetup", "--detach", attached.stdout.strip()], check=True)


def test_volume_requests_that_cannot_be_answered_are_negated(
    swtpm: Swtpm, upcall: Upcall, tmp_path: Path, passphrase_file: Path
) -> None:
    image = tmp_path / "volume.img"
    uuid = format_derived(image, swtpm.tcti, passphrase_file)["uuid"]
    other = make_luks_image(tmp_path / "other.img", uuid=str(uuid_module.uuid4()))  # no luks-tpm token
    upcall.serve_volume(uuid)
    upcall.serve_volume(other.uuid)
    header = file_digest(image)
    for description, callout in [
        (f"cryptsetup:{uuid}-d1", str(image)),  # the header has no digest 1
        (f"cryptsetup:{uuid}-d2", str(other.path)),  # another volume
        (f"cryptsetup:{uuid}-d3", "volume.img"),  # not an absolute path
        (f"cryptsetup:{uuid}-d4", str(tmp_path / "absent.img")),
        (f"cryptsetup:{uuid}-d5", "/dev/null"),  # not a block device or an image file
        (f"cryptsetup:{other.uuid}-d0", str(other.path)),  # no luks-tpm token to recover it with
    ]:
        assert ENOKEY_TEXT in refused("logon", description, callout), description
    with fsuid(1000), pytest.raises(keyring.KeyringError) as caught:  # volume keys are for root only
        keyutils.request_key("logon", f"cryptsetup:{uuid}-d0", str(image), keyring.SESSION)
    assert caught.value.errno == errno.ENOKEY
    assert file_digest(image) == header
    other.volume_key.close()
    other.passphrase.close()


def test_cleared_tpm_fails_fast_and_a_retry_after_the_fix_works(
    fresh_swtpm: Swtpm, upcalls: Callable[..., Upcall], tmp_path: Path
) -> None:
    upcall = upcalls(fresh_swtpm.tcti)
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(TEST_PASSPHRASE)
    image = tmp_path / "volume.img"
    uuid = format_derived(image, fresh_swtpm.tcti, passphrase)["uuid"]
    upcall.serve_volume(uuid)
    description = f"cryptsetup:{uuid}-d0"
    drop(request("logon", description, str(image)))
    before = take(request("user", upcall.app("svc"), "32"))

    fresh_swtpm.tpm2("clear")
    assert ENOKEY_TEXT in refused("logon", description, str(image))
    assert ENOKEY_TEXT in refused("logon", description, str(image))  # the negative key answers, no upcall
    # The application key is gone too: the same request now yields another key (the wipe).
    after = take(request("user", upcall.app("svc"), "32"))
    assert after != before

    # The fix: bind the volume to the new owner seed with its recovery passphrase.
    luks_tpm("enroll", image, "--mode", "derived", "--unlock-key-file", passphrase, tcti=fresh_swtpm.tcti)
    time.sleep(NEGATE_SECONDS + 1)
    serial = request("logon", description, str(image))
    assert keyring.describe(serial).type == "logon"


def test_a_tpm_that_never_answers_fails_the_request(
    upcalls: Callable[..., Upcall], tmp_path: Path, syslog_socket: socket.socket
) -> None:
    """The TSS waits for an answer forever; the handler's deadline negates the key instead."""
    listeners = []
    for path in (tmp_path / "silent.sock", tmp_path / "silent.sock.ctrl"):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(8)  # connections complete in the backlog and are never answered
        listeners.append(listener)
    try:
        upcall = upcalls(f"swtpm:path={tmp_path / 'silent.sock'}", "LUKS_TPM_REQUEST_DEADLINE=2")
        assert ENOKEY_TEXT in refused("user", upcall.app("silent"), "32")
        [line] = received(syslog_socket, upcall.prefix)
        assert "no answer after 2 s" in line and f"negated for {NEGATE_SECONDS} s" in line
    finally:
        for listener in listeners:
            listener.close()


# ---- application keys ------------------------------------------------------------------------------------


def test_app_key_follows_the_contract_and_is_stable(swtpm: Swtpm, upcall: Upcall) -> None:
    name = f"{upcall.prefix}myservice"
    first = take(request("user", upcall.app("myservice"), "32"))
    assert first == expected_app_key(swtpm.tcti, 0, name, 32)
    assert take(request("user", upcall.app("myservice"), "32")) == first  # a second upcall, same key
    assert take(request("user", upcall.app("other"), "32")) != first
    for length in (16, 64):
        key = take(request("user", upcall.app("myservice"), str(length)))
        assert len(key) == length and key[:16] != first[:16]  # the length is part of the derivation


def test_app_keys_differ_per_uid(swtpm: Swtpm, upcall: Upcall) -> None:
    name = f"{upcall.prefix}myservice"
    keys = {}
    for uid in (0, 1000, NOBODY):
        with fsuid(uid):
            serial = keyutils.request_key("user", upcall.app("myservice"), "32", keyring.SESSION)
        assert keyring.describe(serial).uid == uid
        keys[uid] = take(serial)
        assert keys[uid] == expected_app_key(swtpm.tcti, uid, name, 32)
    assert len(set(keys.values())) == 3


def test_app_key_for_an_unprivileged_process(swtpm: Swtpm, upcall: Upcall) -> None:
    """A process running as another user, in its own session keyring, gets its own uid's key."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run as another user")
    script = f'id=$(keyctl request2 user {upcall.app("myservice")} 32 @s) && keyctl pipe "$id" | sha256sum'
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "keyctl",
            "session",
            "-",
            "sh",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if "No such file or directory" in result.stderr:
        # ENOENT is the kernel's own failure to start /sbin/request-key (the handler only ever negates):
        # some kernels (seen on a 6.18 microVM kernel) start it only for requesters whose euid is 0.
        pytest.skip("this kernel does not run /sbin/request-key for a requester whose euid is not 0")
    assert result.returncode == 0, result.stderr
    expected = hashlib.sha256(expected_app_key(swtpm.tcti, NOBODY, f"{upcall.prefix}myservice", 32)).hexdigest()
    assert result.stdout.split()[0] == expected


def test_app_key_crosses_the_bus_encrypted(swtpm: Swtpm, upcalls: Callable[..., Upcall], tmp_path: Path) -> None:
    with TpmProxy(swtpm.socket, tmp_path / "proxy.sock") as (proxy, tcti):
        upcall = upcalls(tcti)
        key = take(request("user", upcall.app("bus"), "64"))
        started = {}
        hmacs = 0
        for command, response in proxy.exchanges:
            code = int.from_bytes(command[6:10], "big")
            if code == TPM_CC_START_AUTH_SESSION and response is not None:
                started[start_auth_session_handle(response)] = parse_start_auth_session(command)
            if code == TPM_CC_HMAC:
                hmacs += 1
                [(handle, attributes)] = command_sessions(command, handles=1)
                assert attributes & TPMA_SESSION_ENCRYPT, f"HMAC session attributes {attributes:#x}"
                start = started[handle]
                assert start.tpm_key >> 24 in (0x80, 0x81), f"not salted by the SRK: tpmKey {start.tpm_key:#x}"
                assert start.symmetric == (0x0006, 128, 0x0043)  # AES-128-CFB
        assert hmacs == 1, proxy.command_names()
        traffic = proxy.traffic
    message = b"luks-tpm/app/v1\x000\x00" + f"{upcall.prefix}bus".encode()
    with (
        Tpm(swtpm.tcti) as tpm,
        tpm_keys.derived_primary(tpm) as primary,  # in clear, not through the proxy
        secret_from_tpm2b(tpm.esys.hmac(primary, message, esys.PASSWORD)) as result,
    ):
        prk = bytes(result.view())
    for secret in (prk, key):
        assert not [i for i in range(len(secret) - 15) if secret[i : i + 16] in traffic], "crossed the bus in clear"


def test_app_key_length_and_name_are_checked(swtpm: Swtpm, upcall: Upcall) -> None:
    # A negative key answers every later request for its description: one description per case.
    for number, length in enumerate(["15", "65", "032", "abc", "", "16 "]):
        assert ENOKEY_TEXT in refused("user", upcall.app(f"len{number}"), length), length
    for name in ["bad/name", "bad name", "x" * 200]:  # the prefix makes the last one 213 characters
        assert ENOKEY_TEXT in refused("user", upcall.app(name), "32"), name
    assert len(take(request("user", upcall.app("x" * (200 - len(upcall.prefix))), "32"))) == 32


# ---- the handler itself ------------------------------------------------------------------------------------


def test_each_request_logs_one_line(swtpm: Swtpm, upcall: Upcall, syslog_socket: socket.socket) -> None:
    refused("user", upcall.app("short"), "8")
    [line] = received(syslog_socket, upcall.prefix)
    assert line.startswith("<83>")  # LOG_AUTHPRIV | LOG_ERR
    assert f"user {upcall.app('short')} for uid 0: invalid key length '8'" in line
    assert f"negated for {NEGATE_SECONDS} s" in line

    take(request("user", upcall.app("fine"), "32"))
    [line] = received(syslog_socket, upcall.prefix)
    assert line.startswith("<86>") and "instantiated key" in line  # LOG_AUTHPRIV | LOG_INFO

    refused("user", upcall.app("bad\nname"), "32")  # the requester chooses the description: still one line
    [line] = received(syslog_socket, upcall.prefix)
    assert "\n" not in line and f"{upcall.app('bad?name')} for uid 0: invalid application key name" in line


def test_without_the_authority_nothing_happens() -> None:
    """Run by hand, not by /sbin/request-key: it cannot act for any key, and says so."""
    result = luks_tpm("request-key", "1", "user", "luks-tpm:app:x", "32", "0", tcti=None, expect=2)
    assert "cannot act for key 1" in result.stderr and "Traceback" not in result.stderr
    result = luks_tpm("request-key", "1", "user", tcti=None, expect=2)
    assert "only /sbin/request-key can run it" in result.stderr


def test_the_handler_imports_no_click() -> None:
    code, modules, stderr = imported_modules("--tcti", "none", "request-key", "1", "user", "luks-tpm:app:x", "32", "0")
    assert code == 2 and "cannot act for key 1" in stderr, stderr
    assert "luks_tpm.requestkey" in modules, stderr
    assert not {"click", "luks_tpm.cli", "luks_tpm.tpm", "tpm2_pytss"} & modules, modules


# ---- installation and doctor ----------------------------------------------------------------------------


def test_make_install_puts_the_conf_in_place(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(REPO),
            "install",
            f"DESTDIR={tmp_path}",
            "LUKS_TPM=/opt/bin/luks-tpm",
            "TCTI=swtpm:path=/run/tpm.sock",
        ],
        check=True,
        capture_output=True,
    )
    conf = tmp_path / "etc/request-key.d/luks-tpm.conf"
    lines = [line.split() for line in conf.read_text().splitlines() if line and not line.startswith("#")]
    command = ["/opt/bin/luks-tpm", "--tcti", "swtpm:path=/run/tpm.sock", "request-key", "%k", "%t", "%d", "%c", "%S"]
    assert lines == [
        ["create", "logon", "cryptsetup:*", "*", *command],
        ["create", "user", "luks-tpm:app:*", "*", *command],
    ]
    assert conf.stat().st_mode & 0o777 == 0o644
    subprocess.run(["make", "-s", "-C", str(REPO), "uninstall", f"DESTDIR={tmp_path}"], check=True, capture_output=True)
    assert not conf.exists()


def test_doctor_says_whether_the_handler_is_installed(tmp_path: Path, swtpm: Swtpm) -> None:
    checks = {check["name"]: check for check in luks_tpm_json("doctor", tcti=swtpm.tcti)["checks"]}
    installed = Path("/etc/request-key.d/luks-tpm.conf").exists()
    assert ("handler installed" if installed else "not installed") in checks["request-key"]["detail"]

    helper = tmp_path / "request-key"
    helper.write_text("#!/bin/sh\n")
    helper.chmod(0o755)
    conf = tmp_path / "luks-tpm.conf"
    assert request_key_check(conf, helper).ok and "not installed" in request_key_check(conf, helper).detail

    conf.write_text(f"# comment\ncreate user luks-tpm:app:* * {helper} request-key %k %t %d %c %S\n")
    check = request_key_check(conf, helper)
    assert check.ok and "user luks-tpm:app:*" in check.detail and "TPM: the default" in check.detail
    conf.write_text(f"create user luks-tpm:app:* * {helper} --tcti swtpm:path=/s request-key %k %t %d %c %S\n")
    assert "TPM: swtpm:path=/s" in request_key_check(conf, helper).detail

    assert not request_key_check(conf, tmp_path / "absent").ok  # the kernel's helper is missing
    conf.write_text(f"create user luks-tpm:app:* * {tmp_path}/gone request-key %k %t %d %c %S\n")
    check = request_key_check(conf, helper)
    assert not check.ok and f"{tmp_path}/gone" in check.detail
