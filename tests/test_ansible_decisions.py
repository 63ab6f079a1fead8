"""The Ansible role's decisions (ansible/roles/luks_tpm/filter_plugins/luks_tpm_decisions.py) on the
cases the playbook test does not reach: crypttab lines of every shape, which tokens count as the binding
asked for, and the one-line errors. The inputs are luks-tpm's --json output as docs/json.md defines it."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

import pytest

from .helpers import REPO


def _decisions() -> ModuleType:
    path = REPO / "ansible" / "roles" / "luks_tpm" / "filter_plugins" / "luks_tpm_decisions.py"
    spec = importlib.util.spec_from_file_location("luks_tpm_role_decisions", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


decisions = _decisions()
UUID = "11111111-1111-4111-8111-111111111111"


def _token(**fields: Any) -> dict[str, Any]:
    token = {
        "id": 0,
        "damaged": False,
        "mode": "sealed",
        "pcrs": [7],
        "pcr_bank": "sha256",
        "pin": False,
        "fence": True,
        "other_tpm": False,
        "unlocks": True,
        "cause": None,
    }
    return token | fields


def _plan(token: dict[str, Any], volume: dict[str, Any], version: int = 1) -> list[dict[str, Any]]:
    status = {
        "volumes": [{"device": "/dev/sdb", "uuid": UUID, "error": None, "tokens": [{**token, "version": version}]}]
    }
    plan: list[dict[str, Any]] = decisions.luks_tpm_plan([volume], status)
    return plan


WANTED = {"device": "/dev/sdb", "mode": "sealed", "pcrs": "7", "fence": True, "unlock_key": "not shown"}


def test_a_working_token_of_the_kind_asked_for_is_kept() -> None:
    assert _plan(_token(), WANTED) == []
    # after boot the fence is up: a fenced token that fails only for that still counts
    assert _plan(_token(unlocks=False, cause="fence-up"), WANTED) == []


@pytest.mark.parametrize(
    "token",
    [
        _token(unlocks=False, cause="pcr-changed"),
        _token(mode="derived"),
        _token(pcrs=[7, 11]),
        _token(fence=False),
        _token(pcr_bank="sha1"),
        _token(pin=True),
        _token(other_tpm=True),
        {"id": 0, "damaged": True, "unlocks": False, "cause": "corrupt-token"},
    ],
)
def test_any_other_token_means_enroll(token: dict[str, Any]) -> None:
    [entry] = _plan(token, WANTED)
    assert entry == {
        "index": 0,
        "device": "/dev/sdb",
        "args": ["--mode", "sealed", "--pcr-bank", "sha256", "--pcrs", "7", "--fence"],
        "has_key": True,
    }
    assert "not shown" not in str(entry)


def test_boot_chain_is_told_by_the_token_version() -> None:
    chain = {"device": "/dev/sdb", "mode": "sealed", "boot_chain": True}
    token = _token(pcrs=[4, 7, 8, 9], fence=False)
    assert _plan(token, chain, version=2) == []
    [entry] = _plan(token, chain, version=1)  # the same PCRs, bound to values, not to approved states
    assert entry["args"][-3:] == ["--boot-chain", "--approver", "/var/lib/luks-tpm/approver.json"]
    assert entry["has_key"] is False
    assert _plan(token | {"pcrs": [4, 7, 8, 9]}, {**WANTED, "pcrs": [9, 8, 7, 4], "fence": False}) == []


def test_a_device_status_could_not_read_stops_with_its_message() -> None:
    error = {"message": "/dev/sdz: no such file or device", "code": 3, "cause": "device", "hint": None}
    status: dict[str, Any] = {"volumes": [{"device": "/dev/sdz", "uuid": None, "error": error, "tokens": []}]}
    with pytest.raises(decisions.RoleError, match=r"/dev/sdz: no such file or device \[luks-tpm exit 3\]"):
        decisions.luks_tpm_plan([{"device": "/dev/sdz"}], status)
    with pytest.raises(decisions.RoleError, match="mode must be derived or sealed"):
        decisions.luks_tpm_binding({"device": "/dev/sdb", "mode": "tpm"})
    with pytest.raises(decisions.RoleError, match="PCR indices are 0 to 23"):
        decisions.luks_tpm_binding({"device": "/dev/sdb", "pcrs": [24]})


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("", f"data UUID={UUID} none luks,x-luks-tpm\n"),
        (
            "# comment\ndata\tUUID=x\tnone\tluks,discard  # old\n",
            "# comment\ndata\tUUID=x\tnone\tluks,discard,x-luks-tpm  # old\n",
        ),
        ("data /dev/sdb\n", "data /dev/sdb none x-luks-tpm\n"),
        ("data /dev/sdb none\n", "data /dev/sdb none x-luks-tpm\n"),
        ("data /dev/sdb /key none\n", "data /dev/sdb /key x-luks-tpm\n"),
        (f"other UUID={UUID} none luks\n", f"other UUID={UUID} none luks,x-luks-tpm\n"),  # found by its UUID
        (
            "swap /dev/sda2 /dev/urandom swap\n",
            f"swap /dev/sda2 /dev/urandom swap\ndata UUID={UUID} none luks,x-luks-tpm\n",
        ),
    ],
)
def test_crypttab_marks(before: str, after: str) -> None:
    entries = [{"name": "data", "uuid": UUID, "options": "luks"}]
    assert decisions.luks_tpm_crypttab(before, entries) == after
    assert decisions.luks_tpm_crypttab(after, entries) == after


def test_crypttab_already_marked_is_left_byte_for_byte() -> None:
    marked = "data UUID=x none luks,x-luks-tpm"  # no final newline: still not rewritten
    assert decisions.luks_tpm_crypttab(marked, [{"name": "data", "uuid": UUID}]) == marked


def test_errors_are_one_line_from_the_json() -> None:
    stdout = '{"version": 1, "error": {"message": "no keyslot opens", "hint": null, "code": 5, "cause": "wrong-key"}}'
    result = {"rc": 5, "stdout": stdout, "stderr": "luks-tpm: no keyslot opens", "item": {"device": "/dev/sdb"}}
    assert decisions.luks_tpm_failures([result, {"rc": 0, "item": "/dev/sdc"}], "luks-tpm enroll") == [
        "/dev/sdb: luks-tpm enroll: no keyslot opens [exit 5, cause wrong-key]"
    ]
    crashed = {"rc": 127, "stdout": "", "stderr": "setsid: failed to execute luks-tpm: No such file"}
    assert decisions.luks_tpm_error(crashed) == "luks-tpm: setsid: failed to execute luks-tpm: No such file [exit 127]"


def test_rebind_erase_and_wipe_say_whether_anything_changed() -> None:
    same = {"volumes": [{"tokens": [{"id": 2, "was": 2, "added": 0, "dropped": 0}]}]}
    assert not decisions.luks_tpm_rebind_changed(same)
    assert decisions.luks_tpm_rebind_changed({"volumes": [{"tokens": [{"id": 3, "was": 2, "added": 1}]}]})
    assert not decisions.luks_tpm_erase_pending({"volumes": [{"keyslots": [], "luks_tpm_tokens": []}]})
    assert decisions.luks_tpm_erase_pending({"volumes": [{"keyslots": [0], "luks_tpm_tokens": []}]})
    cleared = {"volumes": [{"tokens": [{"fate": "dead"}]}], "persistent": [], "nv_indices": []}
    assert not decisions.luks_tpm_wipe_pending(cleared)
    assert decisions.luks_tpm_wipe_pending(cleared | {"persistent": [{"handle": "0x81000001"}]})
