"""Tokens bound to the boot chain (issue 22): version 2 tokens, approved states, `rebind` and `predict`, on a
real swtpm with real image files through the real command line.

The host has no measured boot, so two kinds of test: the command line against PCRs an operator extends
(what a changed boot looks like to the TPM), and the whole update cycle against a real boot's event log
replayed into swtpm (the lab boots of tests/data/bootchain: OVMF + Debian's shim, GRUB and kernels), where
`rebind` predicts a kernel update and the TPM, "rebooted" into the log of that updated system, unlocks.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from luks_tpm import cryptsetup
from luks_tpm.bootchain.eventlog import EventLog, EventType
from luks_tpm.errors import ExitCode
from luks_tpm.model import Bank
from luks_tpm.nextboot import BootChain
from luks_tpm.rebind import RebindReport, rebind
from luks_tpm.tpm import Tpm
from luks_tpm.tpm.pcr import pcr_banks, pcr_values

from . import bootchain_lab as lab
from . import volumes
from .fixtures_luks import LuksImage, file_digest
from .fixtures_tpm import Swtpm
from .helpers import assert_one_line_error, luks_tpm, luks_tpm_json

BOOT_CHAIN_PCRS = [4, 7, 8, 9]


def enroll(image: Path, tcti: str, passphrase_file: Path, approver: Path, *extra: str) -> int:
    enrolled = luks_tpm_json(
        "enroll", image, "--boot-chain", "--approver", approver, "--unlock-key-file", passphrase_file, *extra, tcti=tcti
    )
    token_id: int = enrolled["token"]
    return token_id


def token_json(image: Path, token_id: int) -> dict[str, Any]:
    return volumes.tokens(image)[token_id]


def boot_chain_tokens(image: Path) -> dict[int, dict[str, Any]]:
    return {token_id: token for token_id, token in volumes.tokens(image).items() if token["type"] == "luks-tpm"}


def approved_states(token: dict[str, Any]) -> list[dict[str, str]]:
    return [approval["pcr_values"] for approval in token["approvals"]]


def current(tcti: str, pcrs: list[int] = BOOT_CHAIN_PCRS) -> dict[str, str]:
    with Tpm(tcti) as tpm:
        return {str(p): v.hex() for p, v in pcr_values(tpm, Bank.SHA256, pcrs).items()}


def extend(swtpm: Swtpm, index: int, data: bytes) -> str:
    """Extend a sha256 PCR as firmware or GRUB would; the new value."""
    digest = hashlib.sha256(data).digest()
    expected = hashlib.sha256(bytes.fromhex(current(swtpm.tcti, [index])[str(index)]) + digest).hexdigest()
    swtpm.tpm2("pcrextend", f"{index}:sha256={digest.hex()}")
    return expected


def load_key(image: Path, tcti: str, expect: int = 0) -> Any:
    """load-key; JSON when it succeeds, the text error otherwise."""
    json_output = ("--json",) if expect == 0 else ()
    return luks_tpm(*json_output, "load-key", image, tcti=tcti, expect=expect, stdin=b"")


# ---- the command line, PCRs moved by hand ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sealed", "derived"])
def test_enrolled_token_unlocks_in_its_approved_state_only(
    luks_volume: LuksImage,
    fresh_swtpm: Swtpm,
    passphrase_file: Path,
    tmp_path: Path,
    private_session_keyring: int,
    mode: str,
) -> None:
    image, tcti, approver = luks_volume.path, fresh_swtpm.tcti, tmp_path / "approver.json"
    token_id = enroll(image, tcti, passphrase_file, approver, "--mode", mode, "--fence")
    token = token_json(image, token_id)
    assert token["version"] == 2 and token["pcrs"] == BOOT_CHAIN_PCRS and token["fence"] is True
    assert "pcr_values" not in token  # the policy names the approver, not PCR values
    assert approved_states(token) == [current(tcti)]  # no event log here: the next boot is not predicted
    assert approver.stat().st_mode & 0o777 == 0o600
    assert token["approver"]["name"].startswith("000b")  # nameAlg SHA-256
    assert json.loads(load_key(image, tcti).stdout)["token"] == token_id
    status = luks_tpm_json("status", image, tcti=tcti)  # exit 0: the next boot is unknown, not refused
    assert status["next_boot"] is None and status["next_boot_problem"] is None  # no measured boot here

    extend(fresh_swtpm, 8, b"linux (hd0,gpt2)/vmlinuz root=/dev/evil")
    before = file_digest(image)
    failed = load_key(image, tcti, expect=5)
    assert_one_line_error(failed, "PCR 8")
    assert file_digest(image) == before
    status = luks_tpm_json("status", image, tcti=tcti, expect=5)["volumes"][0]["tokens"][0]
    assert status["unlocks"] is False and "PCR 8" in status["reason"]


def test_rebind_to_given_values_then_the_changed_boot_unlocks(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, tmp_path: Path, private_session_keyring: int
) -> None:
    image, tcti, approver = luks_volume.path, fresh_swtpm.tcti, tmp_path / "approver.json"
    sealed = enroll(image, tcti, passphrase_file, approver, "--mode", "sealed")
    derived = enroll(image, tcti, passphrase_file, approver, "--mode", "derived", "--fence")
    now = current(tcti)
    expected_pcr9 = hashlib.sha256(
        bytes.fromhex(now["9"]) + hashlib.sha256(b"initrd.img-6.1.0-57").digest()
    ).hexdigest()

    report = luks_tpm_json("rebind", image, "--approver", approver, "--pcr-value", f"9={expected_pcr9}", tcti=tcti)
    rebound = report["volumes"][0]["tokens"]
    assert [(t["was"], t["added"], t["dropped"], t["approved"]) for t in rebound] == [
        (sealed, 1, 0, 2),
        (derived, 1, 0, 2),
    ]
    tokens = boot_chain_tokens(image)
    assert all(approved_states(t) == [now, {**now, "9": expected_pcr9}] for t in tokens.values())
    policies = {t["mode"]: t["policy"] for t in tokens.values()}

    assert extend(fresh_swtpm, 9, b"initrd.img-6.1.0-57") == expected_pcr9
    volume = luks_tpm_json("status", image, tcti=tcti)["volumes"][0]
    assert {t["id"]: t["unlocks"] for t in volume["tokens"]} == {t["id"]: True for t in rebound}
    assert json.loads(load_key(image, tcti).stdout)["token"] in tokens

    # the next rebind (at this boot) drops the state of the boot before: exactly {now}
    again = luks_tpm_json("rebind", image, "--approver", approver, "--pcr-value", f"9={expected_pcr9}", tcti=tcti)
    assert [(t["added"], t["dropped"], t["approved"]) for t in again["volumes"][0]["tokens"]] == [(0, 1, 1), (0, 1, 1)]
    after = boot_chain_tokens(image)
    assert all(approved_states(t) == [current(tcti)] for t in after.values())
    assert {t["mode"]: t["policy"] for t in after.values()} == policies  # the policy never changes


def test_a_boot_nobody_approved_approves_nothing(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, tmp_path: Path, private_session_keyring: int
) -> None:
    """After a passphrase boot in an unapproved state, rebind leaves the token alone (exit 7) unless told
    --approve-current; then the token unlocks in it."""
    image, tcti, approver = luks_volume.path, fresh_swtpm.tcti, tmp_path / "approver.json"
    token_id = enroll(image, tcti, passphrase_file, approver, "--mode", "sealed")
    extend(fresh_swtpm, 8, b"init=/bin/sh typed at the GRUB prompt")
    before = file_digest(image)
    refused = luks_tpm_json(
        "rebind", image, "--approver", approver, "--pcr-value", "8=" + "22" * 32, tcti=tcti, expect=7
    )
    (token,) = refused["volumes"][0]["tokens"]
    assert token["was"] == token_id and "not in an approved state" in token["skipped"]
    assert file_digest(image) == before

    approved = luks_tpm_json(
        "rebind", image, "--approver", approver, "--approve-current", "--pcr-value", "8=" + "22" * 32, tcti=tcti
    )
    (token,) = approved["volumes"][0]["tokens"]
    assert token["added"] == 2 and token["dropped"] == 1
    assert json.loads(load_key(image, tcti).stdout)["token"] == token["id"]


def test_tokens_of_another_approver_are_left_alone(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, tmp_path: Path
) -> None:
    image, tcti = luks_volume.path, fresh_swtpm.tcti
    token_id = enroll(image, tcti, passphrase_file, tmp_path / "approver.json", "--mode", "sealed")
    before = file_digest(image)
    other = luks_tpm_json(
        "rebind", image, "--approver", tmp_path / "other.json", "--pcr-value", "9=" + "11" * 32, tcti=tcti, expect=2
    )
    assert other["error"]["code"] == 2  # rebind never makes an approver: it must be the enrolment's
    assert file_digest(image) == before
    luks_tpm(
        "enroll",
        image,
        "--boot-chain",
        "--approver",
        tmp_path / "other.json",
        "--mode",
        "sealed",
        "--unlock-key-file",
        passphrase_file,
        tcti=tcti,
    )
    report = luks_tpm_json(
        "rebind", image, "--approver", tmp_path / "other.json", "--pcr-value", "9=" + "11" * 32, tcti=tcti
    )
    skipped = [t for t in report["volumes"][0]["tokens"] if "skipped" in t]
    assert [t["was"] for t in skipped] == [token_id] and "another approver" in skipped[0]["skipped"]
    assert approved_states(token_json(image, token_id)) == [current(tcti)]


def test_a_damaged_approval_fails_that_token_alone(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, tmp_path: Path, private_session_keyring: int
) -> None:
    image, tcti, approver = luks_volume.path, fresh_swtpm.tcti, tmp_path / "approver.json"
    damaged = enroll(image, tcti, passphrase_file, approver, "--mode", "sealed")
    intact = enroll(image, tcti, passphrase_file, approver, "--mode", "derived")
    token = token_json(image, damaged)
    signature = bytearray(base64.b64decode(token["approvals"][0]["signature"]))
    signature[-1] ^= 0x01  # the ECDSA s value, one bit
    token["approvals"][0]["signature"] = base64.b64encode(bytes(signature)).decode()
    with cryptsetup.open_device(image, write=True) as device:
        device.token_json_set(json.dumps(token), damaged)
    volume = luks_tpm_json("status", image, tcti=tcti)["volumes"][0]
    by_id = {t["id"]: t for t in volume["tokens"]}
    assert by_id[damaged]["unlocks"] is False and by_id[intact]["unlocks"] is True
    assert json.loads(load_key(image, tcti).stdout)["token"] == intact


# ---- the whole update cycle, on a real boot's event log ---------------------------------------------------


def replay_into(swtpm: Swtpm, log: EventLog) -> None:
    """Extend every measured event of `log` into the TPM's banks, as firmware, shim and GRUB did."""
    with Tpm(swtpm.tcti) as tpm:
        banks = [str(bank) for bank in pcr_banks(tpm)]
    extends = [
        f"{event.pcr}:" + ",".join(f"{bank}={event.digests[bank].hex()}" for bank in banks)
        for event in log.events
        if event.type != EventType.EV_NO_ACTION
    ]
    swtpm.tpm2("pcrextend", *extends)


def chain(run: str, esp: Path, boot: Path, snapshots: Path) -> BootChain:
    return BootChain(lab.DATA / "runs" / run / "evlog.bin", esp, boot, snapshots, lab.UUIDS)


def test_kernel_update_is_predicted_approved_and_unlocks_after_the_reboot(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, tmp_path: Path, private_session_keyring: int
) -> None:
    image, tcti, approver, snapshots = luks_volume.path, fresh_swtpm.tcti, tmp_path / "approver.json", tmp_path / "kept"
    replay_into(fresh_swtpm, lab.log("base-r1"))
    assert current(tcti) == {str(p): lab.pcrs("base-r1")["sha256"][p].hex() for p in BOOT_CHAIN_PCRS}
    booted = lab.boot_tree("base", tmp_path / "booted")
    token_id = enroll(image, tcti, passphrase_file, approver, "--mode", "sealed", "--fence")

    # at boot: the booted config files are kept, the next boot (nothing changed yet) is this one
    first = rebind(tcti, [image], approver, chain=chain("base-r1", *booted, snapshots))
    assert first.exit_code == ExitCode.OK
    result = first.result
    assert isinstance(result, RebindReport) and result.next_boot is not None and result.next_boot.changed == ()
    assert len(token_json(image, token_id)["approvals"]) == 1

    # apt installs linux-image-6.1.0-57 (update-grub rewrites grub.cfg): the hook runs rebind
    updated = lab.boot_tree("kernel57", tmp_path / "updated")
    second = rebind(tcti, [image], approver, chain=chain("base-r1", *updated, snapshots))
    result = second.result
    assert isinstance(result, RebindReport) and result.next_boot is not None
    assert result.next_boot.changed == (4, 8, 9)
    (volume,) = result.volumes
    (token,) = volume.tokens
    assert (token.added, token.dropped, token.approved, token.next_boot) == (1, 0, 2, True)
    next_state = {str(p): lab.pcrs("kernel57")["sha256"][p].hex() for p in BOOT_CHAIN_PCRS}
    assert next_state in approved_states(token_json(image, token.id))

    # the reboot: the TPM resets, the updated chain measures itself, the token unlocks unattended
    fresh_swtpm.restart()
    assert current(tcti, [4]) == {"4": "00" * 32}
    replay_into(fresh_swtpm, lab.log("kernel57"))
    assert current(tcti) == next_state
    assert json.loads(load_key(image, tcti).stdout)["token"] == token.id

    # rebind at that boot drops the old kernel's state
    third = rebind(tcti, [image], approver, chain=chain("kernel57", *updated, snapshots))
    result = third.result
    assert isinstance(result, RebindReport)
    (token,) = result.volumes[0].tokens
    assert (token.added, token.dropped, token.approved) == (0, 1, 1)
    assert approved_states(token_json(image, token.id)) == [next_state]


def test_an_unpredicted_boot_needs_the_passphrase_and_status_says_so(
    luks_volume: LuksImage, fresh_swtpm: Swtpm, passphrase_file: Path, tmp_path: Path
) -> None:
    """The command line edited at the GRUB prompt: a state nobody approved."""
    image, tcti, approver = luks_volume.path, fresh_swtpm.tcti, tmp_path / "approver.json"
    replay_into(fresh_swtpm, lab.log("base-r1"))
    enroll(image, tcti, passphrase_file, approver, "--mode", "sealed")
    fresh_swtpm.restart()
    replay_into(fresh_swtpm, lab.log("cmdline"))
    status = luks_tpm_json("status", image, tcti=tcti, expect=5)["volumes"][0]["tokens"][0]
    assert status["unlocks"] is False and "PCR 8" in status["reason"]
