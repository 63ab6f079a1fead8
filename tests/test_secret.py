"""luks_tpm.secret: zeroing, locking, undumpable, checked on the real process memory."""

from __future__ import annotations

import ctypes
import gc
import mmap
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from luks_tpm.secret import Secret, zero

PATTERN = bytes(range(1, 65))  # 64 bytes, none of them zero
PAGE = mmap.PAGESIZE
REPO = Path(__file__).resolve().parent.parent


def locked_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


def filled_secret() -> tuple[Secret, memoryview, int]:
    """A secret holding PATTERN, a view that keeps its buffer alive (and in place) after close, its address.

    Holding the view is what makes reading the old address sound: the bytearray cannot be freed or
    resized while the view exists, so the memory checked is the memory the secret used.
    """
    secret = Secret.copy_of(bytearray(PATTERN))
    keep = secret.view()
    address = secret.address
    assert ctypes.addressof(ctypes.c_char.from_buffer(keep)) == address
    assert ctypes.string_at(address, len(PATTERN)) == PATTERN  # the check below can fail
    return secret, keep, address


def test_close_zeroes_the_memory() -> None:
    secret, keep, address = filled_secret()
    secret.close()
    assert ctypes.string_at(address, len(PATTERN)) == bytes(len(PATTERN))
    assert keep.tobytes() == bytes(len(PATTERN))
    assert secret.closed and len(secret) == 0
    secret.close()  # idempotent


def test_leaving_a_with_block_zeroes_the_memory_even_on_error() -> None:
    secret, _keep, address = filled_secret()
    with secret:
        assert not secret.closed
    assert ctypes.string_at(address, len(PATTERN)) == bytes(len(PATTERN))

    other, _keep2, other_address = filled_secret()
    with pytest.raises(RuntimeError), other:
        raise RuntimeError("boom")
    assert ctypes.string_at(other_address, len(PATTERN)) == bytes(len(PATTERN))


def test_collection_zeroes_the_memory() -> None:
    secret, _keep, address = filled_secret()
    del secret
    gc.collect()
    assert ctypes.string_at(address, len(PATTERN)) == bytes(len(PATTERN))


def test_copy_of_can_wipe_the_source() -> None:
    for source in (
        bytearray(PATTERN),
        memoryview(bytearray(PATTERN)),
        (ctypes.c_char * 64).from_buffer_copy(PATTERN),
    ):
        with Secret.copy_of(source, zero_source=True) as secret:
            assert secret.view().tobytes() == PATTERN
        assert bytes(memoryview(source)) == bytes(64)

    kept = bytearray(PATTERN)
    with Secret.copy_of(kept) as secret:
        assert secret.view().tobytes() == PATTERN
    assert kept == PATTERN  # only when asked


def test_copy_of_refuses_to_leave_an_unwipeable_source_behind() -> None:
    with pytest.raises(TypeError, match="read-only"):
        Secret.copy_of(PATTERN, zero_source=True)


def test_wipe_refuses_read_only_buffers() -> None:
    underlying = bytearray(PATTERN)
    with pytest.raises(TypeError, match="read-only"):
        zero(memoryview(underlying).toreadonly())
    assert underlying == PATTERN
    with pytest.raises(TypeError, match="read-only"):
        zero(memoryview(PATTERN))


def test_wipe_zeroes_exactly_the_buffer_given() -> None:
    data = bytearray(PATTERN)
    zero(memoryview(data)[8:16])
    assert data == PATTERN[:8] + bytes(8) + PATTERN[16:]
    zero(bytearray())  # nothing to do, no error


def test_memory_is_locked_while_a_secret_lives() -> None:
    gc.collect()
    before = locked_kib()
    secret = Secret(3 * PAGE)
    assert locked_kib() - before >= PAGE // 1024
    secret.close()
    assert locked_kib() == before


def test_closing_one_secret_keeps_a_page_shared_with_a_live_one_locked() -> None:
    secrets = [Secret(64) for _ in range(64)]
    first_page = {s: s.address // PAGE for s in secrets if s.address // PAGE == (s.address + 63) // PAGE}
    by_page: dict[int, list[Secret]] = {}
    for secret, page in first_page.items():
        by_page.setdefault(page, []).append(secret)
    shared = next((group for group in by_page.values() if len(group) >= 2), None)
    if shared is None:
        pytest.skip("the allocator put no two 64-byte secrets on one page")
    before = locked_kib()
    shared[0].close()
    assert locked_kib() == before  # munlock would have unlocked the other secret's page
    for secret in secrets:
        secret.close()
    assert locked_kib() < before


def test_a_refused_size_leaves_no_broken_object_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(ValueError, match="at least one byte"):
        Secret(0)
    gc.collect()
    assert unraisable == []


def test_repr_and_equality_do_not_show_the_bytes() -> None:
    with Secret.copy_of(bytearray(PATTERN)) as one, Secret.copy_of(bytearray(PATTERN)) as two:
        assert repr(one) == "<Secret 64 bytes>"
        assert one.equals(two)
        two.view()[0] ^= 1
        assert not one.equals(two)


UNDUMPABLE_SCRIPT = """
import ctypes
from luks_tpm.secret import make_undumpable
libc = ctypes.CDLL("libc.so.6", use_errno=True)
PR_GET_DUMPABLE = 3
before = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
make_undumpable()
print(before, libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
"""


def test_make_undumpable_in_a_child_process() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", UNDUMPABLE_SCRIPT],
        env={"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert completed.stdout.split() == ["1", "0"]
