"""docs/security.md, "Bus" and "Memory": key material never crosses the TPM bus in clear, nor lingers in memory.

The bus tests put a recording proxy (tests/tpm_proxy.py) between luks-tpm and swtpm, which sees what an
interposer on the LPC/SPI bus would. Each proves it can fail: the same secret, fetched once *without*
response encryption through the same proxy, is found in the capture. The memory tests count the keys
in cores of the real command taken at each moment of the key's life, and prove the count works on the
same command made to keep a copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luks_tpm import cryptsetup, derive
from luks_tpm.model import SealedBlob
from luks_tpm.secret import Secret
from luks_tpm.tokenformat import DerivedToken, SealedToken, Token, parse
from luks_tpm.tpm import Tpm, esys
from luks_tpm.tpm import keys as tpm_keys
from luks_tpm.tpm import pcr as tpm_pcr
from luks_tpm.tpm import srk as tpm_srk
from luks_tpm.tpm.context import secret_from_tpm2b
from luks_tpm.tpm.sessions import Sessions

from .fixtures_luks import LuksImage
from .fixtures_tpm import Swtpm
from .helpers import REPO, format_derived, luks_tpm
from .memory_moments import MOMENTS, Copies, Run, cannot_trace, core_directory, find_copies, run_at_moments
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
    with (
        Tpm(tcti) as tpm,
        tpm_keys.derived_primary(tpm) as primary,
        secret_from_tpm2b(tpm.esys.hmac(primary, derive.hmac_message(uuid, salt), esys.PASSWORD)) as prk,
    ):
        return bytes(prk.view())


def _plain_unseal(tcti: str, token: Token) -> bytes:
    """Unseal with an unsalted policy session that does not encrypt the response."""
    assert isinstance(token, SealedToken) and isinstance(token.blob, SealedBlob)
    with Tpm(tcti) as tpm:
        parent = tpm_srk.srk_for(tpm, token.parent, None)
        sealed = tpm_keys.load_sealed(tpm, token.blob, parent)
        with tpm.session(esys.lib.TPM2_SE_POLICY) as session:  # unsalted: no parameter encryption
            assert not tpm.esys.trsess_get_attributes(session) & TPMA_SESSION_ENCRYPT
            tpm_pcr.apply_policy(tpm, session, token.pcr_policy(), trial=False)
            with secret_from_tpm2b(tpm.esys.unseal(sealed, session)) as key:
                return bytes(key.view())


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
        assert attributes & TPMA_SESSION_ENCRYPT, (
            f"{command_name(code)} session {handle:#x} has no ENCRYPT attribute ({attributes:#x})"
        )
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


def test_derived_hmac_response_is_encrypted_on_the_wire(
    tmp_path: Path, swtpm: Swtpm, proxy: TpmProxy, private_session_keyring: int
) -> None:
    image, recovery = tmp_path / "disk.img", tmp_path / "recovery"
    recovery.write_bytes(b"correct horse battery staple")
    formatted = format_derived(image, swtpm.tcti, recovery)
    uuid, token = formatted["uuid"], _token(image, formatted["token"])
    assert isinstance(token, DerivedToken) and token.wrapped_key is None

    luks_tpm("load-key", image, tcti=proxy.tcti)
    traffic = proxy.traffic
    _assert_bus_protected(proxy, TPM_CC_HMAC)

    prk = _plain_hmac(swtpm.tcti, uuid, token.salt)  # directly, not through the proxy
    with derive.expand(Secret.copy_of(bytearray(prk), zero_source=False), uuid, 64) as volume_key:
        with cryptsetup.open_device(image) as device:
            assert device.volume_key_verify(volume_key), "the test's own derivation is wrong"
        key = bytes(volume_key.view())
    assert _leaks(prk, traffic) == [], "the PRK (TPM2_HMAC result) crossed the bus in clear"
    assert _leaks(key, traffic) == [], "the volume key crossed the bus in clear"

    # The capture would have shown it: the same HMAC without response encryption, through the proxy.
    proxy.reset()
    assert _plain_hmac(proxy.tcti, uuid, token.salt) == prk
    assert _leaks(prk, proxy.traffic), "the proxy does not see an unencrypted HMAC response"


def test_unseal_response_is_encrypted_on_the_wire(
    luks_volume: LuksImage, swtpm: Swtpm, proxy: TpmProxy, passphrase_file: Path, private_session_keyring: int
) -> None:
    enrolled = luks_tpm(
        "--json",
        "enroll",
        luks_volume.path,
        "--mode",
        "sealed",
        "--pcrs",
        "7",
        "--unlock-key-file",
        passphrase_file,
        tcti=swtpm.tcti,
    )
    token_id = int(re.search(r'"token": (\d+)', enrolled.stdout)[1])  # type: ignore[index]
    key = bytes(luks_volume.volume_key.view())

    luks_tpm("load-key", luks_volume.path, tcti=proxy.tcti)
    _assert_bus_protected(proxy, TPM_CC_UNSEAL)
    assert _leaks(key, proxy.traffic) == [], "the volume key crossed the bus in clear"

    proxy.reset()
    assert _plain_unseal(proxy.tcti, _token(luks_volume.path, token_id)) == key
    assert _leaks(key, proxy.traffic), "the proxy does not see an unencrypted Unseal response"


def test_key_recovery_session_is_salted_and_encrypts_responses(swtpm: Swtpm, proxy: TpmProxy) -> None:
    with Tpm(proxy.tcti) as tpm, contextlib.closing(Sessions(tpm, reuse=True)) as sessions:
        srk, _ = tpm_srk.current_srk(tpm)
        with sessions.hmac(srk) as session:
            attributes = tpm.esys.trsess_get_attributes(session.handle)
        assert attributes & TPMA_SESSION_ENCRYPT, f"{attributes:#x}"
        assert attributes & esys.lib.TPMA_SESSION_CONTINUESESSION, "the session is meant for reuse across volumes"
        starts = [
            parse_start_auth_session(command)
            for command, _ in proxy.exchanges
            if int.from_bytes(command[6:10], "big") == TPM_CC_START_AUTH_SESSION
        ]
        assert len(starts) == 1, proxy.command_names()
        start = starts[0]
        assert start.tpm_key >> 24 in (0x80, 0x81), f"tpmKey {start.tpm_key:#x}: not salted with the SRK"
        assert start.bind == 0x40000007, f"bind {start.bind:#x} (expected TPM_RH_NULL)"
        assert len(start.encrypted_salt) > 0
        assert start.session_type == 0x00  # TPM_SE_HMAC
        assert start.symmetric == (TPM_ALG_AES, 128, TPM_ALG_CFB)


# ---- TPM commands per load-key ---------------------------------------------------------------------------


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent-srk", "transient-srk"])
def test_tpm_commands_per_load_key(
    persistent: bool,
    fresh_swtpm: Swtpm,
    luks_volume: LuksImage,
    tmp_path: Path,
    passphrase_file: Path,
    private_session_keyring: int,
    record_property: Callable[[str, object], None],
) -> None:
    if persistent:
        luks_tpm("persist-srk", tcti=fresh_swtpm.tcti)
    derived_image = tmp_path / "derived.img"
    format_derived(derived_image, fresh_swtpm.tcti, passphrase_file)
    luks_tpm(
        "enroll",
        luks_volume.path,
        "--mode",
        "sealed",
        "--pcrs",
        "7",
        "--unlock-key-file",
        passphrase_file,
        tcti=fresh_swtpm.tcti,
    )
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
# The real `luks-tpm load-key` runs under gdb (tests/memory_moments.py), which writes a core at each
# moment of the key's life; every 16-byte window of each key is counted in each core. While the key is
# in use there is exactly one copy: the Secret whose address the caller hands to libcryptsetup and to
# add_key. Once handed over, and at exit, there is none; the PRK and the KEK are gone before the
# volume key is even verified. The sealed shape has a PIN, which is counted too (_assert_pin_copies).

SHAPES = ["derived-64", "derived-kek", "sealed"]

# A copy of the key that careless code would keep: a plain bytes object made just before verifying it.
_CARELESS = r"""
from luks_tpm import cryptsetup
from luks_tpm.__main__ import main

held = []
verify = cryptsetup.Device.volume_key_verify


def careless_verify(self, key):
    held.append(bytes(key.view()))
    return verify(self, key)


cryptsetup.Device.volume_key_verify = careless_verify
main()
"""


@pytest.fixture
def traceable() -> None:
    reason = cannot_trace()
    if reason is not None:
        pytest.skip(reason)


def _volume_key(image: Path, passphrase: Path, directory: Path) -> bytes:
    """The volume key as cryptsetup itself reads it from the header, not as luks-tpm computes it."""
    dump = directory / "volume-key"
    subprocess.run(
        [
            "cryptsetup",
            "luksDump",
            "--dump-volume-key",
            "--volume-key-file",
            str(dump),
            "--key-file",
            str(passphrase),
            "-q",
            str(image),
        ],
        check=True,
        capture_output=True,
    )
    try:
        return dump.read_bytes()
    finally:
        dump.unlink()


@dataclasses.dataclass(frozen=True)
class Bound:
    image: Path
    needles: dict[str, bytes]  # the volume key, and the PRK, KEK or PIN it came from
    load_options: list[str]


def _prepare(shape: str, tmp_path: Path, swtpm: Swtpm, volume: LuksImage, passphrase: Path) -> Bound:
    """An image bound in `shape` and the keys to look for in load-key's memory."""
    options: list[str] = []
    if shape == "derived-64":  # `format`: the derived key is the volume key
        image = tmp_path / "derived.img"
        formatted = format_derived(image, swtpm.tcti, passphrase)
        uuid, token_id = formatted["uuid"], formatted["token"]
    else:
        image, uuid = volume.path, volume.uuid
        if shape == "sealed":  # with a PIN: the PIN is a secret the TSS handles too
            pin_file = tmp_path / "pin"
            pin_file.write_bytes(os.urandom(10).hex().encode())  # 20 bytes: 5 windows of 16
            options = ["--pin-file", str(pin_file)]
        enrolled = luks_tpm(
            "--json",
            "enroll",
            image,
            "--mode",
            shape.split("-", maxsplit=1)[0],
            *(["--pcrs", "7"] if shape == "sealed" else []),
            *options,
            "--unlock-key-file",
            passphrase,
            tcti=swtpm.tcti,
        )
        token_id = int(re.search(r'"token": (\d+)', enrolled.stdout)[1])  # type: ignore[index]
    needles = {"volume key": _volume_key(image, passphrase, tmp_path)}
    token = _token(image, token_id)
    if isinstance(token, DerivedToken):
        prk = _plain_hmac(swtpm.tcti, uuid, token.salt)
        size = len(needles["volume key"]) if token.wrapped_key is None else derive.KEK_SIZE
        with derive.expand(Secret.copy_of(bytearray(prk)), uuid, size) as okm:
            derived = bytes(okm.view())
        needles["PRK"] = prk
        if token.wrapped_key is None:
            assert derived == needles["volume key"], "the test's derivation does not give the volume key"
        else:
            needles["KEK"] = derived
    else:
        assert token.pin
        needles["PIN"] = pin_file.read_bytes()
    expected = {"derived-64": {"PRK"}, "derived-kek": {"PRK", "KEK"}, "sealed": {"PIN"}}[shape]
    assert set(needles) == {"volume key"} | expected, set(needles)
    return Bound(image, needles, options)


def _copies_at_moments(
    argv: list[str], tmp_path: Path, needles: dict[str, bytes]
) -> tuple[Run, dict[str, dict[str, Copies]]]:
    """Run `argv` under gdb and count the needles in each moment's core; each core (it holds the key) is
    deleted as soon as it is counted."""
    environment = {k: v for k, v in os.environ.items() if k not in {"LUKS_TPM_TCTI", "TPM2TOOLS_TCTI"}}
    copies = {}
    with core_directory(tmp_path) as directory:
        run = run_at_moments(argv, directory, cwd=REPO, env=environment)
        for name, moment in run.moments.items():
            copies[name] = find_copies(moment.core, needles)
            moment.core.unlink()
    return run, copies


def _summary(copies: dict[str, dict[str, Copies]]) -> str:
    return "; ".join(
        f"{moment}: " + ", ".join(f"{name} {found.most}" for name, found in by_name.items())
        for moment, by_name in copies.items()
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_one_copy_of_the_key_while_in_use_and_none_after(
    shape: str,
    traceable: None,
    tmp_path: Path,
    swtpm: Swtpm,
    luks_volume: LuksImage,
    passphrase_file: Path,
    private_session_keyring: int,
    record_property: Callable[[str, object], None],
) -> None:
    bound = _prepare(shape, tmp_path, swtpm, luks_volume, passphrase_file)
    run, copies = _copies_at_moments(
        [sys.executable, "-m", "luks_tpm", "--tcti", swtpm.tcti, "load-key", *bound.load_options, str(bound.image)],
        tmp_path,
        bound.needles,
    )
    summary = _summary(copies)
    record_property("key_copies", summary)
    print(f"copies per moment, {shape}: {summary}")
    assert run.exit_code == 0, f"load-key under gdb did not succeed:\n{run.output}"
    assert tuple(run.moments) == MOMENTS, f"moments seen: {list(run.moments)}\n{run.output}"
    key = bound.needles["volume key"]
    verify, add_key = run.moments["verify"], run.moments["add_key"]
    secret = verify.address
    assert secret is not None and verify.length == add_key.length == len(key), run.output
    assert add_key.address == secret, "the kernel was handed another buffer than the one libcryptsetup verified"

    for moment in MOMENTS:
        for name, found in copies[moment].items():
            if name in ("PRK", "KEK") or (name == "volume key" and moment in ("after", "exit")):
                assert found.most == 0, f"{name} left in memory at {moment}: {found.describe()}"
    whole = list(range(len(key) - 15))
    for moment in ("verify", "add_key"):
        found = copies[moment]["volume key"]
        assert found.least == found.most == 1 and found.starts == {secret: whole}, (
            f"at {moment}, expected the key once, in the Secret at {secret:#x}: {found.describe()}"
        )
    # Inside its PBKDF2, libcryptsetup holds a second copy of its own: crypt_volume_key_verify copies the
    # key it is given into a `struct volume_key` for the digest handler and wipes it before returning
    # (at add_key it is gone). It appears inside the one C call, where no Python code runs, so it is not
    # ours; any copy beyond that one would be. (Once EVP_KDF_derive runs, OpenSSL's PBKDF2 context holds
    # a third, freed with OPENSSL_clear_free; the moment is the entry of that call, before it.)
    found = copies["pbkdf2"]["volume key"]
    others = {start: windows for start, windows in found.starts.items() if start != secret}
    assert found.starts.get(secret) == whole, f"the Secret at {secret:#x} is not in the core: {found.describe()}"
    assert found.most <= 2 and len(others) <= 1, (
        f"more copies during verification than libcryptsetup's own: {found.describe()}"
    )
    if "PIN" in bound.needles:
        _assert_pin_copies(copies, len(bound.needles["PIN"]))


def _assert_pin_copies(copies: dict[str, dict[str, Copies]], length: int) -> None:
    """The PIN that unsealed is kept in a Secret for the rest of the pass (KeyRecovery.verified_pins) and
    closed at its end. Beyond it, tpm2-tss 4.0 keeps sessionKey || authValue in the policy session's record
    (the HMAC key of the session) and frees it without zeroing: one copy that public ESYS calls cannot
    reach, left for an upstream fix. No copy may remain as a TPM2B (its size field just before it): that
    would be ESYS's record of the object's auth value (cleared before the flush) or our TPM2B_AUTH."""
    size = length.to_bytes(2, "little")
    for moment in MOMENTS:
        found = copies[moment]["PIN"]
        as_tpm2b = [start for start, before in found.before.items() if before == size]
        assert not as_tpm2b, f"the PIN is left in a TPM2B at {moment}: {[hex(a) for a in as_tpm2b]}"
    for moment, most in (("after", 2), ("exit", 1)):
        found = copies[moment]["PIN"]
        assert found.most <= most, (
            f"more copies of the PIN at {moment} than the Secret and ESYS's session record: {found.describe()}"
        )


def test_the_memory_scan_finds_a_copy_the_process_keeps(
    traceable: None,
    tmp_path: Path,
    swtpm: Swtpm,
    luks_volume: LuksImage,
    passphrase_file: Path,
    private_session_keyring: int,
) -> None:
    """The control: the same command, moments and count, with one careless `bytes` copy made before
    verification; every moment must show it, or the counts above prove nothing."""
    bound = _prepare("derived-64", tmp_path, swtpm, luks_volume, passphrase_file)
    careless = tmp_path / "careless.py"  # a file: gdb passes arguments on as one line, which -c's would not survive
    careless.write_text(_CARELESS)
    run, copies = _copies_at_moments(
        [sys.executable, str(careless), "--tcti", swtpm.tcti, "load-key", str(bound.image)], tmp_path, bound.needles
    )
    assert run.exit_code == 0, f"load-key under gdb did not succeed:\n{run.output}"
    assert tuple(run.moments) == MOMENTS, f"moments seen: {list(run.moments)}\n{run.output}"
    expected = {"verify": 2, "pbkdf2": 3, "add_key": 2, "after": 1, "exit": 1}
    seen = {moment: copies[moment]["volume key"].most for moment in MOMENTS}
    assert all(seen[moment] >= least for moment, least in expected.items()), (
        f"the scan misses a copy the process keeps: {seen} (at least {expected})"
    )
    print(f"copies per moment, careless control: {_summary(copies)}")
