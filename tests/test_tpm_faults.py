"""Issue 21, class "TPM faults at every command index": every command line against a TPM that breaks at
its Nth command, for every N the line sends, in every way tests/tpm_faults.py knows.

Each line is first run through the fault proxy without a fault, which counts its commands; then once per
(fault, N). The faults: the connection cut, TPM_RC_FAILURE, noise instead of a response, a response that
says success and does not parse (or, where the command returns nothing, is taken as success: a TPM
lying), and silence (the TPM never answers; LUKS_TPM_TPM_TIMEOUT=1 here, tried at the first, middle and
last command of each line to keep the run short). Every outcome must be:

- an exit code the line documents for it: 4 (the TPM failed) or 0 (the line could do without the
  command: another token worked, the EK is optional, a flush that failed is retried); 5 where the line
  reports per volume (`status`, `open --all`), and, for a TPM that lies, where a policy it skipped then
  fails (`load-key`, `reseal`, `enroll`: "the policy is not satisfied");
- never 1, never a traceback, never ESYS's "called in the wrong order", and never a hang;
- its JSON valid against docs/json-schema.json; an error's cause (and each token's) one the fault
  explains: no-tpm (cut, silent: "lost the connection", "did not answer"), tpm-failed (failure code,
  noise), and for a lying TPM also policy;
- on any exit but 0, the header as it was (tokens and keyslots; `format`: the image still blank);
  on exit 0, what the line wrote works (the new token recovers the key through a clean connection);
- after a failure code (the connection survives), nothing of the line's left loaded in the TPM (issue
  21, defect 16: a failed FlushContext is tried again); after the other faults, the TPM is cleaned up
  as a resource manager would.

Lines: enroll, format, status, doctor, load-key, open --all (the documented activation seam, in a forked
child: the host has no device-mapper), reseal, remove, wipe --dry-run, persist-srk (the SRK evicted
first, so that EvictControl is among the commands), fence, srk-public, and request-key's application key through
the real kernel upcall (its outcome read from syslog). Two lanes (a swtpm and a proxy each) run at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import volumes
from .fixtures_tpm import Swtpm
from .fixtures_upcall import Refused, Upcall, received, request, take
from .forked_cli import TIMEOUT, ForkedCli
from .helpers import format_command
from .json_schema import validate
from .tpm_faults import Fault, FaultProxy

ALL_FAULTS = (Fault.CUT, Fault.FAILURE, Fault.NOISE, Fault.GARBLED)
# The causes a fault can explain (a token's failure, or the error's); "generic" is the summary of several
# tokens' failures, each of which is checked on its own.
CAUSES = {
    Fault.CUT: {"no-tpm"},
    Fault.SILENT: {"no-tpm"},
    Fault.FAILURE: {"tpm-failed"},
    Fault.NOISE: {"tpm-failed", "no-tpm"},
    Fault.GARBLED: {"tpm-failed", "no-tpm", "policy"},
}
WORDS = {
    Fault.CUT: ("lost the connection",),
    Fault.SILENT: ("did not answer", "lost the connection"),
    Fault.FAILURE: ("the TPM failed", "TPM failure"),
}


@dataclasses.dataclass(frozen=True)
class Lane:
    swtpm: Swtpm
    proxy: FaultProxy
    work: Path
    volume: Path  # keyslot 0 (passphrase), token 0 derived, token 1 sealed to PCR 7
    pristine: Path
    blank: Path
    passphrase: Path


@dataclasses.dataclass(frozen=True)
class Line:
    name: str
    argv: Callable[[Lane], list[str | Path]]
    writes: bool = False  # the line changes the volume (or the blank image)
    per_volume: bool = False  # exit 5 documents "some volume would not unlock" (status)
    unlocks: bool = False  # it satisfies policies: a TPM that skips one makes it fail with exit 5

    def allowed(self, fault: Fault) -> set[int]:
        codes = {0, 4}
        if self.per_volume or (fault is Fault.GARBLED and self.unlocks):
            codes.add(5)
        return codes


LINES = [
    Line(
        "enroll",
        lambda s: ["enroll", s.volume, "--mode", "sealed", "--pcrs", "7", "--unlock-key-file", s.passphrase],
        writes=True,
        unlocks=True,
    ),
    Line(
        "format",
        lambda s: [*format_command(s.blank, s.passphrase), "--yes"],
        writes=True,
    ),
    Line("status", lambda s: ["status", s.volume], per_volume=True, unlocks=True),
    Line("doctor", lambda s: ["doctor"]),
    Line("load-key", lambda s: ["load-key", s.volume], unlocks=True),
    Line(
        "reseal",
        lambda s: ["reseal", s.volume, "--token-id", "1", "--unlock-key-file", s.passphrase],
        writes=True,
        unlocks=True,
    ),
    Line("remove", lambda s: ["remove", s.volume, "--token-id", "0"], writes=True, unlocks=True),
    Line("wipe --dry-run", lambda s: ["wipe", "--dry-run", s.volume]),
    Line("fence", lambda s: ["fence"]),
    Line("srk-public", lambda s: ["srk-public"]),
    Line("persist-srk", lambda s: ["persist-srk"]),  # last: it evicts the SRK the others use
]


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkedCli]:
    cli = ForkedCli(tmp_path_factory.mktemp("faults-cli"), environment={"LUKS_TPM_TPM_TIMEOUT": "1"})
    yield cli
    cli.close()


@pytest.fixture(scope="module")
def lanes(tmp_path_factory: pytest.TempPathFactory, runner: ForkedCli) -> Iterator[list[Lane]]:
    with contextlib.ExitStack() as stack:
        made = []
        for number in range(2):
            work = tmp_path_factory.mktemp(f"faults-{number}")
            swtpm = Swtpm(work / "swtpm")
            swtpm.start()
            stack.callback(swtpm.stop)
            proxy = stack.enter_context(FaultProxy(swtpm.socket, work / "faulty.sock"))
            passphrase = volumes.passphrase_file(work)
            volume = volumes.luks_format(work / "volume.img", passphrase)
            runner.run("enroll", volume, "--mode", "derived", "--unlock-key-file", passphrase, tcti=swtpm.tcti)
            runner.run("enroll", volume, "--mode", "sealed", "--pcrs", "7", "--unlock-key-file", passphrase,
                       tcti=swtpm.tcti)  # fmt: skip
            pristine = volumes.copy_image(volume, work / "pristine.img")
            made.append(Lane(swtpm, proxy, work, volume, pristine, work / "blank.img", passphrase))
        yield made


def header(lane: Lane) -> Any:
    """What must not change when a line fails: the volume's keyslots and tokens, and the blank image's start."""
    with open(lane.blank, "rb") as blank:
        start = blank.read(1 << 20)
    return volumes.keyslots(lane.volume), volumes.tokens(lane.volume), start.count(0) == len(start)


def restore(lane: Lane, line: Line) -> None:
    volumes.copy_image(lane.pristine, lane.volume)
    with open(lane.blank, "wb") as blank:
        blank.truncate(32 << 20)
    if line.name == "persist-srk":  # a free handle: persisting it is among the commands
        subprocess.run(["tpm2_evictcontrol", "-T", lane.swtpm.tcti, "-C", "o", "-c", "0x81000001"],
                       capture_output=True, check=False)  # fmt: skip


def leftovers(lane: Lane) -> list[int]:
    """Transient objects and sessions still in the TPM; then they are flushed (what a resource manager does)."""
    left = lane.swtpm.loaded_handles()
    if left:
        volumes.flush_tpm(lane.swtpm.tcti)
    return left


@dataclasses.dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def causes_in(data: Any) -> list[str]:
    """Every failure cause a JSON result carries: an error's and its tokens', or each volume's tokens'."""
    if data.get("error") is not None:
        error = data["error"]
        found = [failure["cause"] for failure in error.get("failures", [])]
        return found or [error["cause"]]
    volumes_ = data.get("volumes", [])
    tokens = [token for volume in volumes_ for token in volume.get("tokens", [])]
    errors = [cause for volume in volumes_ if volume.get("error") is not None for cause in causes_in(volume)]
    return [token["cause"] for token in tokens if token.get("cause") is not None] + errors


def judge(line: Line, fault: Fault, outcome: Outcome, before: Any, after: Any) -> list[str]:
    """Why this outcome is wrong (empty: it is right)."""
    problems = []
    if outcome.code == TIMEOUT:
        return ["hung"]
    if outcome.code not in line.allowed(fault):
        problems.append(f"exit {outcome.code}")
    text = outcome.stdout + outcome.stderr
    for bad in ("Traceback", "internal error", "wrong order"):
        if bad in text:
            problems.append(f"says {bad!r}")
    try:
        data = json.loads(outcome.stdout)
    except ValueError:
        return [*problems, f"stdout is not JSON: {outcome.stdout[:200]!r}"]
    command = line.name.split()[0]
    try:
        validate("error" if "error" in data else command, data)
    except AssertionError as error:
        problems.append(str(error).splitlines()[0])
    if outcome.code != 0:
        stray = [cause for cause in causes_in(data) if cause not in CAUSES[fault] | {"generic"}]
        if stray or not causes_in(data):
            problems.append(f"causes {causes_in(data)}")
        if fault in WORDS and not any(word in text for word in WORDS[fault]):
            problems.append(f"does not say {WORDS[fault][0]!r}")
        if after != before:
            problems.append("changed the header")
    return problems


def written_works(lane: Lane, line: Line, outcome: Outcome, runner: ForkedCli) -> list[str]:
    """After exit 0 of a line that writes: what it wrote recovers the key through a clean connection."""
    if not line.writes or outcome.code != 0 or line.name == "remove":
        return []
    data = json.loads(outcome.stdout)
    image = lane.blank if line.name == "format" else lane.volume
    check = runner.run("load-key", image, "--token-id", str(data["token"]), tcti=lane.swtpm.tcti, expect=None)
    return [] if check.returncode == 0 else [f"its token {data['token']} does not work: {check.stderr[-200:]}"]


@dataclasses.dataclass(frozen=True)
class Case:
    line: Line
    fault: Fault
    index: int


def cases(line: Line, count: int) -> list[Case]:
    found = [Case(line, fault, index) for fault in ALL_FAULTS for index in range(count)]
    return found + [Case(line, Fault.SILENT, index) for index in sorted({0, count // 2, count - 1})]


def count_commands(lane: Lane, line: Line, runner: ForkedCli) -> int:
    restore(lane, line)
    lane.proxy.arm(None)
    runner.run("--json", *line.argv(lane), tcti=lane.proxy.tcti)
    assert not leftovers(lane), f"{line.name} leaves objects in the TPM even without a fault"
    return lane.proxy.count


def run_batch(batch: list[tuple[Lane, Case]], runner: ForkedCli, failures: list[str]) -> None:
    befores = []
    for lane, case in batch:
        restore(lane, case.line)
        befores.append(header(lane))
        lane.proxy.arm(case.fault, case.index)
    results = runner.run_many(
        [["--tcti", lane.proxy.tcti, "--json", *case.line.argv(lane)] for lane, case in batch],
        tcti=None,
        parallel=len(batch),
        timeout=30,
    )
    for (lane, case), before, result in zip(batch, befores, results, strict=True):
        outcome = Outcome(result.returncode, result.stdout, result.stderr)
        where = f"{case.line.name}, {case.fault} at #{case.index} ({lane.proxy.fired})"
        problems = judge(case.line, case.fault, outcome, before, header(lane))
        left = leftovers(lane)
        if left and case.fault is Fault.FAILURE:
            problems.append(f"left {[hex(h) for h in left]} loaded in the TPM")
        problems += written_works(lane, case.line, outcome, runner)
        if lane.proxy.fired is None:
            problems.append("the fault never fired")
        failures += [f"{where}: {problem}" for problem in problems]


def test_every_command_line_at_every_tpm_command(lanes: list[Lane], runner: ForkedCli) -> None:
    failures: list[str] = []
    counts = {}
    for line in LINES:
        counts[line.name] = count_commands(lanes[0], line, runner)
        todo = cases(line, counts[line.name])
        for start in range(0, len(todo), len(lanes)):
            run_batch(list(zip(lanes, todo[start : start + len(lanes)], strict=False)), runner, failures)
    for lane in lanes:  # the SRK back where the lines found it
        runner.run("persist-srk", tcti=lane.swtpm.tcti)
    tried = sum(len(cases(line, counts[line.name])) for line in LINES)
    summary = f"{tried} faulty runs over {len(LINES)} command lines ({counts}), {len(failures)} failed"
    print(summary)
    assert not failures, summary + ":\n" + "\n".join(failures)


# ---- open --all through the activation seam, in a forked child ----------------------------------------


def forked(work: Callable[[], Any], scratch: Path, timeout: float = 30) -> Outcome:
    """`work` through the one boundary with --json, as `open --all` runs it, in a child process (the
    watchdog may have to end a process: never this one)."""
    out, err = scratch / "out", scratch / "err"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            sys.stdout = open(out, "w")  # noqa: SIM115 - the child's streams until it exits
            sys.stderr = open(err, "w")  # noqa: SIM115
            from luks_tpm.boundary import Console, Plain, run

            code = run(work, Console(Plain(json=True)))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while (finished := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return Outcome(TIMEOUT, "", "")
        time.sleep(0.005)
    return Outcome(os.waitstatus_to_exitcode(finished[1]), out.read_text(), err.read_text())


class KeyChecker:
    """The documented activation seam (bootpass.Mapper): checks the key it is handed, maps nothing."""

    def open(self, device: Any, name: str, key: Any, options: Any) -> None:
        if not device.volume_key_verify(key):
            raise AssertionError(f"{name}: open --all handed over a key that does not open the volume")

    def close(self, device: Any, name: str) -> None:
        pass


def open_all_work(tcti: str, volume: Path) -> Callable[[], Any]:
    def work() -> Any:
        from luks_tpm import bootpass, crypttab
        from luks_tpm.prompt import pin_source

        entries = [crypttab.Entry("data", str(volume))]
        return bootpass.open_all(tcti, entries, pin_source(None), mapper=KeyChecker())

    return work


OPEN_ALL = Line("open --all", lambda s: [], per_volume=True, unlocks=True)


def test_open_all_at_every_tpm_command(lanes: list[Lane], tmp_path: Path) -> None:
    lane = lanes[0]
    restore(lane, OPEN_ALL)
    lane.proxy.arm(None)
    assert forked(open_all_work(lane.proxy.tcti, lane.volume), tmp_path).code == 0
    count = lane.proxy.count
    failures: list[str] = []
    with patched_timeout():
        for case in cases(OPEN_ALL, count):
            lane.proxy.arm(case.fault, case.index)
            before = header(lane)
            outcome = forked(open_all_work(lane.proxy.tcti, lane.volume), tmp_path)
            problems = judge(OPEN_ALL, case.fault, outcome, before, header(lane))
            left = leftovers(lane)
            if left and case.fault is Fault.FAILURE:
                problems.append(f"left {[hex(h) for h in left]} loaded in the TPM")
            failures += [f"open --all, {case.fault} at #{case.index} ({lane.proxy.fired}): {p}" for p in problems]
    summary = f"{len(cases(OPEN_ALL, count))} faulty runs of open --all ({count} commands), {len(failures)} failed"
    print(summary)
    assert not failures, summary + ":\n" + "\n".join(failures)


@contextlib.contextmanager
def patched_timeout() -> Iterator[None]:
    """LUKS_TPM_TPM_TIMEOUT=1 for the children forked meanwhile."""
    old = os.environ.get("LUKS_TPM_TPM_TIMEOUT")
    os.environ["LUKS_TPM_TPM_TIMEOUT"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LUKS_TPM_TPM_TIMEOUT"]
        else:
            os.environ["LUKS_TPM_TPM_TIMEOUT"] = old


# ---- request-key's application key, through the real upcall ---------------------------------------------


def test_app_key_upcall_at_every_tpm_command(
    lanes: list[Lane], upcalls: Callable[..., Upcall], syslog_socket: socket.socket
) -> None:
    """The handler negates the key and logs one line naming the TPM's failure; never a bug, never a hang
    (the requester waits for it: `keyctl request2` is bounded at 60 s by the helper)."""
    lane = lanes[0]
    upcall = upcalls(lane.proxy.tcti, "LUKS_TPM_TPM_TIMEOUT=1")
    lane.proxy.arm(None)
    take(request("user", upcall.app("count"), "32"))
    received(syslog_socket, upcall.prefix)
    count = lane.proxy.count
    failures: list[str] = []
    app_line = Line("request-key", lambda s: [])
    for number, case in enumerate(cases(app_line, count)):
        lane.proxy.arm(case.fault, case.index)
        name = upcall.app(f"n{number}")
        where = f"request-key, {case.fault} at #{case.index} ({lane.proxy.fired})"
        try:
            take(request("user", name, "32"))
            answered = True
        except (Refused, subprocess.TimeoutExpired):
            answered = False
        logged = received(syslog_socket, upcall.prefix)
        if len(logged) != 1:
            failures.append(f"{where}: {len(logged)} syslog lines: {logged}")
            continue
        line = logged[0]
        for bad in ("internal error", "wrong order", "Traceback"):
            if bad in line:
                failures.append(f"{where}: says {bad!r}: {line}")
        if not answered and not any(word in line for word in ("TPM", "negated")):
            failures.append(f"{where}: the log does not say why: {line}")
        if answered != ("instantiated" in line):
            failures.append(f"{where}: answered {answered} but logged: {line}")
        if case.fault in WORDS and not answered and not any(word in line for word in WORDS[case.fault]):
            failures.append(f"{where}: does not say {WORDS[case.fault][0]!r}: {line}")
        left = leftovers(lane)
        if left and case.fault is Fault.FAILURE:
            failures.append(f"{where}: left {[hex(h) for h in left]} loaded in the TPM")
    summary = f"{len(cases(app_line, count))} faulty upcalls ({count} commands), {len(failures)} failed"
    print(summary)
    assert not failures, summary + ":\n" + "\n".join(failures)
