"""The linters are tests: ruff, mypy (strict) and shellcheck on every shell script we ship."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO


def _shell_scripts() -> list[Path]:
    scripts = []
    for top in ("hooks", "dracut", "images", "scripts", ".ci", "packaging"):
        for path in sorted((REPO / top).rglob("*")):
            if not path.is_file():
                continue
            head = path.read_bytes()[:64]
            if path.suffix == ".sh" or head.startswith((b"#!/bin/sh", b"#!/bin/bash", b"#!/usr/bin/env bash")):
                scripts.append(path)
    return scripts


def _run(*command: str) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}{result.stderr}"


# Every Python file of the project; some have no .py name: luks-tpm-files (installed as a data file), the
# package's launcher, images/weigh.
PYTHON = (
    "luks_tpm",
    "tests",
    "images/luks-fill.py",
    "images/weigh",
    "hooks/initramfs/luks-tpm-files",
    "packaging/clidoc.py",
    "packaging/luks-tpm.launcher",
)


def test_ruff() -> None:
    _run(sys.executable, "-m", "ruff", "check", *PYTHON)


def test_ruff_format() -> None:
    _run(sys.executable, "-m", "ruff", "format", "--check", *PYTHON)


def test_mypy_strict() -> None:
    _run(sys.executable, "-m", "mypy")


def test_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/bootstrap installs it)")
    scripts = _shell_scripts()
    assert any(p.parts[-2:] == ("scripts", "bootstrap") for p in scripts), scripts
    _run("shellcheck", "-x", *map(str, scripts))


def test_modules_and_functions_stay_small() -> None:
    """One concern per module, one job per function: modules under 500 lines, functions under 60."""
    import ast

    too_big = []
    for path in sorted((REPO / "luks_tpm").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") >= 500:
            too_big.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length >= 60:
                    too_big.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not too_big, "\n".join(too_big)
