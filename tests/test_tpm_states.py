"""Issue 21, class "TPM states": each command line on a TPM in each unusual state, its exit code and what it
says, as a table (`EXPECTED`): only the sha1 PCR bank, an owner authorization set (with the SRK persisted
before, and without), a lockout authorization set, a foreign RSA key at 0x81000001, a key of the SRK's
shape that is not the standard SRK there, the owner hierarchy disabled, the endorsement hierarchy
disabled, and both.

One volume is enrolled on a swtpm in its ordinary state: token 0 sealed with a transient SRK (no PCRs),
token 1 derived, token 2 sealed to PCR 7 (both under the SRK persisted at 0x81000001). Each state starts
from a copy of that TPM's state and is then changed as an operator would (tpm2-tools; the foreign keys
through ESYS, as another program would make them). Every command runs with --json; the table holds,
per command, the exit code and a short projection of the output: the error's cause, status's verdict
per token, wipe's fate per token, doctor's failing checks, fence's sha256 value, and which of the known
warnings were given. Two states run at once.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from luks_tpm.tpm import Tpm, templates
from luks_tpm.tpm.esys import lib

from . import volumes
from .fixtures_tpm import Swtpm
from .forked_cli import ForkedCli
from .helpers import format_command
from .json_schema import validate

OWNER_PASS = b"owner secret"
SRK_HANDLE = "0x81000001"


def tool(*args: str) -> Callable[[Swtpm], None]:
    def apply(swtpm: Swtpm) -> None:
        subprocess.run(["tpm2_" + args[0], "-T", swtpm.tcti, *args[1:]], check=True, capture_output=True)

    return apply


def both(*steps: Callable[[Swtpm], None]) -> Callable[[Swtpm], None]:
    def apply(swtpm: Swtpm) -> None:
        for step in steps:
            step(swtpm)

    return apply


def sha1_only(swtpm: Swtpm) -> None:
    tool("pcrallocate", "sha1:all+sha256:none+sha384:none+sha512:none")(swtpm)
    swtpm.restart()  # a PCR allocation takes effect at the next TPM reset


def foreign_key(kind: str) -> Callable[[Swtpm], None]:
    """Another program's primary key persisted at 0x81000001, in place of the SRK: an RSA storage key, or
    an ECC key of the standard SRK's shape made from another `unique` (zeros: tpm2-tools' habit)."""

    def apply(swtpm: Swtpm) -> None:
        tool("evictcontrol", "-C", "o", "-c", SRK_HANDLE)(swtpm)
        if kind == "rsa":
            template = templates._public(lib.TPM2_ALG_RSA, templates.SRK_ATTRIBUTES, b"")
            detail = template.publicArea.parameters.rsaDetail
            detail.symmetric.algorithm, detail.symmetric.keyBits.aes = lib.TPM2_ALG_AES, 128
            detail.symmetric.mode.aes, detail.scheme.scheme, detail.keyBits = lib.TPM2_ALG_CFB, lib.TPM2_ALG_NULL, 2048
        else:
            template = templates._ecc_p256_storage(templates.SRK_ATTRIBUTES, b"", 32)
        with Tpm(swtpm.tcti) as tpm:
            handle = tpm.esys.create_primary(lib.ESYS_TR_RH_OWNER, template)
            tpm.esys.evict_control(lib.ESYS_TR_RH_OWNER, handle, int(SRK_HANDLE, 16))
            tpm.esys.flush_context(handle)

    return apply


STATES: dict[str, Callable[[Swtpm], None]] = {
    "ordinary": lambda swtpm: None,
    "sha1-only": sha1_only,
    "owner-auth": tool("changeauth", "-c", "o", OWNER_PASS.decode()),
    "owner-auth-no-srk": both(tool("evictcontrol", "-C", "o", "-c", SRK_HANDLE),
                              tool("changeauth", "-c", "o", OWNER_PASS.decode())),
    "lockout-auth": tool("changeauth", "-c", "l", "lockout secret"),
    "foreign-rsa": foreign_key("rsa"),
    "foreign-srk-shape": foreign_key("ecc"),
    "owner-disabled": tool("hierarchycontrol", "-C", "p", "shEnable", "clear"),
    "endorsement-disabled": tool("hierarchycontrol", "-C", "p", "ehEnable", "clear"),
    "both-disabled": both(tool("hierarchycontrol", "-C", "p", "shEnable", "clear"),
                          tool("hierarchycontrol", "-C", "p", "ehEnable", "clear")),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Setup:
    work: Path
    state: Path  # the ordinary TPM's state directory, copied for each state
    pristine: Path
    passphrase: Path
    owner_pass: Path


# The command lines, in the order run in each state (persist-srk last: it changes 0x81000001).
def commands(volume: Path, blank: Path, s: Setup) -> dict[str, list[str | Path]]:
    unlock: list[str | Path] = ["--unlock-key-file", s.passphrase]
    auth: list[str | Path] = ["--owner-auth-file", s.owner_pass]
    return {
        "doctor": ["doctor"],
        "status": ["status", volume],
        "load-key 0": ["load-key", volume, "--token-id", "0"],
        "load-key 1": ["load-key", volume, "--token-id", "1"],
        "load-key 2": ["load-key", volume, "--token-id", "2"],
        "wipe --dry-run": ["wipe", "--dry-run", volume],
        "enroll derived": ["enroll", volume, "--mode", "derived", *unlock],
        "enroll sealed": ["enroll", volume, "--mode", "sealed", "--pcrs", "7", *unlock],
        "enroll sealed +auth": ["enroll", volume, "--mode", "sealed", "--pcrs", "7", *unlock, *auth],
        "format": [*format_command(blank, s.passphrase), "--yes"],
        "fence": ["fence"],
        "srk-public": ["srk-public"],
        "persist-srk": ["persist-srk"],
        "persist-srk +auth": ["persist-srk", *auth],
    }


WARNINGS = {
    "an RSA key": "rsa",
    "the SRK's shape": "srk-shape",
    "is missing": "missing",
    "--owner-auth-file is not used": "auth-unused",
}


def project(name: str, data: dict[str, Any]) -> str:
    """The output in a few words: what the table compares."""
    if "error" in data:
        return str(data["error"]["cause"])
    warned = sorted({tag for text, tag in WARNINGS.items() for warning in data.get("warnings", []) if text in warning})
    suffix = f" (warns {', '.join(warned)})" if warned else ""
    if name == "doctor":
        bad = [check["name"] for check in data["checks"][:6] if not check["ok"]]
        return "BAD " + ",".join(bad) if bad else "ok"
    if name == "status":
        return " ".join(token["cause"] or "ok" for token in data["volumes"][0]["tokens"]) + suffix
    if name == "wipe --dry-run":
        return " ".join(token["fate"] for token in data["volumes"][0]["tokens"]) + suffix
    if name == "fence":
        return "sha256 null" if data["sha256"] is None else "ok"
    return "ok" + suffix


OK = (0, "ok")
EXPECTED: dict[str, dict[str, tuple[int, str]]] = {
    "ordinary": {
        "doctor": OK, "status": (0, "ok ok ok"), "load-key 0": OK, "load-key 1": OK, "load-key 2": OK,
        "wipe --dry-run": (0, "dies dies dies"), "enroll derived": OK, "enroll sealed": OK,
        "enroll sealed +auth": (0, "ok (warns auth-unused)"), "format": OK,
        "srk-public": OK, "fence": OK, "persist-srk": OK,
        "persist-srk +auth": (0, "ok (warns auth-unused)"),
    },
    "sha1-only": {
        "doctor": (0, "BAD pcr-banks,fence"), "status": (0, "ok ok unsupported"), "load-key 0": OK,
        "load-key 1": OK, "load-key 2": (8, "unsupported"), "wipe --dry-run": (0, "dies dies dies"),
        "enroll derived": OK, "enroll sealed": (8, "unsupported"), "enroll sealed +auth": (8, "unsupported"),
        "format": OK, "srk-public": OK, "fence": (0, "sha256 null"), "persist-srk": OK,
        "persist-srk +auth": (0, "ok (warns auth-unused)"),
    },
    "owner-auth": {  # the SRK was persisted before: sealed bindings unlock, derived ones cannot
        "doctor": (0, "BAD srk,owner-auth"), "status": (0, "ok owner-auth ok"), "load-key 0": OK,
        "load-key 1": (4, "owner-auth"), "load-key 2": OK, "wipe --dry-run": (0, "dies dies dies"),
        "enroll derived": (4, "owner-auth"), "enroll sealed": (4, "owner-auth"), "enroll sealed +auth": OK,
        "format": (4, "owner-auth"),
        "srk-public": (4, "owner-auth"), "fence": OK, "persist-srk": (4, "owner-auth"), "persist-srk +auth": OK,
    },
    "owner-auth-no-srk": {  # the endorsement key still tells wipe whose tokens they are
        "doctor": (0, "BAD srk,owner-auth"), "status": (5, "owner-auth owner-auth owner-auth"),
        "load-key 0": (4, "owner-auth"), "load-key 1": (4, "owner-auth"), "load-key 2": (4, "owner-auth"),
        "wipe --dry-run": (0, "dies dies dies"), "enroll derived": (4, "owner-auth"),
        "enroll sealed": (4, "owner-auth"), "enroll sealed +auth": OK, "format": (4, "owner-auth"),
        "srk-public": (4, "owner-auth"), "fence": OK,
        "persist-srk": (4, "owner-auth"), "persist-srk +auth": OK,
    },
    "lockout-auth": {  # only clearing needs it: the dry run says the wipe would fail (exit 2)
        "doctor": OK, "status": (0, "ok ok ok"), "load-key 0": OK, "load-key 1": OK, "load-key 2": OK,
        "wipe --dry-run": (2, "dies dies dies"), "enroll derived": OK, "enroll sealed": OK,
        "enroll sealed +auth": (0, "ok (warns auth-unused)"), "format": OK,
        "srk-public": OK, "fence": OK, "persist-srk": OK,
        "persist-srk +auth": (0, "ok (warns auth-unused)"),
    },
    "foreign-rsa": {  # every binding still works (the SRK re-created); the warning names the key
        "doctor": OK, "status": (0, "ok ok ok (warns rsa)"), "load-key 0": OK, "load-key 1": (0, "ok (warns rsa)"),
        "load-key 2": (0, "ok (warns rsa)"), "wipe --dry-run": (0, "dies dies dies (warns rsa)"),
        "enroll derived": (0, "ok (warns rsa)"), "enroll sealed": (0, "ok (warns rsa)"),
        "enroll sealed +auth": (0, "ok (warns auth-unused, rsa)"), "format": (0, "ok (warns rsa)"),
        "srk-public": (0, "ok (warns rsa)"), "fence": OK,
        "persist-srk": (7, "refused"), "persist-srk +auth": (7, "refused"),
    },
    "foreign-srk-shape": {  # never sealed under (it cannot be re-created): the standard SRK serves
        "doctor": OK, "status": (0, "ok ok ok (warns srk-shape)"), "load-key 0": OK,
        "load-key 1": (0, "ok (warns srk-shape)"), "load-key 2": (0, "ok (warns srk-shape)"),
        "wipe --dry-run": (0, "dies dies dies (warns srk-shape)"), "enroll derived": (0, "ok (warns srk-shape)"),
        "enroll sealed": (0, "ok (warns srk-shape)"), "enroll sealed +auth": (0, "ok (warns auth-unused, srk-shape)"),
        "format": (0, "ok (warns srk-shape)"),
        "srk-public": (0, "ok (warns srk-shape)"), "fence": OK, "persist-srk": (7, "refused"),
        "persist-srk +auth": (7, "refused"),
    },
    "owner-disabled": {
        "doctor": (0, "BAD srk"), "status": (5, "hierarchy-disabled hierarchy-disabled hierarchy-disabled"),
        "load-key 0": (4, "hierarchy-disabled"), "load-key 1": (4, "hierarchy-disabled"),
        "load-key 2": (4, "hierarchy-disabled"), "wipe --dry-run": (0, "dies dies dies"),
        "enroll derived": (4, "hierarchy-disabled"), "enroll sealed": (4, "hierarchy-disabled"),
        "enroll sealed +auth": (4, "hierarchy-disabled"), "format": (4, "hierarchy-disabled"),
        "srk-public": (4, "hierarchy-disabled"), "fence": OK,
        "persist-srk": (4, "hierarchy-disabled"), "persist-srk +auth": (4, "hierarchy-disabled"),
    },
    "endorsement-disabled": {  # the EK is optional: everything works
        "doctor": OK, "status": (0, "ok ok ok"), "load-key 0": OK, "load-key 1": OK, "load-key 2": OK,
        "wipe --dry-run": (0, "dies dies dies"), "enroll derived": OK, "enroll sealed": OK,
        "enroll sealed +auth": (0, "ok (warns auth-unused)"), "format": OK,
        "srk-public": OK, "fence": OK, "persist-srk": OK,
        "persist-srk +auth": (0, "ok (warns auth-unused)"),
    },
    "both-disabled": {  # nothing can tell whose tokens they are: wipe says "unknown", not "nothing changes"
        "doctor": (0, "BAD srk"), "status": (5, "hierarchy-disabled hierarchy-disabled hierarchy-disabled"),
        "load-key 0": (4, "hierarchy-disabled"), "load-key 1": (4, "hierarchy-disabled"),
        "load-key 2": (4, "hierarchy-disabled"), "wipe --dry-run": (0, "unknown unknown unknown"),
        "enroll derived": (4, "hierarchy-disabled"), "enroll sealed": (4, "hierarchy-disabled"),
        "enroll sealed +auth": (4, "hierarchy-disabled"), "format": (4, "hierarchy-disabled"),
        "srk-public": (4, "hierarchy-disabled"), "fence": OK,
        "persist-srk": (4, "hierarchy-disabled"), "persist-srk +auth": (4, "hierarchy-disabled"),
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, cli: ForkedCli) -> Setup:
    work = tmp_path_factory.mktemp("states")
    swtpm = Swtpm(work / "ordinary-tpm")
    swtpm.start()
    try:
        passphrase = volumes.passphrase_file(work)
        volume = volumes.luks_format(work / "volume.img", passphrase)
        unlock: list[str | Path] = ["--unlock-key-file", passphrase]
        cli.run("enroll", volume, "--mode", "sealed", "--transient-srk", *unlock, tcti=swtpm.tcti)
        cli.run("enroll", volume, "--mode", "derived", *unlock, tcti=swtpm.tcti)  # persists the SRK
        cli.run("enroll", volume, "--mode", "sealed", "--pcrs", "7", *unlock, tcti=swtpm.tcti)
        assert [t["parent"]["handle"] for t in volumes.tokens(volume).values()] == [None, SRK_HANDLE, SRK_HANDLE]
    finally:
        swtpm.stop()
    owner_pass = work / "owner-pass"
    owner_pass.write_bytes(OWNER_PASS)
    return Setup(work, swtpm.state, volumes.copy_image(volume, work / "pristine.img"), passphrase, owner_pass)


@dataclasses.dataclass
class Running:
    name: str
    swtpm: Swtpm
    volume: Path
    blank: Path


def start(state: str, s: Setup) -> Running:
    directory = s.work / state
    shutil.copytree(s.state, directory / "tpm")
    swtpm = Swtpm(directory / "tpm")
    swtpm.start()
    STATES[state](swtpm)
    return Running(state, swtpm, directory / "volume.img", directory / "blank.img")


def reset(running: Running, s: Setup) -> None:
    volumes.copy_image(s.pristine, running.volume)
    with open(running.blank, "wb") as blank:
        blank.truncate(32 << 20)


@pytest.fixture(scope="module")
def outcomes(setup: Setup, cli: ForkedCli) -> Iterator[dict[str, dict[str, tuple[int, str, str]]]]:
    """state -> command -> (exit code, projection, the output for the failure message)."""
    found: dict[str, dict[str, tuple[int, str, str]]] = {}
    names = list(STATES)
    for pair in (names[i : i + 2] for i in range(0, len(names), 2)):
        running = [start(state, setup) for state in pair]
        try:
            lines = {r.name: commands(r.volume, r.blank, setup) for r in running}
            for command in lines[pair[0]]:
                for r in running:
                    reset(r, setup)
                argvs = [["--tcti", r.swtpm.tcti, "--json", *lines[r.name][command]] for r in running]
                results = cli.run_many(argvs, tcti=None, parallel=len(running), timeout=60)
                for r, result in zip(running, results, strict=True):
                    data = json.loads(result.stdout) if result.stdout.startswith("{") else {}
                    if data:
                        validate("error" if "error" in data else command.split()[0], data)
                    shown = (result.stdout + result.stderr)[-600:]
                    found.setdefault(r.name, {})[command] = (result.returncode, project(command, data), shown)
        finally:
            for r in running:
                r.swtpm.stop()
    yield found


@pytest.mark.parametrize("state", list(STATES))
def test_each_command_in_each_tpm_state(state: str, outcomes: dict[str, dict[str, tuple[int, str, str]]]) -> None:
    wrong = [
        f"{command}: exit {code} {projection!r}, expected exit {EXPECTED[state][command][0]} "
        f"{EXPECTED[state][command][1]!r}\n    {shown!r}"
        for command, (code, projection, shown) in outcomes[state].items()
        if (code, projection) != EXPECTED[state][command]
    ]
    assert set(outcomes[state]) == set(EXPECTED[state])
    assert not wrong, f"{state}:\n  " + "\n  ".join(wrong)


# ---- what the table cannot show -------------------------------------------------------------------------


@pytest.fixture
def state_tpm(setup: Setup, request: pytest.FixtureRequest) -> Iterator[Running]:
    """A TPM in the state the test is parametrized with, and its own copy of the volume."""
    state = request.param
    running = start(state, dataclasses.replace(setup, work=Path(tempfile.mkdtemp(dir=setup.work, prefix="s"))))
    reset(running, setup)
    try:
        yield running
    finally:
        running.swtpm.stop()


@pytest.mark.parametrize("state_tpm", ["foreign-rsa", "foreign-srk-shape"], indirect=True)
def test_the_advice_about_a_foreign_key_works(state_tpm: Running, cli: ForkedCli) -> None:
    """Defect 14 (a): the warning names the key, and doing what it says brings the SRK back."""
    tcti, volume = state_tpm.swtpm.tcti, state_tpm.volume
    warned = cli.run("load-key", volume, "--token-id", "2", tcti=tcti).stderr
    advice = "`tpm2_evictcontrol -C o -c 0x81000001`"
    assert "no longer holds the SRK but" in warned and advice in warned and "persist-srk" in warned, warned
    assert "is missing" not in warned  # it is not missing: something else is there
    refused = cli.run("persist-srk", tcti=tcti, expect=7)
    assert advice in refused.stderr, refused.stderr
    tool("evictcontrol", "-C", "o", "-c", SRK_HANDLE)(state_tpm.swtpm)
    cli.run("persist-srk", tcti=tcti)
    for token in ("0", "1", "2"):
        assert cli.run("load-key", volume, "--token-id", token, tcti=tcti).stderr == ""


@pytest.mark.parametrize("state_tpm", ["foreign-srk-shape"], indirect=True)
def test_nothing_is_sealed_under_a_key_that_cannot_be_recreated(
    state_tpm: Running, setup: Setup, cli: ForkedCli
) -> None:
    """Defect 14 (b): a key of the SRK's shape at 0x81000001 that is not the standard SRK is not taken as
    the parent: the new binding names the standard SRK, and survives that key's eviction without a word
    about a cleared TPM (persist-srk --help's promise)."""
    tcti, volume = state_tpm.swtpm.tcti, state_tpm.volume
    unlock: list[str | Path] = ["--unlock-key-file", setup.passphrase]
    new = [cli.json("enroll", volume, "--mode", mode, *unlock, tcti=tcti)["token"] for mode in ("sealed", "derived")]
    standard = volumes.tokens(volume)[1]["parent"]["name"]  # made under the standard SRK, before
    for token_id in new:
        parent = volumes.tokens(volume)[token_id]["parent"]
        assert parent == {"handle": None, "name": standard}, parent
    tool("evictcontrol", "-C", "o", "-c", SRK_HANDLE)(state_tpm.swtpm)
    for token_id in new:
        result = cli.run("load-key", volume, "--token-id", str(token_id), tcti=tcti)
        assert "cleared" not in result.stderr, result.stderr


@pytest.mark.parametrize("state_tpm", ["sha1-only"], indirect=True)
def test_fence_without_a_sha256_bank_tells_the_truth(state_tpm: Running, cli: ForkedCli) -> None:
    """Defect 12: the fence extends what the TPM has, says so, exits 0, and names no option it lacks."""
    result = cli.run("fence", tcti=state_tpm.swtpm.tcti)
    assert "extended in sha1" in result.stdout and "no sha256 bank" in result.stdout, result.stdout
    assert "--pcr-bank" not in result.stdout + result.stderr
    doctor = cli.run("doctor", tcti=state_tpm.swtpm.tcti).stdout
    assert "--pcr-bank" not in doctor.replace("enroll --pcr-bank", ""), doctor


@pytest.mark.parametrize("state_tpm", ["owner-auth"], indirect=True)
def test_a_wrong_owner_authorization_is_refused_and_costs_nothing(
    state_tpm: Running, cli: ForkedCli, tmp_path: Path
) -> None:
    """Defect 13: a wrong owner authorization is named as such (exit 7, wrong-auth), and the TPM counts no
    dictionary-attack failure for it (hierarchy authorizations are exempt), so trying cannot lock it."""
    wrong = tmp_path / "wrong"
    wrong.write_bytes(OWNER_PASS + b"\n")
    tcti = state_tpm.swtpm.tcti
    error = cli.json("persist-srk", "--owner-auth-file", wrong, tcti=tcti, expect=7)["error"]
    assert error["cause"] == "wrong-auth" and "owner authorization" in error["message"], error
    assert cli.json("doctor", tcti=tcti)["lockout"]["failures"] == 0


@pytest.mark.parametrize("state_tpm", ["owner-auth-no-srk", "owner-disabled"], indirect=True)
def test_wipe_lists_what_the_clear_destroys_when_the_srk_cannot_be_had(state_tpm: Running, cli: ForkedCli) -> None:
    """Defect 13: every token made on this TPM DIES (the endorsement key says whose), and the text never
    says "nothing of it changes"; then the wipe itself clears and proves them destroyed."""
    tcti, volume = state_tpm.swtpm.tcti, state_tpm.volume
    text = cli.run("wipe", "--dry-run", volume, tcti=tcti).stdout
    tokens = [line for line in text.splitlines() if line.startswith("    token ")]
    assert len(tokens) == 3 and all("DIES" in line for line in tokens), text
    assert "nothing of it changes" not in text
    wiped = cli.json("wipe", "--yes", volume, tcti=tcti)
    assert wiped["verified"] is True, wiped
