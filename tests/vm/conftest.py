"""Fixtures for the VM tests; the machinery is in machine.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .machine import VmRunner, requirements_or_skip


def _selected(session: pytest.Session, param: str) -> set[object]:
    """The values of the parameter PARAM of the selected tests: the boots (vm_case) and journeys
    (vm_journey) they read, all started at the beginning of the session."""
    wanted = set()
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if callspec and param in callspec.params:
            value = callspec.params[param]
            wanted.add(tuple(value) if isinstance(value, list | tuple) else value)
    return wanted


@pytest.fixture(scope="session")
def vm(request: pytest.FixtureRequest) -> Iterator[VmRunner]:
    requirements_or_skip()
    boots = {case for case in _selected(request.session, "vm_case") if isinstance(case, tuple)}
    journeys = frozenset(name for name in _selected(request.session, "vm_journey") if isinstance(name, str))
    runner = VmRunner(boots, journeys)
    runner.start()
    yield runner
    runner.pool.shutdown(wait=True, cancel_futures=True)
