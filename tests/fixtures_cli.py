"""Fixtures: the luks-tpm command line run fast enough to enumerate inputs (see tests/forked_cli.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .forked_cli import ForkedCli


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkedCli]:
    runner = ForkedCli(tmp_path_factory.mktemp("cli"))
    yield runner
    runner.close()
