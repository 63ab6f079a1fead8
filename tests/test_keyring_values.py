"""Issue 21, class "every keyring value": `load-key --keyring` with each value the documentation names
(@t @p @s @u @us, a keyring's serial), with a key's serial (not a keyring) and with a keyring this
process may not write to.

Each value that works gives the volume key, as a logon key, exactly the documented permissions
(possessor view, search, link, setattr; nothing for its owner, group or others), in that keyring and
nowhere else (not in the thread keyring it is staged in, not in any other keyring); the timeout is set
when asked. Each value that cannot work is refused with exit 2 and leaves no key anywhere. The key
never reaches the target before its permissions are final (defect 3: `@u` used to keep a key with
write permission there, and exit 1).

The command's own function runs in this process (`keyring.load_key_target`, then `activation.load_keys`
through the one boundary, as the CLI calls them), so that the thread and process keyrings can be looked
at afterwards. Root's real user keyrings (@u, @us) are used as the operator would: every key a test
puts there is revoked and unlinked at its end, whatever happens.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from luks_tpm import activation, keyring
from luks_tpm.boundary import Console, Plain, run
from luks_tpm.errors import ExitCode, LuksTpmError
from luks_tpm.output import Report
from luks_tpm.prompt import pin_source

from . import keyutils, volumes
from .fixtures_tpm import Swtpm
from .forked_cli import ForkedCli

SPECIAL = {
    "@t": keyring.THREAD,
    "@p": keyring.PROCESS,
    "@s": keyring.SESSION,
    "@u": keyring.USER,
    "@us": keyring.USER_SESSION,
}


@pytest.fixture
def volume(tmp_path: Path, swtpm: Swtpm, cli: ForkedCli) -> Path:
    """A volume of its own UUID (the key's description names it: found and removed by it)."""
    passphrase = volumes.passphrase_file(tmp_path)
    image = volumes.luks_format(tmp_path / "volume.img", passphrase, uuid=str(uuid.uuid4()))
    cli.run("enroll", image, "--mode", "derived", "--unlock-key-file", passphrase, tcti=swtpm.tcti)
    return image


def keyctl(*args: str) -> str:
    return subprocess.run(["keyctl", *args], check=True, capture_output=True, text=True).stdout.strip()


def contents(ring: int) -> set[int]:
    with contextlib.suppress(keyring.KeyringError):
        return set(keyutils.keyring_contents(keyring.keyring_id(ring)))
    return set()


def identity(ring: int) -> int | None:
    """A special keyring's serial, or None when this process has none (no process keyring yet)."""
    with contextlib.suppress(keyring.KeyringError):
        return keyring.keyring_id(ring)
    return None


def everywhere() -> dict[str, set[int]]:
    return {name: contents(ring) for name, ring in SPECIAL.items()}


@contextlib.contextmanager
def cleaned(description: str) -> Iterator[None]:
    """Whatever this block adds under `description` to root's real user keyrings is removed afterwards.

    Their keys are possessor-only (as they must be): to look at them and remove them, this test links
    @u and @us into its private session keyring for the block (possession), and unlinks them after,
    before the session's teardown, which revokes what the session holds, and must never revoke those."""
    session = keyring.keyring_id(keyring.SESSION)
    users = [keyring.keyring_id(ring, create=True) for ring in (keyring.USER, keyring.USER_SESSION)]
    for ring in users:
        keyring.link(ring, session)
    try:
        yield
    finally:
        try:
            for ring in users:
                for serial in set(keyutils.keyring_contents(ring)):
                    with contextlib.suppress(keyring.KeyringError):
                        if keyring.describe(serial).description == description:
                            keyutils.revoke(serial)
                            keyring.unlink(serial, ring)
        finally:
            for ring in users:
                keyring.unlink(ring, session)


def load(volume: Path, spec: str, tcti: str, timeout: int | None = None) -> tuple[int, Report | None]:
    """`load-key VOLUME --keyring SPEC`, as the CLI runs it: (exit code, the report when it succeeded)."""
    reports: list[Report] = []

    def work() -> Report:
        target = keyring.load_key_target(spec)
        reports.append(activation.load_keys(tcti, [volume], target, timeout, False, None, pin_source(None)))
        return reports[-1]

    def as_cli() -> Report | None:
        try:
            return work()
        except ValueError as error:  # what the CLI turns into a usage error naming --keyring
            raise LuksTpmError(f"--keyring: {error}", code=ExitCode.USAGE) from None

    code = run(as_cli, Console(Plain()))
    return code, (reports[-1] if reports else None)


def keyctl_uuid(volume: Path) -> str:
    return subprocess.run(
        ["cryptsetup", "luksUUID", str(volume)], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.usefixtures("private_session_keyring")
@pytest.mark.parametrize("spec", ["@t", "@p", "@s", "@u", "@us", "a new keyring's serial"])
def test_each_documented_keyring_gets_the_key_with_the_documented_permissions(
    spec: str, volume: Path, swtpm: Swtpm
) -> None:
    description = f"cryptsetup:{keyctl_uuid(volume)}-d0"
    ring_spec = keyctl("newring", f"luks-tpm-test-{uuid.uuid4()}", "@s") if spec.startswith("a new") else spec
    target = keyring.load_key_target(ring_spec)
    with cleaned(description):
        before = everywhere()
        before_target = contents(target)
        code, report = load(volume, ring_spec, swtpm.tcti, timeout=600)
        assert code == 0 and report is not None
        loaded = report.result
        assert isinstance(loaded, activation.LoadedKey)
        assert loaded.keyring == target and loaded.description == description
        found = keyring.describe(loaded.serial)
        assert (found.type, found.description, found.perm) == ("logon", description, keyring.logon_key_permissions())
        assert contents(target) == before_target | {loaded.serial}
        after = everywhere()
        for name, ring in SPECIAL.items():  # nowhere else: not even the thread keyring it was staged in
            if identity(ring) != target:
                assert after[name] == before[name], f"{spec}: something was added to {name}"
        expiry = next(line.split()[3] for line in Path("/proc/keys").read_text().splitlines()
                      if int(line.split()[0], 16) == loaded.serial)  # fmt: skip
        assert expiry != "perm", "the timeout was not set"


@pytest.mark.usefixtures("private_session_keyring")
def test_a_keyring_without_write_permission_is_refused_and_nothing_is_left(volume: Path, swtpm: Swtpm) -> None:
    description = f"cryptsetup:{keyctl_uuid(volume)}-d0"
    ring = int(keyctl("newring", f"luks-tpm-test-{uuid.uuid4()}", "@s"))
    keyctl("setperm", str(ring), "0x0b000000")  # possessor: view, read, search; no write; others nothing
    with cleaned(description):
        before = everywhere()
        code, _ = load(volume, str(ring), swtpm.tcti)
        assert code == 2
        assert contents(ring) == set() and everywhere() == before
        assert keyutils.search(keyring.SESSION, "logon", description) is None


@pytest.mark.usefixtures("private_session_keyring")
def test_a_key_that_is_not_a_keyring_is_refused_before_any_key_is_added(volume: Path, swtpm: Swtpm) -> None:
    description = f"cryptsetup:{keyctl_uuid(volume)}-d0"
    key = keyctl("add", "user", f"luks-tpm-test-{uuid.uuid4()}", "data", "@s")
    with cleaned(description):
        before = everywhere()
        code, report = load(volume, key, swtpm.tcti)
        assert code == 2 and report is None
        assert everywhere() == before


@pytest.mark.usefixtures("private_session_keyring")
def test_the_refusals_through_the_command_line(volume: Path, swtpm: Swtpm, cli: ForkedCli) -> None:
    """The same refusals as a user sees them: one line naming --keyring, exit 2."""
    # in this test's session keyring, whose teardown removes it; its owner (root) may view it, so the
    # command, in a session of its own, can tell what it is
    user_key = keyctl("add", "user", f"luks-tpm-test-{uuid.uuid4()}", "data", "@s")
    keyctl("setperm", user_key, "0x3f010000")
    for spec, words in ((user_key, "not a keyring"), ("@x", "invalid keyring"), ("99999999", "--keyring")):
        result = cli.run("load-key", volume, "--keyring", spec, tcti=swtpm.tcti, expect=2)
        assert "--keyring" in result.stderr and words in result.stderr, result.stderr
