"""Running the real luks-tpm command line in a separate process, as users and scripts do."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def imported_modules(*args: str) -> tuple[int, set[str], str]:
    """(exit code, modules imported, stderr) of `python -m luks_tpm ARGS`, read from the interpreter's
    import log: the unlock commands end with os._exit, so nothing can be asked of them at exit."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "luks_tpm", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    return result.returncode, set(re.findall(r"\|\s+(\S+)$", result.stderr, re.MULTILINE)), result.stderr


def luks_tpm(
    *args: str | os.PathLike[str],
    tcti: str | None,
    expect: int | tuple[int, ...] | None = 0,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = 300,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m luks_tpm ARGS`; fail the test, showing stderr, if the exit code is not `expect`
    (one of them, for a tuple; None: any exit code, the caller looks at it)."""
    environment = {k: v for k, v in os.environ.items() if k not in {"LUKS_TPM_TCTI", "TPM2TOOLS_TCTI"}}
    environment.update(env or {})
    command = [sys.executable, "-m", "luks_tpm"] + (["--tcti", tcti] if tcti else []) + [str(a) for a in args]
    result = subprocess.run(
        command,
        input=stdin.decode("latin-1") if stdin is not None else None,
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        check=False,
        timeout=timeout,
    )
    assert expect is None or result.returncode in (expect if isinstance(expect, tuple) else (expect,)), (
        f"luks-tpm {' '.join(map(str, args))}: exit {result.returncode}, expected {expect}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result


def luks_tpm_json(*args: str | os.PathLike[str], tcti: str | None, expect: int | tuple[int, ...] = 0) -> Any:
    """`luks-tpm --json COMMAND ...`: its output, which must validate against docs/json-schema.json (the
    command's definition, or the error's when it printed one), so every test that reads JSON checks it."""
    from .json_schema import validate

    data = json.loads(luks_tpm("--json", *args, tcti=tcti, expect=expect).stdout)
    validate("error" if "error" in data else str(args[0]), data)
    return data


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A user error: one message line (plus an optional hint line), no traceback, naming the problem."""
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.startswith("luks-tpm: ")
        and not line.startswith("luks-tpm: hint:")
        and not line.startswith("luks-tpm: luks_tpm.")
    ]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one error line, got: {result.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def format_command(path: Path, passphrase: Path) -> list[str | Path]:
    """`format` with a recovery passphrase keyslot and a PBKDF cheap enough for tests."""
    return ["format", path, "--passphrase-file", passphrase, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


def format_derived(path: Path, tcti: str, passphrase: Path) -> dict[str, Any]:
    """A new volume with a TPM-derived key and a recovery passphrase keyslot (fast PBKDF for tests)."""
    with open(path, "wb") as image:
        image.truncate(32 << 20)
    result: dict[str, Any] = luks_tpm_json(*format_command(path, passphrase), tcti=tcti)
    return result
