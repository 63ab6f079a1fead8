"""Fixtures: keyring.

`private_session_keyring` runs a test inside a fresh anonymous session keyring, so tests never touch
the user's own keyrings. Kernel facts this relies on (checked by tests/test_keyring.py):

- Keyrings hang off a *thread's* credentials. Joining a session keyring changes it for the calling
  thread and for threads it starts afterwards; threads that already run keep their old one. Pytest
  runs fixtures and the test in the same thread, so the test sees the private keyring; code that does
  keyring calls in a thread pool created before the test would not.
- There is no way back to the previous session keyring (no "join by serial"), so teardown joins yet
  another fresh anonymous one. The abandoned keyring loses its last reference and the kernel
  garbage-collects it with everything only it links.
- Keys are revoked *before* leaving: with possessor-only permissions, a key becomes untouchable (even
  for root) as soon as it is no longer reachable from our keyrings.
- The thread and process keyrings live as long as the pytest process: keys a test leaves there
  (libcryptsetup puts volume keys in the thread keyring) are revoked and unlinked too.
  Tests must not add keys to @u or @us: those are the real user's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from luks_tpm import keyring

from . import keyutils


def _contents(ring: int) -> set[int]:
    """Keys linked in a keyring, or nothing when it does not exist (yet) or cannot be read."""
    try:
        return set(keyutils.keyring_contents(ring))
    except keyring.KeyringError:
        return set()


def _revoke_and_unlink(serials: set[int], ring: int) -> None:
    for serial in serials:
        # Best effort: the test may have revoked or unlinked it already, or dropped SETATTR.
        with contextlib.suppress(keyring.KeyringError):
            keyutils.revoke(serial)
        with contextlib.suppress(keyring.KeyringError):
            keyring.unlink(serial, ring)


@pytest.fixture
def private_session_keyring() -> Iterator[int]:
    """The serial of a new anonymous session keyring the test runs in (`keyring.SESSION` resolves to it)."""
    long_lived = (keyring.THREAD, keyring.PROCESS)
    before = {ring: _contents(ring) for ring in long_lived}
    session = keyutils.join_session_keyring()
    try:
        yield session
    finally:
        current = keyring.keyring_id(keyring.SESSION)
        for ring in {session, current}:  # the test may have joined another one itself
            _revoke_and_unlink(_contents(ring), ring)
        for ring in long_lived:
            _revoke_and_unlink(_contents(ring) - before[ring], ring)
        keyutils.join_session_keyring()
