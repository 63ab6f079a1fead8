"""TPM-sealed, PCR-bound tokens end to end (issue 4): real swtpm, real image files, the real CLI.

Tests that extend PCRs, clear the TPM or burn dictionary-attack tries get a TPM of their own
(`fresh_swtpm`); the others share the session swtpm, which must be left with nothing loaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from luks_tpm import cryptsetup
from luks_tpm.model import Bank
from luks_tpm.tpm import Tpm
from luks_tpm.tpm.pcr import pcr_values

from .fixtures_luks import LuksImage, file_digest, make_luks_image
from .fixtures_tpm import Swtpm
from .helpers import assert_one_line_error, luks_tpm, luks_tpm_json
from .tpm_proxy import TPM_CC_UNSEAL, TPMA_SESSION_ENCRYPT, TpmProxy, command_sessions

TPMA_FIXEDTPM = 0x2
TPMA_FIXEDPARENT = 0x10
TPMA_USERWITHAUTH = 0x40
TPMA_NODA = 0x400

# ---- helpers ----------------------------------------------------------------------------------------


def enroll_sealed(image: Path, tcti: str, passphrase_file: Path, *extra: str | Path, pcrs: str = "7") -> int:
    args: list[str | Path] = ["enroll", image, "--mode", "sealed", "--unlock-key-file", passphrase_file]
    if pcrs:
        args += ["--pcrs", pcrs]
    enrolled = luks_tpm_json(*args, *extra, tcti=tcti)
    assert enrolled["mode"] == "sealed"
    token_id: int = enrolled["token"]
    return token_id


def enroll_derived(image: Path, tcti: str, passphrase_file: Path) -> int:
    token_id: int = luks_tpm_json(
        "enroll", image, "--mode", "derived", "--unlock-key-file", passphrase_file, tcti=tcti
    )["token"]
    return token_id


def token_json(image: Path, token_id: int) -> dict[str, Any]:
    with cryptsetup.open_device(image) as device:
        text = device.token_json_get(token_id)
    assert text is not None, f"no token {token_id}"
    value: dict[str, Any] = json.loads(text)
    return value


def luks_tpm_token_ids(image: Path) -> list[int]:
    with cryptsetup.open_device(image) as device:
        return [token_id for token_id, kind in device.tokens() if kind == "luks-tpm"]


def pcr(tcti: str, index: int) -> bytes:
    with Tpm(tcti) as tpm:
        return pcr_values(tpm, Bank.SHA256, [index])[index]


def extend(swtpm: Swtpm, index: int, data: bytes) -> bytes:
    """Extend a sha256 PCR with tpm2_pcrextend as an operator (or firmware) would; returns the new value."""
    digest = hashlib.sha256(data).digest()
    expected = hashlib.sha256(pcr(swtpm.tcti, index) + digest).digest()
    swtpm.tpm2("pcrextend", f"{index}:sha256={digest.hex()}")
    assert pcr(swtpm.tcti, index) == expected
    return expected


def predicted_after_extend(tcti: str, index: int, data: bytes) -> bytes:
    """What PCR `index` will hold after extending it with sha256(data): sha256(old || digest)."""
    return hashlib.sha256(pcr(tcti, index) + hashlib.sha256(data).digest()).digest()


def sealed_attributes(image: Path, token_id: int) -> int:
    """objectAttributes of the sealed object, read from the marshalled TPM2B_PUBLIC in the token:
    size (2) | type (2) | nameAlg (2) | objectAttributes (4) | ..."""
    public = base64.b64decode(token_json(image, token_id)["blob"]["public"])
    assert int.from_bytes(public[0:2], "big") == len(public) - 2
    assert int.from_bytes(public[2:4], "big") == 0x0008  # TPM2_ALG_KEYEDHASH
    return int.from_bytes(public[6:10], "big")


def status_token(image: Path, tcti: str, token_id: int) -> dict[str, Any]:
    volume = luks_tpm_json("status", image, tcti=tcti, expect=(0, 5))["volumes"][0]  # 5: the volume would not unlock
    (token,) = [t for t in volume["tokens"] if t["id"] == token_id]
    return token  # type: ignore[no-any-return]


def lockout(tcti: str) -> dict[str, Any]:
    state: dict[str, Any] = luks_tpm_json("doctor", tcti=tcti)["lockout"]
    return state


def load_key(image: Path, tcti: str, *args: str | Path, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """load-key with standard input a pipe (never the test runner's terminal)."""
    return luks_tpm("load-key", image, *args, tcti=tcti, expect=expect, stdin=b"")


def loaded_token(image: Path, tcti: str, *args: str | Path) -> int:
    result = load_key(image, tcti, *args)
    serial = result.stdout.split()[0]
    assert int(serial) > 0
    # which token did it: ask again with --json (same key, replaced in the keyring)
    token_id: int = json.loads(luks_tpm("--json", "load-key", image, *args, tcti=tcti, stdin=b"").stdout)["token"]
    return token_id


def kill_keyslot(image: Path, slot: int) -> None:
    subprocess.run(
        ["cryptsetup", "luksKillSlot", "--batch-mode", str(image), str(slot)], check=True, capture_output=True
    )
    with cryptsetup.open_device(image) as device:
        assert device.keyslots() == []


# ---- 1. PCR change, diagnosis, reseal with the recovery key -------------------------------------------


def test_pcr_change_is_named_and_reseal_with_recovery_key_restores(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, private_session_keyring: int
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    old_id = enroll_sealed(image, tcti, passphrase_file)
    token = token_json(image, old_id)
    assert token["mode"] == "sealed" and token["pcrs"] == [7] and token["pcr_bank"] == "sha256"
    assert token["pin"] is False and token["keyslots"] == []
    assert token["pcr_values"] == {"7": pcr(tcti, 7).hex()}
    assert loaded_token(image, tcti) == old_id
    assert status_token(image, tcti, old_id)["unlocks"] is True

    extend(fresh_swtpm, 7, b"new bootloader")
    before = file_digest(image)
    result = load_key(image, tcti, expect=5)
    assert_one_line_error(result, "PCR 7")
    assert "reseal" in result.stderr
    assert file_digest(image) == before
    status = status_token(image, tcti, old_id)
    assert status["unlocks"] is False
    assert status["pcrs"] == [7] and status["pcrs_matching"] == []
    assert "PCR 7" in status["reason"]
    assert file_digest(image) == before

    resealed = luks_tpm_json("reseal", image, "--unlock-key-file", passphrase_file, tcti=tcti)
    assert resealed["removed"] == old_id
    new_id = resealed["token"]
    assert new_id != old_id
    assert luks_tpm_token_ids(image) == [new_id]
    assert token_json(image, new_id)["pcr_values"] == {"7": pcr(tcti, 7).hex()}
    assert loaded_token(image, tcti) == new_id
    assert status_token(image, tcti, new_id)["pcrs_matching"] == [7]


def test_reseal_with_wrong_unlock_key_changes_nothing(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, tmp_path: Path
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    token_id = enroll_sealed(image, tcti, passphrase_file)
    extend(fresh_swtpm, 7, b"update")
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the passphrase")
    before = file_digest(image)
    result = luks_tpm("reseal", image, "--unlock-key-file", wrong, tcti=tcti, expect=5, stdin=b"")
    assert "Traceback" not in result.stderr
    assert "passphrase" in result.stderr.splitlines()[-1] or "passphrase" in result.stderr.splitlines()[-2]
    assert file_digest(image) == before
    assert luks_tpm_token_ids(image) == [token_id]


# ---- 2. sealing ahead of a planned change ---------------------------------------------------------------


def test_reseal_and_enroll_to_predicted_pcr_values(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, private_session_keyring: int
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    first = enroll_sealed(image, tcti, passphrase_file)

    # reseal ahead of an update (the key comes from the still-valid token)
    predicted = predicted_after_extend(tcti, 7, b"firmware 2.0")
    resealed = luks_tpm_json("reseal", image, "--pcr-value", f"7={predicted.hex()}", tcti=tcti)
    # the new token cannot be verified before the update: the working one is kept beside it (issue 8.4)
    assert resealed["verified"] is False and resealed["removed"] is None and resealed["kept"] == first
    second = resealed["token"]
    assert loaded_token(image, tcti) == first
    luks_tpm("remove", image, "--token-id", str(first), tcti=tcti)
    assert token_json(image, second)["pcr_values"] == {"7": predicted.hex()}
    assert token_json(image, second)["pcrs"] == [7]
    before = file_digest(image)
    assert_one_line_error(load_key(image, tcti, expect=5), "PCR 7")
    assert file_digest(image) == before
    assert extend(fresh_swtpm, 7, b"firmware 2.0") == predicted
    assert loaded_token(image, tcti) == second

    # enroll ahead of an update: not test-unsealed, works after the extend
    predicted = predicted_after_extend(tcti, 7, b"bootloader 3.1")
    enrolled = luks_tpm_json(
        "enroll",
        image,
        "--mode",
        "sealed",
        "--pcr-value",
        f"7={predicted.hex()}",
        "--unlock-key-file",
        passphrase_file,
        tcti=tcti,
    )
    third = enrolled["token"]
    assert enrolled["verified"] is False and enrolled["pcrs"] == [7]
    assert token_json(image, third)["pcr_values"] == {"7": predicted.hex()}
    before = file_digest(image)
    assert_one_line_error(load_key(image, tcti, "--token-id", str(third), expect=5), "PCR 7")
    assert file_digest(image) == before
    assert loaded_token(image, tcti) == second  # the current binding still works meanwhile
    extend(fresh_swtpm, 7, b"bootloader 3.1")
    assert loaded_token(image, tcti) == third
    assert_one_line_error(load_key(image, tcti, "--token-id", str(second), expect=5), "PCR 7")


def test_reseal_keeps_the_token_pcrs_bank_and_pin(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, pin_file: Path, private_session_keyring: int
) -> None:
    """`reseal --pcr-value 7=...` replaces one expected value: it must not drop PCR 11 or the PIN."""
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    enroll_sealed(image, tcti, passphrase_file, "--pin-file", pin_file, pcrs="7,11")
    predicted = predicted_after_extend(tcti, 7, b"shim 16")
    before = file_digest(image)
    # without the PIN on a non-terminal: refused, not silently resealed without a PIN
    result = luks_tpm(
        "reseal",
        image,
        "--pcr-value",
        f"7={predicted.hex()}",
        "--unlock-key-file",
        passphrase_file,
        tcti=tcti,
        expect=5,
        stdin=b"",
    )
    assert "PIN" in result.stderr.splitlines()[-1] or "PIN" in result.stderr.splitlines()[-2]
    assert file_digest(image) == before
    resealed = luks_tpm_json("reseal", image, "--pcr-value", f"7={predicted.hex()}", "--pin-file", pin_file, tcti=tcti)
    token = token_json(image, resealed["token"])
    assert token["pcrs"] == [7, 11] and token["pin"] is True and token["pcr_bank"] == "sha256"
    assert token["pcr_values"]["7"] == predicted.hex()
    assert token["pcr_values"]["11"] == pcr(tcti, 11).hex()
    assert sealed_attributes(image, resealed["token"]) & TPMA_NODA == 0
    extend(fresh_swtpm, 7, b"shim 16")
    assert loaded_token(image, tcti, "--pin-file", pin_file) == resealed["token"]


# ---- 3. PIN, dictionary-attack protection, noDA ----------------------------------------------------------


def test_pin_right_wrong_missing_and_noda_attributes(
    luks_volume: LuksImage,
    swtpm: Swtpm,
    passphrase_file: Path,
    pin_file: Path,
    wrong_pin_file: Path,
    private_session_keyring: int,
) -> None:
    image, tcti = luks_volume.path, swtpm.tcti
    with_pin = enroll_sealed(image, tcti, passphrase_file, "--pin-file", pin_file)
    without_pin = enroll_sealed(image, tcti, passphrase_file)
    assert token_json(image, with_pin)["pin"] is True
    assert token_json(image, without_pin)["pin"] is False
    for token_id, noda in ((with_pin, 0), (without_pin, TPMA_NODA)):
        attributes = sealed_attributes(image, token_id)
        assert attributes & TPMA_NODA == noda, hex(attributes)
        assert attributes & (TPMA_FIXEDTPM | TPMA_FIXEDPARENT) == TPMA_FIXEDTPM | TPMA_FIXEDPARENT
        assert attributes & TPMA_USERWITHAUTH == 0

    assert loaded_token(image, tcti, "--token-id", str(with_pin), "--pin-file", pin_file) == with_pin
    before = file_digest(image)
    result = load_key(image, tcti, "--token-id", str(with_pin), expect=5)
    assert_one_line_error(result, "needs a PIN")
    assert "--pin-file" in result.stderr

    # the shared TPM must keep its DA counter: reset it after the one wrong try
    try:
        result = load_key(image, tcti, "--token-id", str(with_pin), "--pin-file", wrong_pin_file, expect=5)
        assert_one_line_error(result, "wrong PIN")
        assert re.search(r"\d+ of \d+ tries left", result.stderr), result.stderr
    finally:
        swtpm.tpm2("dictionarylockout", "--clear-lockout")
    assert file_digest(image) == before


def test_da_lockout_by_pin_token_leaves_no_pin_token_working(
    luks_volume: LuksImage,
    fresh_swtpm: Swtpm,
    passphrase_file: Path,
    pin_file: Path,
    wrong_pin_file: Path,
    private_session_keyring: int,
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    with_pin = enroll_sealed(image, tcti, passphrase_file, "--pin-file", pin_file)
    without_pin = enroll_sealed(image, tcti, passphrase_file)
    state = lockout(tcti)
    assert state["in_lockout"] is False and state["failures"] == 0
    tries = state["max_failures"]
    assert 0 < tries <= 10, state
    before = file_digest(image)

    for attempt in range(1, tries + 1):
        result = load_key(image, tcti, "--token-id", str(with_pin), "--pin-file", wrong_pin_file, expect=5)
        assert_one_line_error(result, "wrong PIN")
        left = re.search(r"(\d+) of (\d+) tries left", result.stderr)
        if attempt < tries:
            assert left is not None and (int(left[1]), int(left[2])) == (tries - attempt, tries), result.stderr
        assert lockout(tcti)["failures"] == attempt
    assert lockout(tcti)["in_lockout"] is True

    # now even the right PIN is refused, with the lockout named and when it lifts
    result = load_key(image, tcti, "--token-id", str(with_pin), "--pin-file", pin_file, expect=6)
    assert_one_line_error(result, "lockout")
    assert re.search(r"\d+ s", result.stderr), result.stderr
    assert file_digest(image) == before

    # the no-PIN token is noDA: it unlocks in lockout, again and again
    for _ in range(2):
        assert loaded_token(image, tcti, "--token-id", str(without_pin)) == without_pin
    assert loaded_token(image, tcti, "--pin-file", wrong_pin_file) == without_pin
    assert status_token(image, tcti, without_pin)["unlocks"] is True
    status = status_token(image, tcti, with_pin)
    assert status["unlocks"] is False and "lockout" in status["reason"], status
    assert file_digest(image) == before
    fresh_swtpm.tpm2("dictionarylockout", "--clear-lockout")
    assert loaded_token(image, tcti, "--token-id", str(with_pin), "--pin-file", pin_file) == with_pin


# ---- 4. another TPM, a cleared owner hierarchy -----------------------------------------------------------


def test_sealed_token_on_a_different_tpm(
    luks_volume: LuksImage, swtpm: Swtpm, passphrase_file: Path, pin_file: Path, tmp_path: Path
) -> None:
    image = luks_volume.path
    enroll_sealed(image, swtpm.tcti, passphrase_file)
    with_pin = enroll_sealed(image, swtpm.tcti, passphrase_file, "--pin-file", pin_file)
    other = Swtpm(tmp_path / "other")
    other.start()
    try:
        before = file_digest(image)
        result = load_key(image, other.tcti, "--token-id", "0", expect=5)
        assert_one_line_error(result, "different TPM")
        assert "cleared" not in result.stderr.splitlines()[0]
        result = load_key(image, other.tcti, "--token-id", str(with_pin), "--pin-file", pin_file, expect=5)
        assert_one_line_error(result, "different TPM")
        assert "cleared" not in result.stderr.splitlines()[0]
        assert file_digest(image) == before
        for token_id in (0, with_pin):  # status says so too, PIN or not (a PIN token is not unsealed there)
            status = status_token(image, other.tcti, token_id)
            assert status["unlocks"] is False and "different TPM" in status["reason"], status
            assert "cleared" not in status["reason"], status  # it knows which: the EK differs too
        other.assert_clean()
    finally:
        other.stop()


def test_sealed_token_after_owner_clear(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, pin_file: Path
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    token_id = enroll_sealed(image, tcti, passphrase_file)
    with_pin = enroll_sealed(image, tcti, passphrase_file, "--pin-file", pin_file)
    fresh_swtpm.tpm2("clear", "-c", "p")
    before = file_digest(image)
    for args in (["--token-id", str(token_id)], ["--token-id", str(with_pin), "--pin-file", pin_file]):
        result = load_key(image, tcti, *args, expect=5)
        assert_one_line_error(result, "owner hierarchy was cleared")
        assert "different TPM" not in result.stderr.splitlines()[0]
    assert file_digest(image) == before
    for status in (status_token(image, tcti, token_id), status_token(image, tcti, with_pin)):
        assert status["unlocks"] is False and "owner hierarchy was cleared" in status["reason"], status
        assert "different TPM" not in status["reason"], status


# ---- 5. several tokens --------------------------------------------------------------------------------


def test_derived_and_sealed_tokens_on_one_volume(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, private_session_keyring: int
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    sealed = enroll_sealed(image, tcti, passphrase_file)
    derived = enroll_derived(image, tcti, passphrase_file)
    assert loaded_token(image, tcti) == derived  # derived first: it needs nothing but the TPM
    assert loaded_token(image, tcti, "--token-id", str(sealed)) == sealed

    extend(fresh_swtpm, 7, b"kernel 6.12")
    assert loaded_token(image, tcti) == derived
    before = file_digest(image)
    result = load_key(image, tcti, "--token-id", str(sealed), expect=5)
    assert_one_line_error(result, "PCR 7")
    assert file_digest(image) == before

    # break the derived token too (another salt: a different key that does not verify)
    text = token_json(image, derived)
    text["salt"] = base64.b64encode(bytes(32)).decode()
    with cryptsetup.open_device(image) as device:
        device.token_remove(derived)
        assert device.token_json_set(json.dumps(text), derived) == derived
    before = file_digest(image)
    result = load_key(image, tcti, expect=5)
    assert_one_line_error(result, f"token {derived}: ", "does not unwrap", f"token {sealed}: ", "PCR 7")
    assert file_digest(image) == before


def test_several_sealed_volumes_share_one_policy_session(
    luks_volume: LuksImage,
    fresh_swtpm: Swtpm,
    passphrase_file: Path,
    pin_file: Path,
    wrong_pin_file: Path,
    tmp_path: Path,
    private_session_keyring: int,
) -> None:
    """`load-key A B C`: one salted policy session for all, PCR 7 read once, every Unseal response encrypted.
    A successful Unseal leaves the session's policy reset by the TPM itself; only after a failed one (a
    wrong PIN) is PolicyRestart needed, and the next volume still unlocks."""
    tcti = fresh_swtpm.tcti
    first = luks_volume.path
    others = [make_luks_image(tmp_path / f"{name}.img", uuid=str(uuid.uuid4())) for name in ("pin", "last")]
    with_pin, last = (image.path for image in others)
    enroll_sealed(first, tcti, passphrase_file)
    enroll_sealed(with_pin, tcti, passphrase_file, "--pin-file", pin_file)
    enroll_sealed(last, tcti, passphrase_file)

    with TpmProxy(fresh_swtpm.socket, tmp_path / "proxy.sock") as (proxy, proxy_tcti):
        loaded = json.loads(luks_tpm("--json", "load-key", first, last, tcti=proxy_tcti, stdin=b"").stdout)
        assert [volume["device"] for volume in loaded["volumes"]] == [str(first), str(last)]
        sequence = proxy.command_names()
        counts = {name: sequence.count(name) for name in ("StartAuthSession", "PCR_Read", "Unseal", "PolicyRestart")}
        assert counts == {"StartAuthSession": 1, "PCR_Read": 1, "Unseal": 2, "PolicyRestart": 0}, sequence

        proxy.reset()
        result = luks_tpm(
            "--json",
            "load-key",
            first,
            with_pin,
            last,
            "--pin-file",
            wrong_pin_file,
            tcti=proxy_tcti,
            stdin=b"",
            expect=5,
        )
        volumes = json.loads(result.stdout)["volumes"]
        assert "serial" in volumes[0] and "serial" in volumes[2], volumes
        assert "wrong PIN" in volumes[1]["error"]["message"], volumes
        sequence = proxy.command_names()
        counts = {name: sequence.count(name) for name in ("StartAuthSession", "Unseal", "PolicyRestart")}
        assert counts == {"StartAuthSession": 1, "Unseal": 3, "PolicyRestart": 1}, sequence
        failed_unseal = [index for index, name in enumerate(sequence) if name == "Unseal"][1]
        assert sequence.index("PolicyRestart") > failed_unseal, sequence
        unseals = [command for command, _ in proxy.exchanges if int.from_bytes(command[6:10], "big") == TPM_CC_UNSEAL]
        for command in unseals:
            policy_session = [attributes for handle, attributes in command_sessions(command, 1) if handle >> 24 == 0x03]
            assert policy_session and policy_session[0] & TPMA_SESSION_ENCRYPT, command_sessions(command, 1)
    fresh_swtpm.tpm2("dictionarylockout", "--clear-lockout")


# ---- 6. remove ------------------------------------------------------------------------------------------


def test_remove_refuses_the_last_way_in(luks_volume: LuksImage, swtpm: Swtpm, passphrase_file: Path) -> None:
    image, tcti = luks_volume.path, swtpm.tcti
    sealed = enroll_sealed(image, tcti, passphrase_file)
    derived = enroll_derived(image, tcti, passphrase_file)
    kill_keyslot(image, 0)

    removed = luks_tpm_json("remove", image, "--token-id", str(sealed), tcti=tcti)
    assert removed["removed"] == sealed
    assert luks_tpm_token_ids(image) == [derived]

    before = file_digest(image)
    result = luks_tpm("remove", image, "--token-id", str(derived), tcti=tcti, expect=7)
    assert_one_line_error(result, "last way")
    assert "--force" in result.stderr
    assert file_digest(image) == before
    result = luks_tpm("remove", image, "--token-id", "9", tcti=tcti, expect=2)
    assert_one_line_error(result, "no luks-tpm token 9")
    assert file_digest(image) == before

    luks_tpm("remove", image, "--token-id", str(derived), "--force", tcti=tcti)
    assert luks_tpm_token_ids(image) == []


def test_remove_refuses_last_sealed_token_on_keyslotless_image(tmp_path: Path, swtpm: Swtpm) -> None:
    """A volume made without any keyslot, its only way in a sealed token written by the library."""
    volume = make_luks_image(tmp_path / "noslot.img", keyslot=False)
    image = volume.path
    # enroll needs a keyslot to get the key; write the token through the same code enroll uses
    from luks_tpm.enrollment import bind
    from luks_tpm.model import Mode
    from luks_tpm.settings import Enrollment

    with cryptsetup.open_device(image) as device, Tpm(swtpm.tcti) as tpm:
        token_id = bind(device, tpm, volume.volume_key, Enrollment(Mode.SEALED, Bank.SHA256, (7,)), None).token_id
    before = file_digest(image)
    result = luks_tpm("remove", image, "--token-id", str(token_id), tcti=swtpm.tcti, expect=7)
    assert_one_line_error(result, "last way")
    assert file_digest(image) == before
    luks_tpm("remove", image, "--token-id", str(token_id), "--force", tcti=swtpm.tcti)
    assert luks_tpm_token_ids(image) == []
    volume.volume_key.close()
    volume.passphrase.close()


# ---- 7. usage errors change nothing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ["--pcrs", "7,99"],
        ["--pcrs", "seven"],
        ["--pcr-value", "7=zz"],
        ["--pcr-value", "7=" + "00" * 20],  # a sha1-sized value for the sha256 bank
        ["--pcrs", "7", "--pcr-bank", "md5"],
    ],
    ids=["pcr-out-of-range", "pcr-not-a-number", "value-not-hex", "value-wrong-size", "unknown-bank"],
)
def test_enroll_usage_errors_change_nothing(
    luks_volume: LuksImage, swtpm: Swtpm, passphrase_file: Path, options: list[str]
) -> None:
    image = luks_volume.path
    before = file_digest(image)
    result = luks_tpm(
        "enroll", image, "--mode", "sealed", "--unlock-key-file", passphrase_file, *options, tcti=swtpm.tcti, expect=2
    )
    assert "Traceback" not in result.stderr
    assert file_digest(image) == before


# ---- 8. status, for people ------------------------------------------------------------------------------


def test_status_shows_bank_pcrs_matching_and_pin(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, pin_file: Path
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    plain = enroll_sealed(image, tcti, passphrase_file, pcrs="7,11")
    pinned = enroll_sealed(image, tcti, passphrase_file, "--pin-file", pin_file)
    extend(fresh_swtpm, 11, b"initrd")
    before = file_digest(image)
    text = luks_tpm("status", image, tcti=tcti).stdout  # the PIN token unlocks: exit 0
    assert file_digest(image) == before
    blocks = re.split(r"^  token (\d+): ", text, flags=re.MULTILINE)
    by_id = {int(blocks[i]): blocks[i + 1] for i in range(1, len(blocks), 2)}
    assert set(by_id) == {plain, pinned}, text
    plain_text, pinned_text = by_id[plain], by_id[pinned]
    assert re.search(r"bank sha256, PCRs 7,11,", plain_text) and "PIN: no" in plain_text, plain_text
    assert re.search(r"matching now: 7,", plain_text), plain_text  # 7 matches, 11 does not
    assert "would NOT unlock" in plain_text and "PCR 11" in plain_text
    assert re.search(r"bank sha256, PCRs 7,", pinned_text) and "PIN: yes" in pinned_text, pinned_text
    assert re.search(r"matching now: 7,", pinned_text), pinned_text
    assert "unlocks now" in pinned_text
