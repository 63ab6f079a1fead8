"""Volumes that carry tokens of several TPMs (disks that move between machines): real swtpm twice."""

from __future__ import annotations

import struct
from pathlib import Path

from .fixtures_tpm import Swtpm
from .helpers import format_derived, luks_tpm, luks_tpm_json
from .tpm_proxy import HEADER, TpmProxy

TPM_CC_CREATE_PRIMARY = 0x131
TPM_RH_ENDORSEMENT = 0x4000000B


def test_unlock_uses_this_tpms_token_and_status_marks_the_others(
    tmp_path: Path, swtpm: Swtpm, second_swtpm: Swtpm, recovery_file: Path, private_session_keyring: int
) -> None:
    here, elsewhere = second_swtpm, swtpm
    image, elsewhere_only = tmp_path / "moves.img", tmp_path / "elsewhere-only.img"
    format_derived(image, elsewhere.tcti, recovery_file)  # token 0: the other machine's, derived
    luks_tpm("enroll", image, "--mode", "sealed", "--unlock-key-file", recovery_file, tcti=elsewhere.tcti)  # 1
    luks_tpm("enroll", image, "--mode", "derived", "--unlock-key-file", recovery_file, tcti=here.tcti)  # 2
    format_derived(elsewhere_only, elsewhere.tcti, recovery_file)

    with TpmProxy(here.socket, tmp_path / "proxy.sock") as (proxy, tcti):
        loaded = luks_tpm_json("load-key", image, tcti=tcti)
        exchanges = proxy.exchanges
        names = proxy.command_names()
    assert loaded["token"] == 2
    # The other TPM's tokens were never tried: no EK made to name them, none of their objects loaded.
    primaries = [
        struct.unpack_from(">I", command, HEADER.size)[0]
        for command, _ in exchanges
        if HEADER.unpack_from(command)[2] == TPM_CC_CREATE_PRIMARY
    ]
    assert TPM_RH_ENDORSEMENT not in primaries, names
    assert "Load" not in names and "Unseal" not in names and names.count("HMAC") == 1, names

    status = luks_tpm_json("status", image, tcti=here.tcti)  # exit 0: it would unlock here
    tokens = status["volumes"][0]["tokens"]
    assert [(t["unlocks"], t["other_tpm"]) for t in tokens] == [(False, True), (False, True), (True, False)]
    text = luks_tpm("status", image, tcti=here.tcti).stdout
    assert text.count("another TPM's binding: not for this machine") == 2 and "would NOT unlock" not in text
    # One volume that would not unlock here makes the answer "no": exit 5, for scripts.
    both = luks_tpm_json("status", image, elsewhere_only, tcti=here.tcti, expect=5)["volumes"]
    assert [volume["unlocks"] for volume in both] == [True, False]
    assert both[1]["tokens"][0]["other_tpm"] is True

    there = luks_tpm_json("status", image, tcti=elsewhere.tcti)["volumes"][0]["tokens"]
    assert [(t["unlocks"], t["other_tpm"]) for t in there] == [(True, False), (True, False), (False, True)]
