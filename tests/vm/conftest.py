"""Fixtures for the VM tests; the machinery is in machine.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .machine import VmRunner, requirements_or_skip


def _selected_boots(session: pytest.Session) -> set[tuple[str, str]]:
    wanted = set()
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if callspec and "vm_case" in callspec.params:
            wanted.add(tuple(callspec.params["vm_case"]))
    return wanted


@pytest.fixture(scope="session")
def vm(request: pytest.FixtureRequest) -> Iterator[VmRunner]:
    requirements_or_skip()
    runner = VmRunner(_selected_boots(request.session))
    runner.start()
    yield runner
    runner.pool.shutdown(wait=True, cancel_futures=True)
