"""The real luks-tpm command line, one process per command, without paying Python's start-up each time.

The enumerating tests (damaged tokens, bad options, crash safety) run the CLI thousands of times; at
~0.25 s of interpreter start and imports per run they would take minutes. A small server imports the
package once and forks a child per command. The child is a process of its own (its own session, no
controlling terminal, standard streams on files, stdin from a file) that calls the console entry
point `luks_tpm.__main__:main` with the argv, exactly as the installed `luks-tpm` script does, and
exits with its code. What it cannot reproduce: environment variables the package reads at import
time (e.g. TSS2_LOG) are those of the server; tests about those use `helpers.luks_tpm`.

Each command runs in a new anonymous session keyring of its own (or, when asked, in the server's
one), so logon keys that `load-key` adds land where nobody else sees them and go with the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .helpers import REPO

_SERVER = r"""
import ctypes, json, os, signal, sys, time, traceback
keyutils = ctypes.CDLL("libkeyutils.so.1", use_errno=True)
keyutils.keyctl_join_session_keyring(None)
import luks_tpm.__main__ as entry
import luks_tpm.cli, luks_tpm.activation, luks_tpm.enrollment, luks_tpm.unlock  # the imports forks share
from luks_tpm import cryptsetup
cryptsetup.has_function("crypt_init")  # dlopen once
requests = os.fdopen(3, "r")
replies = os.fdopen(4, "w")

def child(request):
    os.setsid()
    if request["own_keyring"]:
        keyutils.keyctl_join_session_keyring(None)
    stdin = os.open(request["stdin"], os.O_RDONLY)
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd, target in ((stdin, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.closerange(3, 256)
    if request.get("delay"):
        time.sleep(request["delay"])
    code = 0
    try:
        entry.main(request["args"])
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

for line in requests:
    batch = json.loads(line)
    running = {}
    results = [None] * len(batch["requests"])
    pending = list(enumerate(batch["requests"]))
    while pending or running:
        while len(running) < batch["parallel"]:
            # at most one command per lane at a time (a lane is e.g. one TPM without resource manager)
            busy = {batch["requests"][index]["lane"] for index, _ in running.values()}
            ready = [item for item in pending if item[1]["lane"] is None or item[1]["lane"] not in busy]
            if not ready:
                break
            pending.remove(ready[0])
            index, request = ready[0]
            pid = os.fork()
            if pid == 0:
                child(request)
            running[pid] = (index, time.monotonic() + request["timeout"])
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for other, (index, deadline) in list(running.items()):
                if now > deadline:
                    os.kill(other, signal.SIGKILL)
                    results[index] = "timeout"
            time.sleep(0.002)
            continue
        index, _ = running.pop(pid)
        if results[index] is None:
            results[index] = os.waitstatus_to_exitcode(status)
    replies.write(json.dumps(results) + "\n")
    replies.flush()
"""

TIMEOUT = -999  # returncode of a command that had to be killed after its timeout


class ForkedCli:
    """`run(*args)` behaves like `helpers.luks_tpm` (same result type, same `expect` check)."""

    def __init__(self, workdir: Path, environment: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> None:
        """`environment`: variables set for every command (the server's, read by the package at run time);
        `prefix`: a command the server runs under, e.g. `unshare -m` (a mount namespace of its own: `pid`
        then names the namespace, for nsenter)."""
        self.workdir = workdir
        self.count = 0
        inherited = {k: v for k, v in os.environ.items() if k not in {"LUKS_TPM_TCTI", "TPM2TOOLS_TCTI"}}
        environment = {**inherited, **(environment or {})}
        requests_read, self._requests = os.pipe()
        self._replies_fd, replies_write = os.pipe()
        self._process = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-c",
                f"import os; os.dup2({requests_read}, 3); os.dup2({replies_write}, 4); "
                f"exec(compile({_SERVER!r}, 'forked_cli_server', 'exec'))",
            ],
            cwd=REPO,
            env=environment,
            stdin=subprocess.DEVNULL,
            pass_fds=(requests_read, replies_write),
            start_new_session=True,
        )
        os.close(requests_read)
        os.close(replies_write)
        self._replies = os.fdopen(self._replies_fd, "r")

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        os.close(self._requests)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._replies.close()

    def run_many(
        self,
        commands: Sequence[Sequence[str | os.PathLike[str]]],
        *,
        tcti: str | None,
        stdin: bytes = b"",
        parallel: int = 1,
        lanes: Sequence[str] | None = None,
        delays: Sequence[float] | None = None,
        own_keyring: bool = True,
        timeout: float = 60,
    ) -> list[subprocess.CompletedProcess[str]]:
        """Run independent commands, up to `parallel` at once but never two of the same lane (e.g. two
        on one swtpm, which has no resource manager); `delays`: seconds each child waits before it runs
        (to stagger concurrent commands); `own_keyring`: each command joins a new session keyring of
        its own (False: all share the server's); results in the order given."""
        with tempfile.TemporaryDirectory(dir=self.workdir) as scratch:
            input_path = Path(scratch) / "stdin"
            input_path.write_bytes(stdin)
            requests: list[dict[str, Any]] = []
            argvs: list[list[str]] = []
            for number, args in enumerate(commands):
                argv = (["--tcti", tcti] if tcti else []) + [os.fspath(a) for a in args]
                argvs.append(argv)
                requests.append(
                    {
                        "args": argv,
                        "stdin": str(input_path),
                        "timeout": timeout,
                        "lane": lanes[number] if lanes is not None else None,
                        "delay": delays[number] if delays is not None else 0,
                        "own_keyring": own_keyring,
                        "out": f"{scratch}/{number}.out",
                        "err": f"{scratch}/{number}.err",
                    }
                )
            os.write(self._requests, (json.dumps({"requests": requests, "parallel": parallel}) + "\n").encode())
            line = self._replies.readline()
            if not line:
                raise RuntimeError(f"the luks-tpm fork server died (exit {self._process.poll()})")
            codes = json.loads(line)
            results = []
            for number, (argv, status) in enumerate(zip(argvs, codes, strict=True)):
                out = Path(f"{scratch}/{number}.out").read_bytes().decode("utf-8", "replace")
                err = Path(f"{scratch}/{number}.err").read_bytes().decode("utf-8", "replace")
                code = TIMEOUT if status == "timeout" else int(status)
                if status == "timeout":
                    err += f"\n[killed after {timeout} s: the command hung]"
                results.append(subprocess.CompletedProcess(["luks-tpm", *argv], code, out, err))
        self.count += len(results)
        return results

    def run(
        self,
        *args: str | os.PathLike[str],
        tcti: str | None,
        expect: int | None = 0,
        stdin: bytes = b"",
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        (result,) = self.run_many([args], tcti=tcti, stdin=stdin, timeout=timeout)
        if expect is not None:
            assert result.returncode == expect, (
                f"luks-tpm {' '.join(map(str, args))}: exit {result.returncode}, expected {expect}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def json(self, *args: str | os.PathLike[str], tcti: str | None, expect: int = 0) -> Any:
        return json.loads(self.run("--json", *args, tcti=tcti, expect=expect).stdout)
