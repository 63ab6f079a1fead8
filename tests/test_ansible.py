"""The Ansible role (ansible/roles/luks_tpm) run for real: ansible-playbook with ansible/site.yml against
this machine, which installs the Debian package with apt (purged at the end), a swtpm, LUKS2 image files,
a crypttab in a temporary directory, and dracut as the initramfs builder writing to a temporary file.

The tests run in order, as an operator would: check mode before anything is installed, the first run,
the second run (changed=0), check mode on new volumes, failures, rebind, erase, wipe. Each playbook's
output is kept, and the last test looks for the passphrases and the recovery key in all of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .fixtures_luks import TEST_PASSPHRASE, file_digest, make_luks_image, sparse_file
from .fixtures_package import apt_get, installed
from .fixtures_tpm import Swtpm
from .helpers import REPO

PLAYBOOK = REPO / "ansible" / "site.yml"
INSTALLED = "/usr/sbin/luks-tpm"
WRONG_PASSPHRASE = "not-the-passphrase-0451"
RECAP = re.compile(r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)
UUIDS = {
    "derived": "11111111-1111-4111-8111-111111111111",
    "sealed": "22222222-2222-4222-8222-222222222222",
    "chain": "33333333-3333-4333-8333-333333333333",
}
# The runs after the first ones (which install the package and prove the install idempotent) skip apt.
INSTALLED_ALREADY = {"luks_tpm_install": False}
CRYPTTAB = "# <target name>\t<source device>\t<key file>\t<options>\ndata UUID={uuid} none luks,discard\n"


def _ansible_playbook() -> str:
    found = shutil.which("ansible-playbook", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip("ansible-playbook is not installed (the test extra has ansible-core: scripts/bootstrap)")
    return found


@dataclass(frozen=True)
class Run:
    rc: int
    output: str
    seconds: float
    ok: int
    changed: int
    failed: int


@dataclass
class Lab:
    """The machine the playbook manages: its files, its TPM, and every playbook output so far."""

    root: Path
    swtpm: Swtpm
    deb: Path
    outputs: list[str] = field(default_factory=list)

    @property
    def crypttab(self) -> Path:
        return self.root / "crypttab"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd.img"

    @property
    def facts(self) -> Path:
        return self.root / "facts.json"

    @property
    def keys(self) -> Path:
        return self.root / "recovery-keys"

    def image(self, name: str) -> Path:
        return self.root / f"{name}.img"

    def volumes(self) -> list[dict[str, Any]]:
        key = TEST_PASSPHRASE.decode()
        return [
            {"device": str(self.image("derived")), "unlock_key": key, "crypttab_name": "data"},
            {
                "device": str(self.image("sealed")),
                "mode": "sealed",
                "pcrs": [7],
                "fence": True,
                "unlock_key": key,
                "crypttab_name": "logs",
            },
            {"device": str(self.image("chain")), "mode": "sealed", "boot_chain": True, "unlock_key": key},
            {
                "device": str(self.image("blank")),
                "format": True,
                "crypttab_name": "fresh",
                "crypttab_options": "luks,nofail",
                # a fast PBKDF for the test; real volumes keep argon2id
                "format_options": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
            },
        ]

    def inventory(self) -> Path:
        """The host and the role's variables; JSON is YAML."""
        host = {
            "ansible_connection": "local",
            "ansible_become": False,
            "luks_tpm_deb": str(self.deb),
            "luks_tpm_deb_dir": str(self.root / "debs"),
            "luks_tpm_tcti": self.swtpm.tcti,
            "luks_tpm_crypttab": str(self.crypttab),
            "luks_tpm_approver": str(self.root / "approver.json"),
            "luks_tpm_recovery_key_dir": str(self.keys),
            # a real builder into a temporary file, never the host's own initramfs: dracut, because
            # mkinitramfs needs /boot/config-$(uname -r), which a container does not have; only its base
            # module, uncompressed (about 1 s instead of 9)
            "luks_tpm_initramfs_command": f"dracut --no-kernel --force --quiet -m base --no-compress {self.initrd}",
            "luks_tpm_volumes": self.volumes(),
        }
        path = self.root / "inventory.yml"
        path.write_text(json.dumps({"luks_tpm": {"hosts": {"localhost": host}}}, indent=1))
        return path

    def site(self) -> Path:
        """ansible/site.yml, then a play that writes the facts the role published to facts.json."""
        facts = {
            "hosts": "luks_tpm",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Keep luks_tpm_facts for the test",
                    "ansible.builtin.copy": {"content": "{{ luks_tpm_facts | to_json }}", "dest": str(self.facts)},
                    "changed_when": False,
                    "when": "luks_tpm_facts is defined",
                }
            ],
        }
        path = self.root / "site.yml"
        path.write_text(json.dumps([{"ansible.builtin.import_playbook": str(PLAYBOOK)}, facts], indent=1))
        return path

    def playbook(self, *args: str, extra: dict[str, Any] | None = None) -> Run:
        command = [_ansible_playbook(), "-i", str(self.inventory()), str(self.site()), *args]
        if extra is not None:
            variables = self.root / "extra.json"
            variables.write_text(json.dumps(extra))
            command += ["-e", f"@{variables}"]
        home = self.root / "ansible-home"
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
            "ANSIBLE_HOME": str(home),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin",
        }
        env.pop("LUKS_TPM_TCTI", None)
        start = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=600)
        seconds = time.monotonic() - start
        output = result.stdout + result.stderr
        self.outputs.append(output)
        recap = RECAP.findall(output)
        assert recap, f"no PLAY RECAP (exit {result.returncode}):\n{output[-6000:]}"
        ok, changed, _, failed = map(int, recap[-1])
        return Run(result.returncode, output, seconds, ok, changed, failed)

    def digests(self) -> dict[str, str]:
        files = [*sorted(self.root.glob("*.img")), self.crypttab]
        return {path.name: file_digest(path) for path in files if path.name != self.initrd.name}


def _status(lab: Lab, *devices: Path) -> Any:
    result = subprocess.run(
        [INSTALLED, "--tcti", lab.swtpm.tcti, "--json", "status", *map(str, devices)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 5), result.stdout + result.stderr
    return json.loads(result.stdout)


def _token_versions(device: Path) -> list[int]:
    dump = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", str(device)], capture_output=True, text=True, check=True
    )
    return [token["version"] for token in json.loads(dump.stdout)["tokens"].values() if token["type"] == "luks-tpm"]


def _handler_runs(output: str) -> int:
    """How often the rebuild handler ran (Ansible shows a handler only when it was notified)."""
    return output.count("RUNNING HANDLER [luks_tpm : Rebuild the initramfs]")


@pytest.fixture(scope="module")
def lab(
    tmp_path_factory: pytest.TempPathFactory, module_swtpm: Swtpm, deb: Path, module_machine_lock: None
) -> Iterator[Lab]:
    if shutil.which("dracut") is None or shutil.which("cryptsetup") is None:
        pytest.skip("the role's test needs dracut and cryptsetup (scripts/bootstrap installs them)")
    _ansible_playbook()
    root = tmp_path_factory.mktemp("ansible")
    for name, uuid in UUIDS.items():
        make_luks_image(root / f"{name}.img", uuid=uuid)
    sparse_file(root / "blank.img")
    (root / "crypttab").write_text(CRYPTTAB.format(uuid=UUIDS["derived"]))
    lab = Lab(root, module_swtpm, deb)
    try:
        yield lab
    finally:
        purge = apt_get("purge", "luks-tpm")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not installed("luks-tpm")


def test_check_mode_before_install_changes_nothing(lab: Lab) -> None:
    before = lab.digests()
    run = lab.playbook("--check")
    print(f"check mode before the install: {run.seconds:.1f} s")
    assert run.rc == 0 and run.failed == 0, run.output[-4000:]
    assert run.changed >= 1  # the package would be copied and installed
    assert "would be installed first: check mode cannot ask it about the volumes yet" in run.output
    assert not installed("luks-tpm")
    assert lab.digests() == before
    assert not lab.initrd.exists() and not lab.keys.exists() and not (lab.root / "debs").exists()


def test_first_run_installs_formats_enrolls_marks_and_builds_once(lab: Lab) -> None:
    run = lab.playbook("-vvv")  # -vvv: the last test looks for key material in the most verbose output too
    print(f"first run: {run.seconds:.1f} s (-vvv)")
    assert run.rc == 0 and run.failed == 0, run.output[-6000:]
    assert run.changed > 0
    assert installed("luks-tpm")
    status = _status(lab, *(lab.image(name) for name in (*UUIDS, "blank")))
    tokens = {Path(v["device"]).stem: v["tokens"] for v in status["volumes"]}
    assert all(len(found) == 1 and found[0]["unlocks"] for found in tokens.values()), tokens
    assert [(t["mode"], t["pcrs"], t["fence"]) for t in tokens["derived"]] == [("derived", [], False)]
    assert [(t["mode"], t["pcrs"], t["fence"]) for t in tokens["sealed"]] == [("sealed", [7], True)]
    assert [(t["mode"], t["pcrs"], t["fence"]) for t in tokens["chain"]] == [("sealed", [4, 7, 8, 9], False)]
    assert _token_versions(lab.image("chain")) == [2]
    assert [(t["mode"], t["pcrs"]) for t in tokens["blank"]] == [("derived", [])]

    # the generated recovery key: only in a 0600 file on the controller, and it opens the new volume
    fresh_uuid = next(v["uuid"] for v in status["volumes"] if Path(v["device"]).stem == "blank")
    key_file = lab.keys / f"localhost-{fresh_uuid}.recovery-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(lab.keys.stat().st_mode) == 0o700
    opened = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(key_file), str(lab.image("blank"))],
        capture_output=True,
        check=False,
    )
    assert opened.returncode == 0, opened.stderr

    assert lab.crypttab.read_text() == (
        CRYPTTAB.format(uuid=UUIDS["derived"]).replace("luks,discard", "luks,discard,x-luks-tpm")
        + f"logs UUID={UUIDS['sealed']} none luks,x-luks-tpm\n"
        + f"fresh UUID={fresh_uuid} none luks,nofail,x-luks-tpm\n"
    )
    assert _handler_runs(run.output) == 1 and lab.initrd.stat().st_size > 0


def test_second_run_changes_nothing(lab: Lab) -> None:
    before, initrd = lab.digests(), lab.initrd.stat()
    run = lab.playbook()
    print(f"second run: {run.seconds:.1f} s")
    assert run.rc == 0 and (run.changed, run.failed) == (0, 0), run.output[-6000:]
    assert lab.digests() == before, "the second run changed a header or the crypttab"
    assert _handler_runs(run.output) == 0
    assert (lab.initrd.stat().st_mtime_ns, lab.initrd.stat().st_ino) == (initrd.st_mtime_ns, initrd.st_ino)


def test_facts_come_from_status(lab: Lab) -> None:
    """The role publishes luks_tpm_facts; the test's playbook after site.yml writes them to facts.json."""
    published = json.loads(lab.facts.read_text())
    derived = published["volumes"][str(lab.image("derived"))]
    assert derived["unlocks"] is True and derived["uuid"] == UUIDS["derived"]
    assert [(t["mode"], t["pcrs"], t["unlocks"]) for t in derived["tokens"]] == [("derived", [], True)]
    sealed = published["volumes"][str(lab.image("sealed"))]
    assert [(t["mode"], t["pcrs"], t["fence"]) for t in sealed["tokens"]] == [("sealed", [7], True)]
    assert published["unlocks"] is True and published["fence_up"] is False
    assert "next_boot" in published and all("next_boot" in volume for volume in published["volumes"].values())


def test_check_mode_on_new_volumes_changes_nothing(lab: Lab) -> None:
    make_luks_image(lab.image("new"))
    sparse_file(lab.image("newblank"))
    volumes = [
        *lab.volumes(),
        {"device": str(lab.image("new")), "mode": "sealed", "pcrs": "7", "unlock_key": TEST_PASSPHRASE.decode()},
        {"device": str(lab.image("newblank")), "format": True, "crypttab_name": "more"},
    ]
    before, initrd, keys = lab.digests(), lab.initrd.stat(), sorted(lab.keys.iterdir())
    run = lab.playbook("--check", "--diff", extra={"luks_tpm_volumes": volumes})
    print(f"check mode with new volumes: {run.seconds:.1f} s")
    assert run.rc == 0 and run.failed == 0, run.output[-6000:]
    assert run.changed >= 2
    assert f"would enroll {lab.image('new')}" in run.output
    assert f"would format {lab.image('newblank')}" in run.output
    assert lab.digests() == before
    assert lab.initrd.stat().st_mtime_ns == initrd.st_mtime_ns
    assert sorted(lab.keys.iterdir()) == keys


def test_a_failed_enrollment_shows_the_commands_message(lab: Lab) -> None:
    make_luks_image(lab.image("wrong"))
    make_luks_image(lab.image("nokey"))
    wrong_key = lab.root / "wrong-key"
    wrong_key.write_text(WRONG_PASSPHRASE)
    expected = []
    for device, key in ((lab.image("wrong"), ["--unlock-key-file", str(wrong_key)]), (lab.image("nokey"), [])):
        enroll = ["enroll", str(device), "--mode", "derived", *key]
        direct = subprocess.run(
            ["setsid", "--wait", INSTALLED, "--tcti", lab.swtpm.tcti, "--json", *enroll],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        error = json.loads(direct.stdout)["error"]
        expected.append(f"{device}: luks-tpm enroll: {error['message']}")
        expected.append(f"[exit {direct.returncode}, cause {error['cause']}]")
    before = lab.digests()
    volumes = [
        {"device": str(lab.image("wrong")), "unlock_key": WRONG_PASSPHRASE},
        {"device": str(lab.image("nokey"))},
    ]
    run = lab.playbook("-vvv", extra={**INSTALLED_ALREADY, "luks_tpm_volumes": volumes})
    assert run.rc != 0 and run.failed == 1
    failure = run.output[run.output.index("fatal: [localhost]") :]
    for words in expected:
        assert words in failure, f"{words!r} not in {failure}"
    assert "[exit 5, cause wrong-key]" in failure and "[exit 2, cause usage]" in failure
    assert "Traceback" not in run.output
    assert lab.digests() == before


def test_rebind_approves_the_given_next_boot_once(lab: Lab) -> None:
    next_boot = {**INSTALLED_ALREADY, "luks_tpm_rebind": True, "luks_tpm_rebind_pcr_values": ["4=" + "ab" * 32]}
    first = lab.playbook(extra=next_boot)
    assert first.rc == 0 and first.changed == 1, first.output[-4000:]
    again = lab.playbook(extra=next_boot)
    assert again.rc == 0 and again.changed == 0, again.output[-4000:]
    if not Path("/sys/kernel/security/tpm0/binary_bios_measurements").exists():
        predicted = lab.playbook("--check", extra={**INSTALLED_ALREADY, "luks_tpm_rebind": True})
        assert predicted.rc != 0 and "luks-tpm predict: no TCG event log" in predicted.output
        assert "[exit 10, cause no-event-log]" in predicted.output


def test_erase_needs_its_confirmation_and_happens_once(lab: Lab) -> None:
    target = lab.image("wrong")  # not bound: erase takes its keyslot
    erase: dict[str, Any] = {
        **INSTALLED_ALREADY,
        "luks_tpm_decommission": "erase",
        "luks_tpm_volumes": [{"device": str(target)}],
    }
    before = file_digest(target)
    refused = lab.playbook(extra=erase)
    assert refused.failed == 1 and 'set luks_tpm_decommission_confirm to \\"erase localhost\\"' in refused.output
    assert file_digest(target) == before
    erase["luks_tpm_decommission_confirm"] = "erase localhost"
    checked = lab.playbook("--check", extra=erase)
    assert checked.rc == 0 and checked.changed == 1 and file_digest(target) == before
    done = lab.playbook(extra=erase)
    assert done.rc == 0 and done.changed == 1, done.output[-4000:]
    volume = _status(lab, target)["volumes"][0]
    assert volume["keyslots"] == [] and volume["tokens"] == []
    assert lab.playbook(extra=erase).changed == 0


def test_wipe_clears_the_tpm_once(lab: Lab) -> None:
    wipe = {**INSTALLED_ALREADY, "luks_tpm_decommission": "wipe", "luks_tpm_decommission_confirm": "wipe localhost"}
    done = lab.playbook(extra=wipe)
    assert done.rc == 0 and done.changed == 1, done.output[-4000:]
    token = _status(lab, lab.image("derived"))["volumes"][0]["tokens"][0]
    assert token["unlocks"] is False and token["cause"] == "cleared"
    assert lab.playbook(extra=wipe).changed == 0


def test_no_key_material_in_any_output(lab: Lab) -> None:
    assert len(lab.outputs) >= 8
    secrets = [TEST_PASSPHRASE.decode(), WRONG_PASSPHRASE]
    secrets += [path.read_text() for path in lab.keys.glob("*.recovery-key")]
    assert len(secrets) == 3 and all(len(s) >= 15 for s in secrets)
    for output in lab.outputs:
        for secret in secrets:
            assert secret not in output
    verbose = [output for output in lab.outputs if "<localhost> ESTABLISH LOCAL CONNECTION" in output]
    assert len(verbose) >= 2, "the -vvv runs are missing"
    left = [p for p in (lab.root / "ansible-home").rglob("*") if p.is_file() and "AnsiballZ" in p.name]
    assert not left, f"module files left behind: {left}"
