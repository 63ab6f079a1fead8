"""Issue 21's defects fixed before this round's enumerations, each checked against the issue's own words:
2 (a PIN of NUL bytes), 9 (an empty endorsement), 10 (wipe's JSON for a damaged token), 20 (request-key
typed in a shell), 21 (--json before an unknown command), 23 (format on a 1 MiB file), 26 (a crypttab
entry that resolves to nothing, beside a good one). The classes they belong to are enumerated in
test_text_inputs.py, test_file_inputs.py, test_keyring_values.py, test_tpm_faults.py and test_tpm_states.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from . import volumes
from .fixtures_luks import file_digest
from .fixtures_tpm import Swtpm
from .forked_cli import ForkedCli
from .json_schema import validate
from .test_file_inputs import namespace, nsenter


@pytest.fixture
def volume(tmp_path: Path, swtpm: Swtpm, cli: ForkedCli) -> Path:
    passphrase = volumes.passphrase_file(tmp_path)
    image = volumes.luks_format(tmp_path / "volume.img", passphrase)
    cli.run("enroll", image, "--mode", "sealed", "--unlock-key-file", passphrase, tcti=swtpm.tcti)
    pin = tmp_path / "good-pin"
    pin.write_bytes(b"2468")
    cli.run("enroll", image, "--mode", "sealed", "--pin-file", pin, "--unlock-key-file", passphrase, tcti=swtpm.tcti)
    return image  # token 0 without PIN, token 1 with PIN 2468


@pytest.mark.parametrize("pin", [b"\0\0\0\0", b"ab\0\0", b"\0ab", b"a\0b"])
def test_2_a_pin_with_nul_bytes_is_refused(pin: bytes, volume: Path, swtpm: Swtpm, cli: ForkedCli) -> None:
    """The TPM drops trailing zero bytes of an authorization value: such a PIN would protect nothing."""
    pin_file = volume.parent / "pin"
    pin_file.write_bytes(pin)
    before = file_digest(volume)
    passphrase = volume.parent / "passphrase"
    lines: list[list[str | Path]] = [
        ["enroll", volume, "--mode", "sealed", "--pin-file", pin_file, "--unlock-key-file", passphrase],
        ["load-key", volume, "--token-id", "1", "--pin-file", pin_file],  # read where a PIN is needed
    ]
    for argv in lines:
        error = cli.json(*argv, tcti=swtpm.tcti, expect=2)["error"]
        assert "NUL" in error["message"] and "--pin-file" in error["message"], error
    assert file_digest(volume) == before


def test_9_an_empty_endorsement_is_unknown_not_damage(volume: Path, swtpm: Swtpm, cli: ForkedCli) -> None:
    token = volumes.tokens(volume)[0]
    volumes.set_token(volume, json.dumps({**token, "endorsement": ""}), 0)
    assert cli.json("load-key", volume, "--token-id", "0", tcti=swtpm.tcti)["token"] == 0


def test_10_wipe_json_with_a_damaged_token_validates(volume: Path, swtpm: Swtpm, cli: ForkedCli) -> None:
    volumes.set_token(volume, json.dumps({"type": "luks-tpm", "keyslots": [], "version": 1}), 5)
    data = cli.json("wipe", "--dry-run", volume, tcti=swtpm.tcti)
    validate("wipe", data)
    damaged = [token for token in data["volumes"][0]["tokens"] if token["fate"] == "damaged"]
    assert damaged and damaged[0]["mode"] is None and damaged[0]["parent"] is None, damaged


def test_20_request_key_typed_in_a_shell(cli: ForkedCli) -> None:
    for args in (["1", "user", "luks-tpm:app:x", "32", "0"], ["1", "user"]):
        data = cli.json("request-key", *args, tcti=None, expect=2)
        message = data["error"]["message"]
        assert "only /sbin/request-key can run it" in message, message
        assert f"({len(args)} given)" in message or len(args) == 5, message
        assert "(5 given)" not in message


def test_21_json_before_an_unknown_command(cli: ForkedCli) -> None:
    for argv in (["nosuch", "--json"], ["--json", "nosuch"], ["nosuch", "--json", "--tcti", "x"]):
        result = cli.run(*argv, tcti=None, expect=2)
        assert json.loads(result.stdout)["error"]["code"] == 2, result.stdout


def test_23_format_on_a_file_too_small(tmp_path: Path, swtpm: Swtpm, cli: ForkedCli) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(bytes(1 << 20))
    error = cli.json("format", small, "--no-recovery", "--yes", tcti=swtpm.tcti, expect=2)["error"]
    assert "too small" in error["message"], error
    assert small.stat().st_size == 1 << 20
    assert small.read_bytes() == bytes(1 << 20)


def test_26_an_entry_that_resolves_to_nothing_is_one_volume_of_several(
    volume: Path, swtpm: Swtpm, tmp_path: Path
) -> None:
    """status without DEVICE reads /etc/crypttab: replaced here inside a mount namespace of the test's own."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "--mount", "true"], check=False).returncode != 0:
        pytest.skip("needs root and mount namespaces (unshare --mount)")
    table = tmp_path / "crypttab"
    table.write_text(
        f"good {volume} none luks,x-luks-tpm\n"
        "gone UUID=00000000-0000-4000-8000-000000000000 none luks,x-luks-tpm\n"
        "nolabel LABEL=no-such-label none luks,x-luks-tpm\n"
    )
    with namespace(tmp_path) as runner:
        nsenter(runner, "mount", "--bind", table, "/etc/crypttab")
        data = json.loads(runner.run("--json", "status", tcti=swtpm.tcti, expect=5).stdout)
    validate("status", data)
    by_device = {entry["device"]: entry for entry in data["volumes"]}
    assert by_device[str(volume)]["unlocks"] is True
    for device in ("UUID=00000000-0000-4000-8000-000000000000", "LABEL=no-such-label"):
        assert by_device[device]["error"]["message"].endswith(f"no device with {device}"), by_device[device]
