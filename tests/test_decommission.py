"""wipe and erase, end to end: real swtpm (two of them where a volume carries both TPMs' tokens), real
image files, real libcryptsetup, the real command line; a pseudo-terminal where a person would type."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from luks_tpm import cryptsetup
from luks_tpm.erase import EraseReport, erase
from luks_tpm.secret import Secret
from luks_tpm.tpm import Tpm
from luks_tpm.unlock import Recovery

from .fixtures_luks import file_digest
from .fixtures_tpm import Swtpm
from .helpers import REPO, assert_one_line_error, format_derived, luks_tpm, luks_tpm_json

FOREIGN_TOKEN = json.dumps(
    {
        "type": "systemd-tpm2",
        "keyslots": ["0"],
        "tpm2-blob": "AAAA",
        "tpm2-pcrs": [7],
        "tpm2-pcr-bank": "sha256",
        "tpm2-primary-alg": "ecc",
        "tpm2-policy-hash": "00" * 32,
    }
)
OTHER_NV, OTHER_KEY = "0x01500016", "0x81000010"  # "other software's" NV index and persistent key


@pytest.fixture
def no_crypttab(tmp_path: Path) -> Path:
    """An empty crypttab, so the machine's own /etc/crypttab does not join the test."""
    path = tmp_path / "crypttab"
    path.write_text("")
    return path


def _fates(volume: dict[str, Any]) -> dict[int, str]:
    return {token["id"]: token["fate"] for token in volume["tokens"]}


def _by_device(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["device"]: volume for volume in report["volumes"]}


def _opens_with_passphrase(image: Path, passphrase: Path) -> bool:
    return (
        subprocess.run(
            ["cryptsetup", "open", "--test-passphrase", "--key-file", str(passphrase), str(image)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )


def _other_software_keys(tpm: Swtpm, tmp_path: Path) -> None:
    """What another program might keep in the owner hierarchy: a persistent key and an NV index."""
    context = tmp_path / "other.ctx"
    tpm.tpm2("createprimary", "-C", "o", "-G", "ecc", "-c", str(context))
    tpm.tpm2("evictcontrol", "-C", "o", "-c", str(context), OTHER_KEY)
    tpm.tpm2("flushcontext", "-t")
    tpm.tpm2("nvdefine", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite", OTHER_NV)


def _owner_objects(tpm: Swtpm) -> tuple[list[int], list[int]]:
    with Tpm(tpm.tcti) as connection:
        return connection.handles(0x81000000), connection.handles(0x01000000)


def test_wipe_lists_clears_and_proves_every_token_destroyed(
    tmp_path: Path, fresh_swtpm: Swtpm, second_swtpm: Swtpm, recovery_file: Path, no_crypttab: Path
) -> None:
    here, elsewhere = fresh_swtpm, second_swtpm
    both, only_here = tmp_path / "both.img", tmp_path / "only-here.img"
    format_derived(both, here.tcti, recovery_file)
    format_derived(only_here, here.tcti, recovery_file)
    luks_tpm("enroll", both, "--mode", "derived", "--unlock-key-file", recovery_file, tcti=elsewhere.tcti)
    _other_software_keys(here, tmp_path)
    headers = {image: file_digest(image) for image in (both, only_here)}
    args = ("--crypttab", no_crypttab, both, only_here)

    dry = luks_tpm_json("wipe", "--dry-run", *args, tcti=here.tcti)
    volumes = _by_device(dry)
    assert _fates(volumes[str(both)]) == {0: "dies", 1: "other-tpm"}
    assert _fates(volumes[str(only_here)]) == {0: "dies"}
    assert volumes[str(both)]["keyslots"] == [0] and volumes[str(both)]["after"] == "recoverable"
    assert volumes[str(both)]["affected"] is True
    assert {"0x81000001", OTHER_KEY} <= {item["handle"] for item in dry["persistent"]}
    assert OTHER_NV in {nv["index"] for nv in dry["nv_indices"]}
    assert dry["dry_run"] is True and dry["cleared"] is False

    # No terminal and no --yes: refused, even with YES on a pipe; the listing is still shown.
    refused = luks_tpm("wipe", *args, tcti=here.tcti, expect=7, stdin=b"YES\n")
    assert "no terminal" in refused.stderr and "DIES" in refused.stdout and OTHER_KEY in refused.stdout
    assert luks_tpm_json("status", both, only_here, tcti=here.tcti)["volumes"][1]["unlocks"] is True
    assert len(_owner_objects(here)[1]) == 1  # the NV index is still there: nothing was cleared

    wiped = luks_tpm_json("wipe", "--yes", *args, tcti=here.tcti)
    assert wiped["cleared"] is True and wiped["verified"] is True
    for volume in wiped["volumes"]:
        for token in volume["tokens"]:
            if token["fate"] == "dies":
                assert token["destroyed"] is True and token["check_cause"] == "cleared", token
            else:
                assert "destroyed" not in token
    assert _owner_objects(here) == ([], [])
    assert {image: file_digest(image) for image in headers} == headers  # wipe never writes a header
    again = _by_device(luks_tpm_json("wipe", "--dry-run", *args, tcti=here.tcti))[str(both)]
    assert _fates(again) == {0: "dead", 1: "other-tpm"} and again["affected"] is False

    # Afterwards: this TPM's tokens refuse as cleared, the other TPM's is marked, not a failure...
    after = luks_tpm_json("status", both, tcti=here.tcti, expect=5)["volumes"][0]["tokens"]
    assert after[0]["cause"] == "cleared" and after[1]["other_tpm"] is True
    result = luks_tpm("load-key", only_here, tcti=here.tcti, expect=5)
    assert_one_line_error(result, "owner hierarchy was cleared")
    # ...the recovery passphrase still opens both, and the other machine still unlocks its token.
    assert _opens_with_passphrase(both, recovery_file) and _opens_with_passphrase(only_here, recovery_file)
    assert luks_tpm_json("status", both, tcti=elsewhere.tcti)["volumes"][0]["tokens"][1]["unlocks"] is True


def _on_terminal(args: list[str], tcti: str, answer: bytes | None) -> tuple[int, str]:
    """Run luks-tpm with a pseudo-terminal as its stdin/stdout/stderr; at the YES prompt type `answer`,
    or with None, kill it there (kill -9)."""
    master, slave = os.openpty()
    environment = {k: v for k, v in os.environ.items() if k not in {"LUKS_TPM_TCTI", "TPM2TOOLS_TCTI"}}
    process = subprocess.Popen(
        [sys.executable, "-m", "luks_tpm", "--tcti", tcti, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=REPO,
        env=environment,
        start_new_session=True,
    )
    os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + 60
    asked = False
    try:
        while time.monotonic() < deadline:
            if not asked and b"Type YES" in output:
                asked = True
                if answer is None:
                    process.kill()
                else:
                    os.write(master, answer)
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        code = process.wait(timeout=30)
    finally:
        os.close(master)
    assert asked, output.decode(errors="replace")
    return code, output.decode(errors="replace")


def test_wipe_asks_for_yes_on_the_terminal_and_changes_nothing_until_then(
    tmp_path: Path, fresh_swtpm: Swtpm, recovery_file: Path, no_crypttab: Path
) -> None:
    image = tmp_path / "disk.img"
    format_derived(image, fresh_swtpm.tcti, recovery_file)
    args = ["wipe", "--crypttab", str(no_crypttab), str(image)]

    code, output = _on_terminal(args, fresh_swtpm.tcti, b"yes\n")  # not YES: declined
    assert code == 7 and "not clearing" in output and "DIES" in output, output
    code, output = _on_terminal(args, fresh_swtpm.tcti, None)  # killed while asking
    assert code == -9, output
    fresh_swtpm.assert_clean()  # nothing of the survey was left loaded in the TPM
    assert luks_tpm_json("status", image, tcti=fresh_swtpm.tcti)["volumes"][0]["unlocks"] is True

    code, output = _on_terminal(args, fresh_swtpm.tcti, b"YES\n")
    assert code == 0 and "verified: all 1 listed tokens are destroyed" in output, output
    assert luks_tpm_json("status", image, tcti=fresh_swtpm.tcti, expect=5)["volumes"][0]["unlocks"] is False


def test_wipe_failures_are_diagnosed_and_cost_nothing(
    tmp_path: Path, fresh_swtpm: Swtpm, recovery_file: Path, no_crypttab: Path
) -> None:
    tpm = fresh_swtpm
    image = tmp_path / "disk.img"
    format_derived(image, tpm.tcti, recovery_file)
    args = ("--yes", "--crypttab", no_crypttab, image)
    luks_tpm("wipe", "--dry-run", tmp_path / "absent.img", tcti=tpm.tcti, expect=3)

    tpm.tpm2("clearcontrol", "-C", "l", "s")  # disableClear: only the platform can lift it again
    result = luks_tpm("wipe", *args, tcti=tpm.tcti, expect=4)
    assert_one_line_error(result, "disableClear")
    assert "tpm2_clearcontrol -C p c" in result.stderr and "firmware" in result.stderr
    assert luks_tpm_json("wipe", "--dry-run", *args[1:], tcti=tpm.tcti, expect=4)["problem"]["code"] == 4
    tpm.tpm2("clearcontrol", "-C", "p", "c")

    right, wrong = tmp_path / "lockout", tmp_path / "wrong"
    right.write_bytes(b"lockout secret")
    wrong.write_bytes(b"not it")
    tpm.tpm2("changeauth", "-c", "l", "lockout secret")
    result = luks_tpm("wipe", *args, tcti=tpm.tcti, expect=2)  # not tried: a wrong try would block it
    assert_one_line_error(result, "lockout authorization")
    assert luks_tpm_json("wipe", *args, "--lockout-auth-file", right, tcti=tpm.tcti)["verified"] is True

    format_derived(image, tpm.tcti, recovery_file)
    tpm.tpm2("changeauth", "-c", "l", "lockout secret")
    result = luks_tpm("wipe", *args, "--lockout-auth-file", wrong, tcti=tpm.tcti, expect=7)
    assert_one_line_error(result, "refused the lockout authorization", "1000 s")
    result = luks_tpm("wipe", *args, "--lockout-auth-file", right, tcti=tpm.tcti, expect=6)
    assert_one_line_error(result, "accepts no lockout authorization now")
    assert luks_tpm_json("status", image, tcti=tpm.tcti)["volumes"][0]["unlocks"] is True  # still not cleared


def test_wipe_finds_crypttab_entries(tmp_path: Path, swtpm: Swtpm, recovery_file: Path) -> None:
    listed = tmp_path / "listed.img"
    format_derived(listed, swtpm.tcti, recovery_file)
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(
        f"data {listed} none luks,x-luks-tpm\nplain {tmp_path / 'unmarked.img'} none luks\n"
        "gone UUID=00000000-0000-4000-8000-000000000000 none luks,x-luks-tpm\n"
    )
    volumes = _by_device(luks_tpm_json("wipe", "--dry-run", "--crypttab", crypttab, tcti=swtpm.tcti))
    assert volumes[str(listed)]["found_by"] == ["crypttab data"] and _fates(volumes[str(listed)]) == {0: "dies"}
    gone = volumes["UUID=00000000-0000-4000-8000-000000000000"]
    assert gone["after"] == "unknown" and "no device" in gone["error"]
    assert str(tmp_path / "unmarked.img") not in volumes


def test_wipe_finds_block_devices_with_a_token(
    tmp_path: Path, swtpm: Swtpm, recovery_file: Path, no_crypttab: Path
) -> None:
    image = tmp_path / "looped.img"
    format_derived(image, swtpm.tcti, recovery_file)
    attach = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=False)
    if attach.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {attach.stderr.strip()}")
    loop = attach.stdout.strip()
    try:
        volumes = _by_device(luks_tpm_json("wipe", "--dry-run", "--crypttab", no_crypttab, tcti=swtpm.tcti))
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
    assert volumes[loop]["found_by"] == ["scan"] and _fates(volumes[loop]) == {0: "dies"}


# ---- erase -------------------------------------------------------------------------------------------


def _bound_volume(image: Path, swtpm: Swtpm, recovery_file: Path) -> None:
    """A formatted volume (derived token 0, recovery keyslot 0), plus a sealed token and another tool's."""
    format_derived(image, swtpm.tcti, recovery_file)
    luks_tpm("enroll", image, "--mode", "sealed", "--unlock-key-file", recovery_file, tcti=swtpm.tcti)
    subprocess.run(["cryptsetup", "token", "import", str(image)], input=FOREIGN_TOKEN, text=True, check=True)


def test_erase_leaves_nothing_that_opens_the_volume(tmp_path: Path, swtpm: Swtpm, recovery_file: Path) -> None:
    image = tmp_path / "disk.img"
    _bound_volume(image, swtpm, recovery_file)
    with cryptsetup.open_device(image) as device:
        derived = json.loads(device.token_json_get(0) or "")
        sealed = json.loads(device.token_json_get(1) or "")
        area = device.metadata()["keyslots"]["0"]["area"]
    offset, size = int(area["offset"]), int(area["size"])
    keyslot_area = image.read_bytes()[offset : offset + size]
    before = file_digest(image)

    luks_tpm("erase", image, tcti=None, expect=7, stdin=b"YES\n")  # no terminal, no --yes
    plan = luks_tpm_json("erase", "--dry-run", image, tcti=None)["volumes"][0]
    assert plan["keyslots"] == [0] and [t["id"] for t in plan["luks_tpm_tokens"]] == [0, 1]
    assert plan["other_tokens"] == [{"id": 2, "type": "systemd-tpm2"}]
    assert file_digest(image) == before

    erased = luks_tpm_json("erase", "--yes", image, tcti=None)
    result = erased["volumes"][0]
    assert erased["verified"] is True and result["keyslots_destroyed"] == [0]
    assert result["tokens_removed"] == [0, 1, 2] and result["left"] == {"keyslots": [], "tokens": []}
    with cryptsetup.open_device(image) as device:
        assert device.keyslots_in_header() == [] and device.tokens() == []
    assert not _opens_with_passphrase(image, recovery_file)
    assert_one_line_error(luks_tpm("load-key", image, tcti=swtpm.tcti, expect=5), "no luks-tpm token")
    # Nothing of the key's inputs is left in either header copy: the salt (a formatted volume's last input
    # to its key), the sealed blob, the keyslot's key material.
    raw = image.read_bytes()
    assert derived["salt"].encode() not in raw and sealed["blob"]["private"].encode() not in raw
    assert raw[offset : offset + size] != keyslot_area
    assert "nothing left to destroy" in luks_tpm("erase", "--yes", image, tcti=None).stdout


def _assert_as_before_or_further(image: Path, tokens_before: dict[int, str], swtpm: Swtpm, recovery_file: Path) -> bool:
    """After an interruption: a subset of what was there, each remaining part unchanged, removed in erase's
    order (luks-tpm tokens, then other tools', then keyslots). True when nothing is left."""
    with cryptsetup.open_device(image) as device:
        tokens = {token_id: device.token_json_get(token_id) for token_id, _ in device.tokens()}
        keyslots = device.keyslots_in_header()
        assert set(keyslots) <= {0}
        assert all(tokens_before.get(token_id) == text for token_id, text in tokens.items()), tokens
        with Secret.copy_of(recovery_file.read_bytes()) as passphrase:
            try:
                device.volume_key_get(passphrase)[1].close()
                passphrase_opens = True
            except cryptsetup.CryptsetupError:
                passphrase_opens = False
        if not passphrase_opens:  # the keyslot's area is wiped (still listed, or gone): the tokens went first
            assert not tokens, tokens
        ours = {token_id for token_id, text in tokens_before.items() if '"type":"luks-tpm"' in text}
        if set(tokens_before) - ours - set(tokens):  # another tool's token went: ours went before it
            assert not ours & set(tokens), tokens
        for token_id in ours & set(tokens):  # a remaining token works exactly as before
            with Tpm(swtpm.tcti) as tpm, Recovery(tpm) as recovery:
                recovery.recover(device, token_id=token_id).key.close()
        return not tokens and not keyslots


def test_erase_killed_at_any_write_runs_again_to_completion(tmp_path: Path, swtpm: Swtpm, recovery_file: Path) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (needed to kill erase at its Nth write)")
    template = tmp_path / "template.img"
    format_derived(template, swtpm.tcti, recovery_file)
    subprocess.run(["cryptsetup", "token", "import", str(template)], input=FOREIGN_TOKEN, text=True, check=True)
    with cryptsetup.open_device(template) as device:
        tokens_before = {token_id: device.token_json_get(token_id) or "" for token_id, _ in device.tokens()}
    image = tmp_path / "disk.img"
    kill_at = 1
    while True:
        shutil.copyfile(template, image)
        killed = subprocess.run(
            [
                "strace",
                "-f",
                "-o",
                "/dev/null",
                "-e",
                "trace=write",
                "-e",
                f"inject=write:signal=KILL:when={kill_at}",
                sys.executable,
                "-m",
                "luks_tpm",
                "erase",
                "--yes",
                str(image),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if killed.returncode == 0:
            pytest.fail(f"erase finished before its write {kill_at}, yet never left the volume fully erased")
        finished = _assert_as_before_or_further(image, tokens_before, swtpm, recovery_file)
        rerun = erase([image], dry_run=False, confirm=None)  # the same code as the command, without its start-up
        assert isinstance(rerun.result, EraseReport) and rerun.result.verified is True, (kill_at, rerun.result)
        assert rerun.exit_code == 0
        with cryptsetup.open_device(image) as device:
            assert device.keyslots_in_header() == [] and device.tokens() == []
        if finished:  # the kill came after the last header write: every point before it was tried
            break
        kill_at += 1
        assert kill_at < 40, f"erase never got through its header writes under strace: {killed.stderr[-500:]}"
    # 2 tokens and 1 keyslot: 3 header writes of 2 copies of 3 blocks each, and the keyslot area wipe
    assert kill_at >= 13, kill_at
