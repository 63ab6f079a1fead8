"""The next boot's PCRs, predicted from a real boot's log and the updated boot files, against the PCRs of
the real boot of that updated system (OVMF + shim + GRUB 2.06-13 + kernel under swtpm, tests/data/bootchain):
every bank, PCRs 0-9 and 11-15. Nothing expected here is computed by the code under test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from luks_tpm.bootchain import predict
from luks_tpm.bootchain.errors import Reason, Unpredictable
from luks_tpm.bootchain.eventlog import EventType, make_event

from . import bootchain_lab as lab

BOOTED = "base-r1"
# scenario (files on disk) -> the run that booted them
SCENARIOS = {
    "base": "base-r2",
    "kernel57": "kernel57",
    "initrd2": "initrd2",
    "cmdline": "cmdline",
    "timeout": "timeout",
    "nextentry": "nextentry",
}
MOVED = {"base": (), "kernel57": (4, 8, 9), "initrd2": (9,), "cmdline": (8, 9), "timeout": (8, 9), "nextentry": (8, 9)}


def _snapshot(tmp_path: Path) -> Path:
    """What the booted system would have kept at boot: its config files, by digest."""
    esp, boot = lab.boot_tree("base", tmp_path / "booted")
    directory = tmp_path / "snapshots"
    copied = predict.snapshot(lab.log(BOOTED), lab.files(lab.log(BOOTED), esp, boot), directory)
    assert len({p.name for p in copied}) == 3  # stub grub.cfg, grub.cfg, grubenv
    return directory


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_prediction_is_the_next_boots_pcrs(tmp_path: Path, scenario: str) -> None:
    booted = lab.log(BOOTED)
    snapshots = _snapshot(tmp_path)
    esp, boot = lab.boot_tree(scenario, tmp_path / "next")
    prediction = predict.next_boot(booted, lab.files(booted, esp, boot, snapshots))
    actual = lab.pcrs(SCENARIOS[scenario])
    assert set(prediction.values) == set(actual) == {"sha1", "sha256", "sha384", "sha512"}
    for bank, values in prediction.values.items():
        assert sorted(values) == list(range(16))
        for pcr in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15):
            assert values[pcr] == actual[bank][pcr], (scenario, bank, pcr)
    moved = tuple(p for p in range(16) if p != 10 and prediction.values["sha256"][p] != lab.pcrs(BOOTED)["sha256"][p])
    assert moved == MOVED[scenario]
    assert prediction.changes[-1] == (f"PCRs that change: {', '.join(map(str, moved))}" if moved else "no PCR changes")


def test_the_emulation_reproduces_every_booted_log(tmp_path: Path) -> None:
    """Each updated boot's own log, predicted from itself with its own files: the emulation is exact."""
    for scenario, run in SCENARIOS.items():
        esp, boot = lab.boot_tree(scenario, tmp_path / scenario)
        booted = lab.log(run)
        prediction = predict.next_boot(booted, lab.files(booted, esp, boot))
        assert [e.digests for e in prediction.events] == [e.digests for e in booted.events], scenario


def _expect(reason: Reason, booted_run: str, esp: Path, boot: Path, snapshots: Path | None = None) -> Unpredictable:
    booted = lab.log(booted_run)
    with pytest.raises(Unpredictable) as raised:
        predict.next_boot(booted, lab.files(booted, esp, boot, snapshots))
    assert raised.value.reason is reason, raised.value
    assert "\n" not in str(raised.value)
    return raised.value


def test_booted_config_gone_without_snapshot(tmp_path: Path) -> None:
    esp, boot = lab.boot_tree("kernel57", tmp_path)
    error = _expect(Reason.BOOTED_INPUTS_GONE, BOOTED, esp, boot)
    assert "grub.cfg" in error.detail and error.hint


def test_unmodelled_command_in_grub_cfg(tmp_path: Path) -> None:
    esp, boot = lab.boot_tree("base", tmp_path)
    cfg = boot / "grub" / "grub.cfg"
    cfg.write_text(cfg.read_text().replace("set menu_color_normal", "play 480 440 1\nset menu_color_normal"))
    snapshots = _snapshot(tmp_path / "s")
    error = _expect(Reason.UNMODELLED_CONFIG, BOOTED, esp, boot, snapshots)
    assert "'play'" in error.detail


def test_unmodelled_construct_in_grub_cfg(tmp_path: Path) -> None:
    esp, boot = lab.boot_tree("base", tmp_path)
    cfg = boot / "grub" / "grub.cfg"
    cfg.write_text(cfg.read_text() + "for x in a b; do echo $x; done\n")
    _expect(Reason.UNMODELLED_CONFIG, BOOTED, esp, boot, _snapshot(tmp_path / "s"))


def test_grub_changed_after_signing(tmp_path: Path) -> None:
    esp, boot = lab.boot_tree("base", tmp_path)
    grub = esp / "EFI" / "BOOT" / "grubx64.efi"
    grub.write_bytes(grub.read_bytes() + b"\0" * 8)  # trailing data is hashed: another GRUB for PCR 4
    error = _expect(Reason.BAD_SIGNATURE, BOOTED, esp, boot)
    assert error.detail.startswith("the next boot will refuse GRUB on the ESP: it was changed after it was signed")


def test_kernel_signed_by_another_authority(tmp_path: Path) -> None:
    esp, boot = lab.boot_tree("base", tmp_path)
    kernel = boot / "vmlinuz-6.1.0-56-amd64"
    kernel.unlink()
    shutil.copyfile(lab.binary(lab.SHIM), kernel)  # a PE signed by Microsoft's CA, not Debian's
    error = _expect(Reason.OTHER_AUTHORITY, BOOTED, esp, boot)
    assert "vmlinuz-6.1.0-56-amd64" in error.detail


def test_missing_kernel(tmp_path: Path) -> None:
    esp, boot = lab.boot_tree("kernel57", tmp_path)
    (boot / "vmlinuz-6.1.0-57-amd64").unlink()
    _expect(Reason.MISSING_FILE, BOOTED, esp, boot, _snapshot(tmp_path / "s"))


def test_unknown_event_inside_grubs_part(tmp_path: Path) -> None:
    esp, boot = lab.boot_tree("base", tmp_path)
    booted = lab.log(BOOTED)
    events = list(booted.events)
    position = next(i for i, e in enumerate(events) if (e.text() or "").startswith("grub_cmd: set timeout"))
    intruder = make_event(0, 7, EventType.EV_EFI_VARIABLE_AUTHORITY, events[position].digests, b"")
    tampered = type(booted)(booted.digest_sizes, (*events[:position], intruder, *events[position:]))
    with pytest.raises(Unpredictable) as raised:
        predict.next_boot(tampered, lab.files(booted, esp, boot))
    assert raised.value.reason is Reason.UNKNOWN_EVENT


def test_emulation_mismatch_is_refused(tmp_path: Path) -> None:
    """A booted log whose GRUB events the emulation cannot reproduce (here: one command string altered)."""
    esp, boot = lab.boot_tree("base", tmp_path)
    booted = lab.log(BOOTED)
    events = list(booted.events)
    position = next(i for i, e in enumerate(events) if e.text() == "grub_cmd: set timeout=5")
    old = events[position]
    events[position] = make_event(old.index, 8, old.type, old.digests, b"grub_cmd: set timeout=6\0")
    tampered = type(booted)(booted.digest_sizes, tuple(events))
    with pytest.raises(Unpredictable) as raised:
        predict.next_boot(tampered, lab.files(booted, esp, boot))
    assert raised.value.reason is Reason.EMULATION_MISMATCH
