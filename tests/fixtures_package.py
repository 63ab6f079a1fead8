"""Fixtures: the Debian package (make deb) and the right to install it on this very machine.

Tests that install luks-tpm with apt (tests/test_package.py, tests/test_ansible.py) hold one lock, so
that two test runs on one machine do not trip over each other, and skip when luks-tpm was installed by
someone else: they purge it at their end, and must not take away somebody's installation.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import REPO

LOCK = "/run/lock/luks-tpm-package-test.lock"


def needs(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the package needs {', '.join(missing)} (scripts/bootstrap installs them)")


@pytest.fixture(scope="session")
def deb() -> Path:
    """dist/luks-tpm_<version>_<arch>.deb, built now unless it is up to date (packaging/build-deb)."""
    needs("dpkg-deb", "dpkg-shlibdeps", "gcc", "pkg-config")
    build = REPO / "packaging" / "build-deb"
    result = subprocess.run([str(build)], capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return REPO / result.stdout.strip().splitlines()[-1]


def apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", package], capture_output=True, text=True, check=False
    )
    return result.returncode == 0 and "installed" in result.stdout.split()


@contextlib.contextmanager
def package_machine() -> Iterator[None]:
    """Root, apt, and no luks-tpm installed by someone else; one such test on the machine at a time."""
    if os.geteuid() != 0:
        pytest.skip("installing the package needs root")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("installing the package needs apt-get and dpkg (a Debian system)")
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed("luks-tpm"):
            pytest.skip("luks-tpm is already installed on this machine: not replacing it")
        yield


@pytest.fixture
def machine_lock() -> Iterator[None]:
    """package_machine() for one test."""
    with package_machine():
        yield


@pytest.fixture(scope="module")
def module_machine_lock() -> Iterator[None]:
    """package_machine() for every test of a module that installs the package once and purges it at its end."""
    with package_machine():
        yield
