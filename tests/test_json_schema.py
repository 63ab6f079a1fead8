"""The --json contract (issue 15): docs/json-schema.json is a valid schema that covers every command,
agrees with the code's causes and exit codes and with docs/json.md, and every command's real output,
success and error, against a real swtpm and real image files, validates against it."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from luks_tpm import cli, cryptsetup
from luks_tpm.errors import Cause, ExitCode
from luks_tpm.model import FENCE_MESSAGE

from .fixtures_luks import TEST_PASSPHRASE, LuksImage, make_luks_image, sparse_file
from .fixtures_tpm import Swtpm
from .helpers import REPO, luks_tpm
from .json_schema import schema, validate

NOT_JSON = {"request-key"}  # run by the kernel, answers through the keyring; from a shell it only errs
JSON_MD = REPO / "docs" / "json.md"


def run(definition: str, *args: str | Path, tcti: str | None, expect: int = 0, stdin: bytes | None = None) -> Any:
    """The command with --json after its arguments; its stdout validated against `definition`."""
    result = luks_tpm(*args, "--json", tcti=tcti, expect=expect, stdin=stdin)
    data = json.loads(result.stdout)
    validate(definition, data)
    return data


def run_error(*args: str | Path, tcti: str | None, expect: int, cause: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = run("error", *args, tcti=tcti, expect=expect)["error"]
    assert error["code"] == expect
    if cause is not None:
        assert error["cause"] == cause, error
    return error


def absent_tpm(tmp_path: Path) -> str:
    return f"swtpm:path={tmp_path}/absent.sock"


def extend(swtpm: Swtpm, index: int) -> None:
    swtpm.tpm2("pcrextend", f"{index}:sha256={hashlib.sha256(b'changed').hexdigest()}")


def add_damaged_token(image: Path) -> int:
    with cryptsetup.open_device(image) as device:
        return device.token_json_set(json.dumps({"type": "luks-tpm", "keyslots": [], "version": 1, "mode": "derived"}))


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_bytes(TEST_PASSPHRASE)
    return path


@pytest.fixture
def second_volume(tmp_path: Path) -> Iterator[LuksImage]:
    volume = make_luks_image(tmp_path / "second.img", uuid="0c1a9e6b-3d4f-4a51-8f2e-5b7d9c0e1f23")
    yield volume
    volume.volume_key.close()
    volume.passphrase.close()


# ---- the schema itself ------------------------------------------------------------------------------


def test_schema_is_a_valid_2020_12_schema() -> None:
    assert schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema())


def _placeholder(definition: dict[str, Any]) -> bool:
    return "PLACEHOLDER" in definition.get("$comment", "")


def test_every_command_has_a_definition() -> None:
    defs = schema()["$defs"]
    commands = set(cli.main.commands) - NOT_JSON
    missing = sorted(commands - set(defs))
    assert not missing, f"docs/json-schema.json has no definition for {missing}: add one (and to docs/json.md)"
    unwritten = sorted(command for command in commands if _placeholder(defs[command]))
    assert not unwritten, (
        f"`luks-tpm {', '.join(unwritten)}` exist(s) but the schema holds only a placeholder: "
        "write the definition, document it in docs/json.md and validate it here"
    )
    listed = {entry["$ref"].removeprefix("#/$defs/") for entry in schema()["anyOf"]}
    assert listed == commands | {"error"}, "the schema's anyOf lists every command's definition and the error"


def test_schema_knows_the_codes_causes_and_version_of_the_code() -> None:
    from luks_tpm.output import JSON_VERSION

    defs = schema()["$defs"]
    assert set(defs["cause"]["enum"]) == {str(cause) for cause in Cause} | {None}
    assert set(defs["exit_code"]["enum"]) == {int(code) for code in ExitCode if code != ExitCode.OK} | {130}
    assert defs["version"]["const"] == JSON_VERSION


def _property_names(node: Any) -> set[str]:
    if isinstance(node, dict):
        names = set(node.get("properties", {})) if isinstance(node.get("properties"), dict) else set()
        return names | {name for value in node.values() for name in _property_names(value)}
    if isinstance(node, list):
        return {name for value in node for name in _property_names(value)}
    return set()


def test_json_md_documents_every_command_and_field() -> None:
    text = JSON_MD.read_text()
    defs = schema()["$defs"]
    for name, definition in defs.items():
        if "version" in definition.get("required", ()) or "oneOf" in definition:
            assert re.search(rf"^##+ .*`(luks-tpm )?{re.escape(name)}[` ]", text, re.MULTILINE), (
                f"docs/json.md has no section for {name}"
            )
    undocumented = sorted(name for name in _property_names(defs) if f"`{name}`" not in text)
    assert not undocumented, f"docs/json.md does not mention the fields {undocumented}"


# ---- doctor, persist-srk, fence ---------------------------------------------------------------------


def test_doctor(swtpm: Swtpm, tmp_path: Path) -> None:
    report = run("doctor", "doctor", tcti=swtpm.tcti)
    assert report["identity"]["manufacturer"] == "IBM" and "sha256" in report["banks"]
    without = run("doctor", "doctor", tcti=absent_tpm(tmp_path), expect=4)
    assert without["ok"] is False and "identity" not in without and without["checks"][0]["name"] == "tpm"


def test_persist_srk(fresh_swtpm: Swtpm, tmp_path: Path) -> None:
    report = run("persist-srk", "persist-srk", tcti=fresh_swtpm.tcti)
    assert report["name"] == run("doctor", "doctor", tcti=fresh_swtpm.tcti)["srk"]["name"]
    fresh_swtpm.tpm2("evictcontrol", "-C", "o", "-c", "0x81000001")
    run_error("persist-srk", tcti=absent_tpm(tmp_path), expect=4, cause="no-tpm")


def test_fence(fresh_swtpm: Swtpm, tmp_path: Path) -> None:
    report = run("fence", "fence", tcti=fresh_swtpm.tcti)
    expected = hashlib.sha256(bytes(32) + hashlib.sha256(FENCE_MESSAGE).digest()).hexdigest()  # docs/policy.md
    assert report["sha256"] == expected and set(report["banks"]) >= {"sha256"}
    assert run("fence", "fence", tcti=fresh_swtpm.tcti)["sha256"] != expected  # extended again: still up
    assert run("doctor", "doctor", tcti=fresh_swtpm.tcti)["fence_up"] is True
    run_error("fence", tcti=absent_tpm(tmp_path), expect=4, cause="no-tpm")


# ---- format, enroll, reseal, remove -----------------------------------------------------------------

FAST = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")


def test_format(swtpm: Swtpm, tmp_path: Path, key_file: Path) -> None:
    image = sparse_file(tmp_path / "new.img")
    generated = run("format", "format", image, *FAST, tcti=swtpm.tcti)
    assert generated["recovery_keyslot"] == 0 and "recovery_key" in generated and generated["key_size"] == 64
    chosen = run(
        "format", "format", image, "-q", "--passphrase-file", key_file, "--key-size", "256", *FAST, tcti=swtpm.tcti
    )
    assert "recovery_key" not in chosen and chosen["key_size"] == 32 and chosen["uuid"] != generated["uuid"]
    none = run("format", "format", image, "-q", "--no-recovery", tcti=swtpm.tcti)
    assert none["recovery_keyslot"] is None and none["token"] == 0
    run_error("format", tmp_path / "no-such-dir" / "x.img", "-q", tcti=swtpm.tcti, expect=3, cause="device")
    run_error("format", image, "--no-recovery", tcti=swtpm.tcti, expect=7, cause="refused")  # no -q, no tty


def test_enroll(swtpm: Swtpm, luks_image: Path, key_file: Path, tmp_path: Path) -> None:
    derived = run("enroll", "enroll", luks_image, "--mode", "derived", "--key-file", key_file, tcti=swtpm.tcti)
    assert derived == {**derived, "mode": "derived", "verified": True, "pcrs": [], "fence": False}
    sealed = run(
        "enroll", "enroll", luks_image, "--mode", "sealed", "--pcrs", "7", "--key-file", key_file, tcti=swtpm.tcti
    )
    assert sealed["pcrs"] == [7] and sealed["verified"] is True and sealed["token"] != derived["token"]
    future = run(
        "enroll",
        "enroll",
        luks_image,
        "--mode",
        "sealed",
        "--pcr-value",
        f"7={'ab' * 32}",
        "--key-file",
        key_file,
        tcti=swtpm.tcti,
    )
    assert future["verified"] is False
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the passphrase")
    run_error(
        "enroll", luks_image, "--mode", "derived", "--key-file", wrong, tcti=swtpm.tcti, expect=5, cause="wrong-key"
    )


def test_reseal(fresh_swtpm: Swtpm, luks_image: Path, key_file: Path) -> None:
    run_error("reseal", luks_image, "--key-file", key_file, tcti=fresh_swtpm.tcti, expect=2, cause="usage")
    old = run(
        "enroll",
        "enroll",
        luks_image,
        "--mode",
        "sealed",
        "--pcrs",
        "16",
        "--key-file",
        key_file,
        tcti=fresh_swtpm.tcti,
    )["token"]
    extend(fresh_swtpm, 16)
    replaced = run("reseal", "reseal", luks_image, "--key-file", key_file, tcti=fresh_swtpm.tcti)
    assert replaced == {**replaced, "removed": old, "kept": None, "verified": True, "pcrs": [16]}
    kept = run(
        "reseal", "reseal", luks_image, "--pcr-value", f"16={'cd' * 32}", "--key-file", key_file, tcti=fresh_swtpm.tcti
    )
    assert kept == {**kept, "removed": None, "kept": replaced["token"], "verified": False}


def test_remove(swtpm: Swtpm, luks_image: Path, key_file: Path, tmp_path: Path) -> None:
    token = run("enroll", "enroll", luks_image, "--mode", "derived", "--key-file", key_file, tcti=swtpm.tcti)["token"]
    assert run("remove", "remove", luks_image, "--token-id", str(token), tcti=swtpm.tcti) == {
        "version": 1,
        "device": str(luks_image),
        "removed": token,
    }
    run_error("remove", luks_image, "--token-id", str(token), tcti=swtpm.tcti, expect=2, cause="usage")
    only = sparse_file(tmp_path / "only-tpm.img")
    run("format", "format", only, "--no-recovery", tcti=swtpm.tcti)
    run_error("remove", only, "--token-id", "0", tcti=swtpm.tcti, expect=7, cause="refused")


# ---- load-key, open, status -------------------------------------------------------------------------


def test_load_key(
    swtpm: Swtpm,
    luks_image: Path,
    second_volume: LuksImage,
    key_file: Path,
    tmp_path: Path,
    private_session_keyring: int,
) -> None:
    run("enroll", "enroll", luks_image, "--mode", "derived", "--key-file", key_file, tcti=swtpm.tcti)
    one = run("load-key", "load-key", luks_image, "--table", tcti=swtpm.tcti)
    assert one["keyring"] == private_session_keyring and one["table"].startswith("0 ")
    many = run("load-key", "load-key", luks_image, tmp_path / "absent.img", tcti=swtpm.tcti, expect=3)
    assert [sorted(volume) for volume in many["volumes"]] == [
        sorted(set(one) - {"table", "version"}),
        ["device", "error"],
    ]
    run_error("load-key", tmp_path / "absent.img", tcti=swtpm.tcti, expect=3, cause="device")
    run_error("load-key", second_volume.path, tcti=swtpm.tcti, expect=5, cause="no-token")


def test_load_key_unlock_failure_lists_each_token(
    fresh_swtpm: Swtpm, luks_image: Path, key_file: Path, private_session_keyring: int
) -> None:
    first = run(
        "enroll",
        "enroll",
        luks_image,
        "--mode",
        "sealed",
        "--pcrs",
        "16",
        "--key-file",
        key_file,
        tcti=fresh_swtpm.tcti,
    )["token"]
    second = run(
        "enroll",
        "enroll",
        luks_image,
        "--mode",
        "derived",
        "--pcrs",
        "16",
        "--key-file",
        key_file,
        tcti=fresh_swtpm.tcti,
    )["token"]
    extend(fresh_swtpm, 16)
    error = run_error("load-key", luks_image, tcti=fresh_swtpm.tcti, expect=5)
    # in the order they were tried
    assert sorted((failure["token"], failure["code"]) for failure in error["failures"]) == [(first, 5), (second, 5)]
    assert {failure["cause"] for failure in error["failures"]} == {"pcr-changed"}


def test_open(swtpm: Swtpm, luks_image: Path, key_file: Path, tmp_path: Path) -> None:
    """Without device-mapper (as in containers) open fails with 8 before looking at anything."""
    dm = cryptsetup.device_mapper_available()
    run_error(
        "open",
        tmp_path / "absent.img",
        "luks-tpm-json-test",
        tcti=swtpm.tcti,
        expect=3 if dm else 8,
        cause="device" if dm else "unsupported",
    )
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(f"luks-tpm-json-test {luks_image} none luks,x-luks-tpm\n")
    if not dm:
        run_error("open", "--all", "--crypttab", crypttab, tcti=swtpm.tcti, expect=8, cause="unsupported")
        return
    report = run("open", "open", "--all", "--crypttab", crypttab, tcti=swtpm.tcti, expect=5)  # no token yet
    assert report["volumes"][0]["opened"] is False and report["volumes"][0]["error"]["cause"] == "no-token"


@pytest.mark.skipif(not cryptsetup.device_mapper_available(), reason="no device-mapper and dm-crypt here")
def test_open_success(swtpm: Swtpm, luks_image: Path, key_file: Path, tmp_path: Path) -> None:
    import subprocess

    run("enroll", "enroll", luks_image, "--mode", "derived", "--key-file", key_file, tcti=swtpm.tcti)
    try:
        report = run("open", "open", luks_image, "luks-tpm-json-test", tcti=swtpm.tcti)
        assert report["name"] == "luks-tpm-json-test"
    finally:
        subprocess.run(["cryptsetup", "close", "luks-tpm-json-test"], check=False, capture_output=True)


def test_status(swtpm: Swtpm, luks_image: Path, key_file: Path, pin_file: Path, tmp_path: Path) -> None:
    derived = run("enroll", "enroll", luks_image, "--mode", "derived", "--key-file", key_file, tcti=swtpm.tcti)["token"]
    pinned = run(
        "enroll",
        "enroll",
        luks_image,
        "--mode",
        "sealed",
        "--pcrs",
        "7",
        "--pin-file",
        pin_file,
        "--key-file",
        key_file,
        tcti=swtpm.tcti,
    )["token"]
    damaged = add_damaged_token(luks_image)
    report = run("status", "status", luks_image, tcti=swtpm.tcti)
    assert report["unlocks"] is True and report["fence_up"] is False
    tokens = {token["id"]: token for token in report["volumes"][0]["tokens"]}
    assert tokens[derived]["unlocks"] is True and "note" not in tokens[derived]
    assert tokens[pinned]["note"] == "needs the PIN" and tokens[pinned]["pcrs_matching"] == [7]
    assert tokens[damaged]["damaged"] is True and tokens[damaged]["cause"] == "corrupt-token"

    both = run("status", "status", luks_image, tmp_path / "absent.img", tcti=swtpm.tcti, expect=5)
    assert both["unlocks"] is False and [volume["unlocks"] for volume in both["volumes"]] == [True, False]
    assert both["volumes"][1]["error"]["code"] == 3
    run_error("status", tmp_path / "absent.img", tcti=swtpm.tcti, expect=3, cause="device")

    without = run("status", "status", luks_image, tcti=absent_tpm(tmp_path), expect=5)
    assert without["fence_up"] is None
    assert {token["cause"] for token in without["volumes"][0]["tokens"]} == {"no-tpm", "corrupt-token"}


def test_status_after_pcr_change_and_fence(fresh_swtpm: Swtpm, luks_image: Path, key_file: Path) -> None:
    token = run(
        "enroll",
        "enroll",
        luks_image,
        "--mode",
        "sealed",
        "--pcrs",
        "16",
        "--fence",
        "--key-file",
        key_file,
        tcti=fresh_swtpm.tcti,
    )["token"]
    extend(fresh_swtpm, 16)
    changed = run("status", "status", luks_image, tcti=fresh_swtpm.tcti, expect=5)["volumes"][0]["tokens"][0]
    assert changed == {**changed, "id": token, "unlocks": False, "cause": "pcr-changed", "pcrs_matching": []}
    run("fence", "fence", tcti=fresh_swtpm.tcti)
    fenced = run("status", "status", luks_image, tcti=fresh_swtpm.tcti, expect=5)
    assert fenced["fence_up"] is True and fenced["unlocks"] is False
