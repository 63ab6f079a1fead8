"""The TCG2 event log parser and replay, on logs of real OVMF + shim + GRUB boots (tests/data/bootchain)."""

from __future__ import annotations

import pytest

from luks_tpm.bootchain import eventlog
from luks_tpm.bootchain.errors import EventLogError, ReplayMismatch

from . import bootchain_lab as lab

RUNS = ("base-r1", "base-r2", "kernel57", "initrd2", "cmdline", "timeout", "nextentry")


@pytest.mark.parametrize("run", RUNS)
def test_replay_gives_the_pcrs_the_guest_read(run: str) -> None:
    booted = lab.log(run)
    assert booted.banks == ("sha1", "sha256", "sha384", "sha512")
    eventlog.check_replay(booted, lab.pcrs(run))
    replayed = eventlog.replay(booted)
    for bank, values in lab.pcrs(run).items():
        for pcr in eventlog.PRE_OS_PCRS:
            assert replayed[bank][pcr] == values[pcr], (bank, pcr)


def test_events_are_typed() -> None:
    events = lab.log("base-r1").events
    assert events[0].type is eventlog.EventType.EV_S_CRTM_VERSION
    grub_commands = [e.text() for e in events if e.pcr == 8]
    assert "grub_cmd: set timeout=5" in grub_commands
    assert all(len(e.digests["sha384"]) == 48 for e in events)


def test_check_replay_names_every_differing_pcr() -> None:
    current = lab.pcrs("base-r1")
    current["sha256"][4] = bytes(32)
    current["sha1"][9] = bytes(20)
    with pytest.raises(ReplayMismatch) as raised:
        eventlog.check_replay(lab.log("base-r1"), current)
    assert raised.value.differing == (("sha1", 9), ("sha256", 4))
    assert "sha1:9" in str(raised.value) and "\n" not in str(raised.value)


def test_another_boots_log_does_not_reproduce_the_pcrs() -> None:
    with pytest.raises(ReplayMismatch):
        eventlog.check_replay(lab.log("base-r1"), lab.pcrs("kernel57"))


def test_every_truncation_is_refused() -> None:
    """Cut inside an event: a one-line EventLogError. Cut between events: a shorter log that parses, and
    that check_replay refuses (the lost events' PCRs differ)."""
    data = (lab.DATA / "runs" / "base-r1" / "evlog.bin").read_bytes()
    current = lab.pcrs("base-r1")
    for size in [*range(0, 200, 7), *range(200, len(data) - 1, 97), len(data) - 1]:
        try:
            shorter = eventlog.parse(data[:size])
        except EventLogError as error:
            assert "\n" not in str(error)
            continue
        assert len(shorter.events) < len(lab.log("base-r1").events)
        with pytest.raises(ReplayMismatch):
            eventlog.check_replay(shorter, current)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [(0, b"\x05", "Spec ID"), (32, b"X", "Spec ID Event03"), (56, b"\x00", "algorithms")],
)
def test_damaged_spec_id_event(offset: int, value: bytes, message: str) -> None:
    data = bytearray((lab.DATA / "runs" / "base-r1" / "evlog.bin").read_bytes())
    data[offset : offset + len(value)] = value
    with pytest.raises(EventLogError, match=message):
        eventlog.parse(bytes(data))


def test_damaged_event_digest_count() -> None:
    data = bytearray((lab.DATA / "runs" / "base-r1" / "evlog.bin").read_bytes())
    first = 32 + int.from_bytes(data[28:32], "little")  # the first crypto-agile event
    data[first + 8] = 3
    with pytest.raises(EventLogError, match="3 digests"):
        eventlog.parse(bytes(data))


def test_trailing_garbage_is_refused() -> None:
    data = (lab.DATA / "runs" / "base-r1" / "evlog.bin").read_bytes()
    with pytest.raises(EventLogError):
        eventlog.parse(data + bytes(64))
