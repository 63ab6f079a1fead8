"""docs/security.md, "Bus" and "Memory": key material never crosses the TPM bus in clear, nor lingers in memory.

The bus tests put a recording proxy (tests/tpm_proxy.py) between luks-tpm and swtpm, which sees what an
interposer on the LPC/SPI bus would. Each proves it can fail: the same secret, fetched once *without*
response encryption through the same proxy, is found in the capture. The memory test scans a live
process that has just unlocked, and proves the scan works on a process that deliberately keeps a copy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_SESSION
from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC, TPML_PCR_SELECTION

from luks_tpm import cryptsetup, derive
from luks_tpm.model import DerivedToken, SealedToken, Token, parse
from luks_tpm.secret import Secret
from luks_tpm.tpm import Tpm
from luks_tpm.tpm import keys as tpm_keys
from luks_tpm.tpm import srk as tpm_srk
from luks_tpm.unlock import KeyRecovery

from .fixtures_luks import LuksImage
from .fixtures_tpm import Swtpm
from .helpers import REPO, format_derived, luks_tpm
from .tpm_proxy import (
    TPM_CC_HMAC,
    TPM_CC_START_AUTH_SESSION,
    TPM_CC_UNSEAL,
    TPMA_SESSION_ENCRYPT,
    TpmProxy,
    command_name,
    command_sessions,
    parse_start_auth_session,
    start_auth_session_handle,
)

TPM_ALG_AES, TPM_ALG_CFB = 0x0006, 0x0043
DERIVED_GOAL, SEALED_GOAL = 5, 7  # TPM commands per load-key with a persistent SRK (issues 3 and 4)


@pytest.fixture
def proxy(swtpm: Swtpm, tmp_path: Path) -> Iterator[TpmProxy]:
    with TpmProxy(swtpm.socket, tmp_path / "proxy.sock") as (running, _):
        yield running


def _token(image: Path, token_id: int) -> Token:
    with cryptsetup.open_device(image) as device:
        return parse(device.token_json_get(token_id) or "", token_id)


def _leaks(secret: bytes, traffic: bytes) -> list[int]:
    """Offsets in `secret` of every 16-byte run that also occurs in `traffic` (a partial leak counts)."""
    assert len(secret) >= 16
    return [i for i in range(len(secret) - 15) if secret[i : i + 16] in traffic]


def _plain_hmac(tcti: str, uuid: str, salt: bytes) -> bytes:
    """The PRK, computed the way luks-tpm does but with a password session: no response encryption."""
    with Tpm(tcti) as tpm, tpm_keys.derived_primary(tpm) as primary:
        return bytes(tpm.esapi.hmac(primary, derive.hmac_message(uuid, salt), TPM2_ALG.SHA256))


def _plain_unseal(tcti: str, token: Token) -> bytes:
    """Unseal with an unsalted policy session that does not encrypt the response."""
    assert isinstance(token, SealedToken)
    with Tpm(tcti) as tpm:
        parent = tpm_srk.srk_for(tpm, token.parent, None)
        public, _ = TPM2B_PUBLIC.unmarshal(token.blob.public)
        private, _ = TPM2B_PRIVATE.unmarshal(token.blob.private)
        sealed = tpm.track(tpm.esapi.load(parent, private, public))
        session = tpm.track(tpm.esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, "null",
                                                           TPM2_ALG.SHA256))
        tpm.esapi.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION)
        assert not int(tpm.esapi.trsess_get_attributes(session)) & TPMA_SESSION_ENCRYPT
        selection = TPML_PCR_SELECTION.parse(f"{token.pcr_bank}:{','.join(map(str, token.pcrs))}")
        tpm.esapi.policy_pcr(session, b"", selection)
        return bytes(tpm.esapi.unseal(sealed, session1=session))


def _assert_bus_protected(proxy: TpmProxy, code: int) -> list[str]:
    """Every `code` command (HMAC, Unseal) on the wire used a session with ENCRYPT set that was started
    salted with a loaded/persistent key and AES-128-CFB; returns how each session was started, for messages."""
    started: dict[int, object] = {}
    seen = []
    for command, response in proxy.exchanges:
        command_code = int.from_bytes(command[6:10], "big")
        if command_code == TPM_CC_START_AUTH_SESSION and response is not None:
            started[start_auth_session_handle(response)] = parse_start_auth_session(command)
        if command_code != code:
            continue
        sessions = command_sessions(command, handles=1)
        assert sessions, f"{command_name(code)} was sent without an authorization area"
        handle, attributes = sessions[0]
        assert attributes & TPMA_SESSION_ENCRYPT, \
            f"{command_name(code)} session {handle:#x} has no ENCRYPT attribute ({attributes:#x})"
        start = started.get(handle)
        assert start is not None, f"{command_name(code)} used session {handle:#x}, not started in this capture"
        tpm_key = start.tpm_key  # type: ignore[attr-defined]
        assert tpm_key >> 24 in (0x80, 0x81), f"session {handle:#x} is not salted: tpmKey {tpm_key:#x}"
        assert len(start.encrypted_salt) > 0, f"session {handle:#x} was started with an empty salt"  # type: ignore[attr-defined]
        assert start.symmetric == (TPM_ALG_AES, 128, TPM_ALG_CFB), start.symmetric  # type: ignore[attr-defined]
        seen.append(f"{command_name(code)} in session {handle:#x} salted by {tpm_key:#x}")
    assert seen, f"no {command_name(code)} in the capture: {proxy.command_names()}"
    return seen


# ---- bus ----------------------------------------------------------------------------------------------


def test_derived_hmac_response_is_encrypted_on_the_wire(tmp_path: Path, swtpm: Swtpm, proxy: TpmProxy,
                                                         private_session_keyring: int) -> None:
    image, recovery = tmp_path / "disk.img", tmp_path / "recovery"
    recovery.write_bytes(b"correct horse battery staple")
    formatted = format_derived(image, swtpm.tcti, recovery)
    uuid, token = formatted["uuid"], _token(image, formatted["token"])
    assert isinstance(token, DerivedToken) and token.wrapped_key is None

    luks_tpm("load-key", image, tcti=proxy.tcti)
    traffic = proxy.traffic
    _assert_bus_protected(proxy, TPM_CC_HMAC)

    prk = _plain_hmac(swtpm.tcti, uuid, token.salt)  # directly, not through the proxy
    with derive.expand(Secret.copy_of(bytearray(prk), wipe_source=False), uuid, 64) as volume_key:
        with cryptsetup.open_device(image) as device:
            assert device.volume_key_verify(volume_key), "the test's own derivation is wrong"
        key = bytes(volume_key.view())
    assert _leaks(prk, traffic) == [], "the PRK (TPM2_HMAC result) crossed the bus in clear"
    assert _leaks(key, traffic) == [], "the volume key crossed the bus in clear"

    # The capture would have shown it: the same HMAC without response encryption, through the proxy.
    proxy.reset()
    assert _plain_hmac(proxy.tcti, uuid, token.salt) == prk
    assert _leaks(prk, proxy.traffic), "the proxy does not see an unencrypted HMAC response"


def test_unseal_response_is_encrypted_on_the_wire(luks_volume: LuksImage, swtpm: Swtpm, proxy: TpmProxy,
                                                  passphrase_file: Path, private_session_keyring: int) -> None:
    enrolled = luks_tpm("--json", "enroll", luks_volume.path, "--mode", "sealed", "--pcrs", "7",
                        "--unlock-key-file", passphrase_file, tcti=swtpm.tcti)
    token_id = int(re.search(r'"token": (\d+)', enrolled.stdout)[1])  # type: ignore[index]
    key = bytes(luks_volume.volume_key.view())

    luks_tpm("load-key", luks_volume.path, tcti=proxy.tcti)
    _assert_bus_protected(proxy, TPM_CC_UNSEAL)
    assert _leaks(key, proxy.traffic) == [], "the volume key crossed the bus in clear"

    proxy.reset()
    assert _plain_unseal(proxy.tcti, _token(luks_volume.path, token_id)) == key
    assert _leaks(key, proxy.traffic), "the proxy does not see an unencrypted Unseal response"


def test_key_recovery_session_is_salted_and_encrypts_responses(swtpm: Swtpm, proxy: TpmProxy) -> None:
    with Tpm(proxy.tcti) as tpm, KeyRecovery(tpm, many_volumes=True) as recovery:
        srk, _ = tpm_srk.current_srk(tpm)
        session, _ = recovery._session(srk, policy=False)
        attributes = int(tpm.esapi.trsess_get_attributes(session))
        assert attributes & TPMA_SESSION.ENCRYPT, f"{attributes:#x}"
        assert attributes & TPMA_SESSION.CONTINUESESSION, "the session is meant for reuse across volumes"
        starts = [parse_start_auth_session(command) for command, _ in proxy.exchanges
                  if int.from_bytes(command[6:10], "big") == TPM_CC_START_AUTH_SESSION]
        assert len(starts) == 1, proxy.command_names()
        start = starts[0]
        assert start.tpm_key >> 24 in (0x80, 0x81), f"tpmKey {start.tpm_key:#x}: not salted with the SRK"
        assert start.bind == 0x40000007, f"bind {start.bind:#x} (expected TPM_RH_NULL)"
        assert len(start.encrypted_salt) > 0
        assert start.session_type == 0x00  # TPM_SE_HMAC
        assert start.symmetric == (TPM_ALG_AES, 128, TPM_ALG_CFB)


# ---- TPM commands per load-key ---------------------------------------------------------------------------


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent-srk", "transient-srk"])
def test_tpm_commands_per_load_key(persistent: bool, fresh_swtpm: Swtpm, luks_volume: LuksImage, tmp_path: Path,
                                   passphrase_file: Path, private_session_keyring: int,
                                   record_property: Callable[[str, object], None]) -> None:
    if persistent:
        luks_tpm("persist-srk", tcti=fresh_swtpm.tcti)
    derived_image = tmp_path / "derived.img"
    format_derived(derived_image, fresh_swtpm.tcti, passphrase_file)
    luks_tpm("enroll", luks_volume.path, "--mode", "sealed", "--pcrs", "7", "--unlock-key-file", passphrase_file,
             tcti=fresh_swtpm.tcti)
    sequences: dict[str, list[str]] = {}
    with TpmProxy(fresh_swtpm.socket, tmp_path / "proxy.sock") as (proxy, tcti):
        for mode, image in (("derived", derived_image), ("sealed", luks_volume.path)):
            proxy.reset()
            luks_tpm("load-key", image, tcti=tcti)
            sequences[mode] = proxy.command_names()
    summary = "; ".join(f"{mode}: {len(names)} ({', '.join(names)})" for mode, names in sequences.items())
    record_property("tpm_commands", summary)
    print(f"TPM commands per load-key, {'persistent' if persistent else 'transient'} SRK: {summary}")
    if persistent:
        assert len(sequences["sealed"]) <= SEALED_GOAL, summary
        assert len(sequences["derived"]) <= DERIVED_GOAL, summary
    else:  # recorded, not a goal: the SRK is created (CreatePrimary) and flushed each time
        assert len(sequences["derived"]) <= DERIVED_GOAL + 2 and len(sequences["sealed"]) <= SEALED_GOAL + 1, summary


# ---- memory -------------------------------------------------------------------------------------------

_CHILD = r"""
import sys
from pathlib import Path

from luks_tpm import keyring
from luks_tpm.activate import load_keys
from luks_tpm.cryptsetup import open_device
from luks_tpm.secret import make_undumpable
from luks_tpm.tpm import Tpm
from luks_tpm.unlock import KeyRecovery, recover_verified

mode, tcti, image = sys.argv[1:4]
make_undumpable()  # as the command line does
keyring.join_session_keyring()
held = None
if mode == "load-key":
    load_keys(tcti, [Path(image)], keyring.SESSION, None, False, None, lambda _id: None)
elif mode == "hold":  # the control case: keeps a plain copy of the key, as careless code would
    with open_device(Path(image)) as device, Tpm(tcti) as tpm, KeyRecovery(tpm) as recovery:
        found = recover_verified(device, recovery)
        held = bytes(found.key.view())
        found.key.close()
print("ready", flush=True)
sys.stdin.read()
"""


def _scan(pid: int, needles: dict[str, bytes]) -> dict[str, list[str]]:
    """Where in process `pid`'s readable memory each needle (or any 16-byte run of it) occurs."""
    found: dict[str, list[str]] = {name: [] for name in needles}
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    try:
        mem = open(f"/proc/{pid}/mem", "rb", buffering=0)  # noqa: SIM115 (closed below)
    except PermissionError as error:
        pytest.fail(f"cannot read /proc/{pid}/mem ({error}): the scan needs root with CAP_SYS_PTRACE, "
                    "since the unlocking process is not dumpable")
    with mem:
        for line in maps:
            fields = line.split(maxsplit=5)
            if "r" not in fields[1]:
                continue
            start, end = (int(value, 16) for value in fields[0].split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:  # [vvar] and similar special mappings cannot be read
                continue
            where = fields[5].strip() if len(fields) > 5 else "[anon]"
            for name, needle in needles.items():
                for i in range(0, len(needle) - 15, 16):
                    offset = data.find(needle[i : i + 16])
                    if offset >= 0:
                        found[name].append(f"{where} +{offset:#x} (bytes {i}..{i + 15})")
    return {name: places for name, places in found.items() if places}


def _run_child(mode: str, tcti: str, image: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, mode, tcti, str(image)], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout is not None
    line = child.stdout.readline()
    if line.strip() != "ready":
        child.kill()
        _, stderr = child.communicate()
        pytest.fail(f"the child did not get ready: {line!r} {stderr}")
    return child


def _finish(child: subprocess.Popen[str]) -> None:
    child.communicate(input="", timeout=30)


@pytest.mark.parametrize("mode", ["derived", "sealed"])
def test_no_key_material_left_in_memory_after_load_key(mode: str, swtpm: Swtpm, luks_volume: LuksImage,
                                                       passphrase_file: Path) -> None:
    luks_tpm("enroll", luks_volume.path, "--mode", mode, *(["--pcrs", "7"] if mode == "sealed" else []),
             "--unlock-key-file", passphrase_file, tcti=swtpm.tcti)
    needles = {"volume key": bytes(luks_volume.volume_key.view())}
    if mode == "derived":
        token = _token(luks_volume.path, 0)
        assert isinstance(token, DerivedToken)
        prk = _plain_hmac(swtpm.tcti, luks_volume.uuid, token.salt)
        with derive.expand(Secret.copy_of(bytearray(prk)), luks_volume.uuid, derive.KEK_SIZE) as kek:
            needles |= {"PRK": prk, "KEK": bytes(kek.view())}

    # Control: the scan finds a key the process still holds.
    child = _run_child("hold", swtpm.tcti, luks_volume.path)
    try:
        assert os.geteuid() == 0, "reading another process's memory needs root"
        held = _scan(child.pid, {"volume key": needles["volume key"]})
        assert "volume key" in held, "the memory scan cannot find a key the process deliberately holds"
    finally:
        _finish(child)

    child = _run_child("load-key", swtpm.tcti, luks_volume.path)
    try:
        lingering = _scan(child.pid, needles)
    finally:
        _finish(child)
    assert lingering == {}, f"key material left in the memory of a process that loaded the key: {lingering}"
