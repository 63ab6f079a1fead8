"""What luks-tpm costs on swtpm, with and without a discrete-TPM latency model (run by scripts/benchmark).

Not a test: timing belongs here. Every operation is one whole `luks-tpm load-key` process started through
the venv's launcher, as a boot or a user runs it. For each one this reports the TPM commands it sends and
the TPM time they would take on a discrete TPM under the model of ../shared/bench/tpm-latency-proxy.py
(dtpm-model-v1: an assumption, good for ratios, not a measurement of a chip), and the median wall time
straight to swtpm and through the model. Also: provisioning times, the process floor (`luks-tpm
--version`: Python and the CLI, no TPM) and where a load-key process spends its import time.

The proxy is a TCP proxy, so the benchmark's swtpm listens on TCP (luks-tpm's TCTI `swtpm:host=,port=`).
Keys go to a throw-away session keyring; swtpm and the volumes live in .work/bench, recreated each run.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import keyutils
from .fixtures_luks import TEST_PASSPHRASE, make_luks_image, sparse_file
from .fixtures_tpm import Swtpm
from .helpers import REPO

PROXY_SCRIPT = REPO.parent / "shared" / "bench" / "tpm-latency-proxy.py"
FAST_PBKDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
# Import-time buckets: a module is charged to the nearest package in its import chain that is one of
# these (standard modules count for whoever imported them first); what the interpreter loads before or
# through site.py is charged to "start-up" and "site".
PACKAGES = ("luks_tpm", "click", "tpm2_pytss", "cryptography")


def free_port_pair() -> int:
    """A port P with P and P+1 free on 127.0.0.1 (swtpm and the proxy both use a data and a control port)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free TCP ports on 127.0.0.1")


def median_ms(seconds: Sequence[float]) -> float:
    return round(1000 * statistics.median(seconds), 1)


class Launcher:
    """Runs the luks-tpm command as users do: the venv's console script, a process of its own each time."""

    def __init__(self) -> None:
        script = Path(sys.executable).parent / "luks-tpm"
        self.command = [str(script)] if script.exists() else [sys.executable, "-m", "luks_tpm"]
        self.environment = {k: v for k, v in os.environ.items() if k not in {"LUKS_TPM_TCTI", "TPM2TOOLS_TCTI"}}

    def run(
        self, tcti: str | None, *args: object, extra_environment: dict[str, str] | None = None
    ) -> tuple[float, str]:
        """(wall seconds, stderr) of one run; a failure stops the benchmark with luks-tpm's own message."""
        command = self.command + (["--tcti", tcti] if tcti else []) + [str(a) for a in args]
        start = time.perf_counter()
        result = subprocess.run(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            env={**self.environment, **(extra_environment or {})},
        )
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {result.returncode}\n{result.stderr}")
        return elapsed, result.stderr

    def time(self, tcti: str | None, *args: object) -> float:
        return self.run(tcti, *args)[0]


@dataclasses.dataclass(frozen=True)
class Command:
    """One TPM command as the proxy logged it."""

    name: str  # e.g. "StartAuthSession(salted)", "CreatePrimary(KEYEDHASH)"
    modeled_ms: float
    rc: int


class LatencyProxy:
    """tpm-latency-proxy.py in front of a TCP swtpm; its log says which commands passed and their modeled time."""

    def __init__(self, script: Path, upstream: int, work: Path) -> None:
        self.script = script
        self.upstream = upstream
        self.port = free_port_pair()
        self.log = work / "tpm-latency-proxy.log"
        self.errors = work / "tpm-latency-proxy.err"
        self.process: subprocess.Popen[bytes] | None = None
        self.model = subprocess.run(
            [sys.executable, str(script), "--describe"], capture_output=True, text=True, check=True
        ).stdout.strip()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> None:
        self.log.touch()
        with open(self.errors, "wb") as errors:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(self.script),
                    "--listen",
                    str(self.port),
                    "--upstream",
                    str(self.upstream),
                    "--profile",
                    "dtpm",
                    "--log",
                    str(self.log),
                ],
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
        deadline = time.monotonic() + 10
        while True:  # the proxy opens its TPM port last: once that accepts, both do
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the latency proxy did not start; see {self.errors}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def __enter__(self) -> LatencyProxy:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def mark(self) -> int:
        return self.log.stat().st_size

    def commands_since(self, mark: int) -> list[Command]:
        """The commands logged after `mark`. The proxy logs a command just after passing its response on, so
        the client may be gone before the last line is written: wait until the log stops growing."""
        size = -1
        while size != self.log.stat().st_size:
            size = self.log.stat().st_size
            time.sleep(0.05)
        with open(self.log, "rb") as log:
            log.seek(mark)
            lines = log.read().decode("ascii", "replace").splitlines()
        commands = []
        for line in lines:
            fields = line.split()
            if len(fields) >= 4 and fields[3].startswith("rc="):
                commands.append(Command(fields[1], float(fields[2]), int(fields[3][3:], 16)))
        return commands


@dataclasses.dataclass(frozen=True)
class Operation:
    key: str
    label: str
    args: tuple[str, ...]


class Bench:
    def __init__(self, work: Path, launcher: Launcher, swtpm: Swtpm) -> None:
        self.work = work
        self.launcher = launcher
        self.swtpm = swtpm
        self.passphrase = work / "passphrase"
        self.passphrase.write_bytes(TEST_PASSPHRASE)
        self.provisioning: dict[str, float] = {}

    def _timed(self, key: str, *args: object) -> None:
        self.provisioning[key] = round(1000 * self.launcher.time(self.swtpm.tcti, *args), 1)

    def formatted(self, name: str, *extra: str, key: str | None = None) -> Path:
        path = sparse_file(self.work / f"{name}.img")
        args = ["format", path, "--passphrase-file", self.passphrase, *FAST_PBKDF, *extra]
        if key:
            self._timed(key, *args)
        else:
            self.launcher.time(self.swtpm.tcti, *args)
        return path

    def enrolled(self, name: str, *mode: str, key: str | None = None) -> Path:
        image = make_luks_image(self.work / f"{name}.img", uuid=str(uuid.uuid4()))
        image.volume_key.close()
        image.passphrase.close()
        args = ["enroll", image.path, *mode, "--unlock-key-file", self.passphrase]
        if key:
            self._timed(key, *args)
        else:
            self.launcher.time(self.swtpm.tcti, *args)
        return image.path

    def volumes(self, count: int) -> list[Operation]:
        # First, before anything stores the SRK: a token made with a transient SRK, as older versions made.
        old = self.formatted("derived-transient", "--transient-srk")
        derived = self.formatted("derived", key="format_ms")  # stores the SRK at 0x81000001
        wrapped = self.enrolled("wrapped", "--mode", "derived", key="enroll_derived_ms")
        sealed = self.enrolled("sealed", "--mode", "sealed", "--pcrs", "7", key="enroll_sealed_ms")
        many_sealed = [self.enrolled(f"sealed-{i}", "--mode", "sealed", "--pcrs", "7") for i in range(count)]
        many_derived = [self.formatted(f"derived-{i}") for i in range(count)]
        # what an installer sees: the default argon2id recovery keyslot, benchmarked by libcryptsetup
        self._timed(
            "format_argon2id_ms",
            "format",
            sparse_file(self.work / "argon2id.img"),
            "--passphrase-file",
            self.passphrase,
        )

        def load(*paths: Path) -> tuple[str, ...]:
            return ("load-key", *map(str, paths))

        return [
            Operation("derived", "load-key, derived", load(derived)),
            Operation("derived_wrapped", "load-key, derived (wrapped key, enroll)", load(wrapped)),
            Operation("sealed", "load-key, sealed PCR 7", load(sealed)),
            Operation("derived_transient_srk", "load-key, derived, transient-SRK token", load(old)),
            Operation("sealed_many", f"load-key of {count} sealed PCR 7 volumes", load(*many_sealed)),
            Operation("derived_many", f"load-key of {count} derived volumes", load(*many_derived)),
            Operation("floor", "luks-tpm --version (no TPM)", ("--version",)),
        ]


def timings(
    launcher: Launcher, operations: Sequence[Operation], lanes: dict[str, str], runs: int
) -> dict[tuple[str, str], list[float]]:
    """Wall seconds per (lane, operation). Runs go round-robin over every combination, in alternating order,
    after one untimed warm-up round, so that noise on this shared machine hits every column alike."""
    combinations = [(lane, operation) for lane in lanes for operation in operations]
    times: dict[tuple[str, str], list[float]] = {(lane, op.key): [] for lane, op in combinations}
    for round_number in range(runs + 1):
        order = combinations if round_number % 2 == 0 else combinations[::-1]
        for lane, operation in order:
            tcti = None if operation.key == "floor" else lanes[lane]
            elapsed = launcher.time(tcti, *operation.args)
            if round_number:
                times[lane, operation.key].append(elapsed)
    return times


# ---- import time ----------------------------------------------------------------------------------------


def parse_import_profile(text: str) -> dict[str, int]:
    """Microseconds of import time per bucket (see PACKAGES), from `-X importtime` output; "total" is the sum.

    Each line is `import time: SELF | CUMULATIVE | <2 spaces per nesting level>NAME`, a module after the
    modules it imported (children first), so a module's parent is the next line at a lower level."""
    rows: list[tuple[int, str, int]] = []  # (depth, module, self microseconds)
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _cumulative, name_field = line[len("import time:") :].split("|", 2)
        depth = (len(name_field) - len(name_field.lstrip(" ")) - 1) // 2
        rows.append((depth, name_field.strip(), int(own)))
    buckets: dict[str, int] = {"total": 0}
    ancestors: list[tuple[int, str | None]] = []  # (depth, bucket) of the chain that imported this line
    for depth, name, microseconds in reversed(rows):  # reversed: every module before what it imported
        while ancestors and ancestors[-1][0] >= depth:
            ancestors.pop()
        bucket = ancestors[-1][1] if ancestors else None
        if name.partition(".")[0] in PACKAGES:
            bucket = name.partition(".")[0]
        elif depth == 0 and name == "site":
            bucket = "site"
        ancestors.append((depth, bucket))
        buckets[bucket or "start-up"] = buckets.get(bucket or "start-up", 0) + microseconds
        buckets["total"] += microseconds
    return buckets


def import_profile(launcher: Launcher, tcti: str, args: Sequence[str], runs: int) -> dict[str, dict[str, float]]:
    """Import time of a whole luks-tpm process per bucket, min and median over `runs` runs, in ms."""
    profiles = [
        parse_import_profile(launcher.run(tcti, *args, extra_environment={"PYTHONPROFILEIMPORTTIME": "1"})[1])
        for _ in range(runs)
    ]
    names = sorted({name for profile in profiles for name in profile}, key=lambda n: (n == "total", n))
    return {
        name: {
            "min": round(min(p.get(name, 0) for p in profiles) / 1000, 1),
            "median": round(statistics.median(p.get(name, 0) for p in profiles) / 1000, 1),
        }
        for name in names
    }


# ---- the run ------------------------------------------------------------------------------------------


def compile_package() -> None:
    """Byte-compile luks_tpm as an installation has it: with PYTHONDONTWRITEBYTECODE set, an editable install
    would compile every module from source in every timed run."""
    compileall.compile_dir(str(REPO / "luks_tpm"), quiet=1)


@contextlib.contextmanager
def model(work: Path, swtpm: Swtpm, script: Path | None) -> Iterator[LatencyProxy | None]:
    if script is None:
        yield None
        return
    assert swtpm.port is not None, "the proxy speaks TCP"
    with LatencyProxy(script, swtpm.port, work) as proxy:
        yield proxy


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = (REPO / ".work" / "bench").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    compile_package()
    keyutils.join_session_keyring()  # the children inherit it; it goes away with us
    launcher = Launcher()
    candidate = Path(args.proxy) if args.proxy else PROXY_SCRIPT
    script = candidate if candidate.is_file() else None
    if script is None:
        print(
            f"scripts/benchmark: no {candidate}: running without the latency model, so without TPM command "
            "counts and modeled TPM time",
            file=sys.stderr,
        )
    results: dict[str, Any] = {
        "runs": args.runs,
        "volumes": args.volumes,
        "launcher": launcher.command,
        "model": None,
        "operations": {},
    }
    swtpm = Swtpm(work / "tpm", port=free_port_pair())
    swtpm.start()
    try:
        bench = Bench(work, launcher, swtpm)
        operations = bench.volumes(args.volumes)
        with model(work, swtpm, script) as proxy:
            lanes = {"swtpm": swtpm.tcti}
            if proxy is not None:
                lanes["dtpm"] = proxy.tcti
                results["model"] = proxy.model
            for operation in operations:
                row: dict[str, Any] = {"label": operation.label, "commands": None, "modeled_tpm_ms": None}
                if proxy is not None and operation.key != "floor":
                    mark = proxy.mark()
                    launcher.time(proxy.tcti, *operation.args)
                    commands = proxy.commands_since(mark)
                    row["commands"] = [command.name for command in commands]
                    row["modeled_tpm_ms"] = round(sum(command.modeled_ms for command in commands), 1)
                    row["error_responses"] = sum(command.rc != 0 for command in commands)
                results["operations"][operation.key] = row
            for (lane, key), seconds in timings(launcher, operations, lanes, args.runs).items():
                results["operations"][key][f"{lane}_ms"] = median_ms(seconds)
        results["imports"] = import_profile(launcher, swtpm.tcti, operations[0].args, args.import_runs)
        results["provisioning"] = bench.provisioning
    finally:
        swtpm.stop()
    return results


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def report(results: dict[str, Any]) -> None:
    print(
        f"luks-tpm on swtpm: median wall time of the whole process ({' '.join(results['launcher'])}), "
        f"{results['runs']} runs per cell"
    )
    print(f"TPM latency model: {results['model'] or 'none (no tpm-latency-proxy.py)'}")
    print("modeled TPM ms: the time the commands would take on a discrete TPM under that model (an assumption)\n")
    print(f"{'operation':46}{'TPM cmds':>9}{'modeled TPM ms':>16}{'ms, swtpm':>11}{'ms, model':>11}")
    for row in results["operations"].values():
        count = None if row["commands"] is None else len(row["commands"])
        print(
            f"{row['label']:46}{_cell(count):>9}{_cell(row['modeled_tpm_ms']):>16}{_cell(row.get('swtpm_ms')):>11}"
            f"{_cell(row.get('dtpm_ms')):>11}"
        )
    print("\nTPM commands:")
    for row in results["operations"].values():
        if row["commands"]:
            errors = f" ({row['error_responses']} error responses)" if row.get("error_responses") else ""
            print(f"  {row['label']}{errors}:\n    {', '.join(row['commands'])}")
    print("\nprovisioning (straight to swtpm, one run each, ms):")
    for key, label in (
        ("format_ms", "format, pbkdf2-1000 recovery keyslot"),
        ("format_argon2id_ms", "format, default argon2id recovery keyslot"),
        ("enroll_derived_ms", "enroll --mode derived"),
        ("enroll_sealed_ms", "enroll --mode sealed --pcrs 7"),
    ):
        print(f"  {label:46}{results['provisioning'][key]:>9}")
    imports = results["imports"]
    print(
        f"\nimport time of one derived load-key process (ms; PYTHONPROFILEIMPORTTIME, min and median of "
        f"{results['import_runs']} runs; each module charged to the first of {', '.join(PACKAGES)} that imports "
        "it, start-up: the interpreter's own):"
    )
    for name, value in imports.items():
        print(f"  {name:16}{value['min']:>8}{value['median']:>8}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per cell (median; default 10)")
    parser.add_argument("--volumes", type=int, default=8, help="volumes for the one-process rows (default 8)")
    parser.add_argument("--import-runs", type=int, default=10, help="runs of the import profile (default 10)")
    parser.add_argument("--proxy", help=f"the latency proxy (default {PROXY_SCRIPT})")
    args = parser.parse_args(argv)
    results = run(args)
    results["import_runs"] = args.import_runs
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)


if __name__ == "__main__":
    main()
