"""The one container for key material: a fixed-size, mlock'd, zeroed-on-release buffer.

Key bytes never become `bytes` or `str` where it can be avoided: they are written into a `Secret`
(copied out of C buffers, which are then zeroed) and handed to C as a pointer into it.
Only this module calls into libc (mlock, munlock, prctl, explicit_bzero).
"""

from __future__ import annotations

import ctypes
import hmac
import mmap
import threading
from types import TracebackType
from typing import Self, TypeAlias

from .clib import CLibrary, Convention

# What key bytes may be read from or written into (Python < 3.12 has no collections.abc.Buffer).
ReadableBuffer: TypeAlias = bytes | bytearray | memoryview | ctypes.Array[ctypes.c_char]
WritableBuffer: TypeAlias = bytearray | memoryview | ctypes.Array[ctypes.c_char]

_libc = CLibrary(
    "libc.so.6",
    {
        "mlock": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]),
        "munlock": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]),
        "prctl": (ctypes.c_int, [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]),
        "explicit_bzero": (None, [ctypes.c_void_p, ctypes.c_size_t]),
    },
    convention=Convention.MINUS_ONE,
)

_PR_SET_DUMPABLE = 4

# mlock/munlock act on whole pages and do not nest, and small secrets share pages (with each other and
# with other objects): count the live secrets on each locked page, so that closing one secret never
# unlocks a page another live secret is still on.
_PAGE = mmap.PAGESIZE
_page_users: dict[int, int] = {}
_page_users_lock = threading.RLock()  # RLock: __del__ may run inside a locked section of the same thread


def _pages(address: int, size: int) -> range:
    return range(address // _PAGE, (address + size - 1) // _PAGE + 1)


def _lock_memory(address: int, size: int) -> bool:
    with _page_users_lock:
        if _libc.function("mlock")(address, size) != 0:
            return False
        for page in _pages(address, size):
            _page_users[page] = _page_users.get(page, 0) + 1
        return True


def _unlock_memory(address: int, size: int) -> None:
    with _page_users_lock:
        for page in _pages(address, size):
            _page_users[page] -= 1
            if not _page_users[page]:
                del _page_users[page]
                _libc.function("munlock")(page * _PAGE, _PAGE)


def zero(buffer: WritableBuffer) -> None:
    """Zero a writable buffer (bytearray, memoryview, ctypes array) in place, with explicit_bzero (which no
    compiler optimizes away)."""
    view = memoryview(buffer).cast("B")
    if view.readonly:
        raise TypeError("cannot zero a read-only buffer")
    if len(view):
        _libc.function("explicit_bzero")(ctypes.addressof(ctypes.c_char.from_buffer(view)), len(view))


def make_undumpable() -> None:
    """No core dumps and no ptrace by other users' processes while this process holds key material."""
    _libc.call("prctl", _PR_SET_DUMPABLE, 0, 0, 0, 0)


class Released:
    """Something that holds memory or a C object until close() releases it (idempotently): usable in `with`,
    and released when collected if nobody closed it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Secret(Released):
    """`size` bytes of locked memory. Zeroed by `close()`, by leaving a `with` block, and on collection."""

    __slots__ = ("_buffer", "_locked")

    def __init__(self, size: int) -> None:
        self._buffer = bytearray()  # set first: __del__ runs even when the size is refused
        self._locked = False
        if size <= 0:
            raise ValueError("a secret needs at least one byte")
        self._buffer = bytearray(size)
        # Best effort: RLIMIT_MEMLOCK may be tiny for unprivileged users; the key is still zeroed.
        self._locked = _lock_memory(self.address, size)

    @classmethod
    def copy_of(cls, source: ReadableBuffer, *, zero_source: bool = False) -> Secret:
        """A new secret holding the bytes of `source`; `zero_source` zeroes the (writable) source too."""
        view = memoryview(source).cast("B")
        secret = cls(len(view))
        secret._buffer[:] = view
        if zero_source:
            zero(view)
        return secret

    @property
    def address(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self._buffer))

    def as_ctypes(self) -> ctypes.Array[ctypes.c_char]:
        """A ctypes view of the same memory, to pass as `const char *` without copying."""
        return (ctypes.c_char * len(self._buffer)).from_buffer(self._buffer)

    def buffer(self) -> bytearray:
        """The secret's own bytearray, for APIs that accept nothing else (hmac.new); never copy it."""
        return self._buffer

    def view(self) -> memoryview:
        return memoryview(self._buffer)

    def __len__(self) -> int:
        return len(self._buffer)

    def equals(self, other: Secret) -> bool:
        return hmac.compare_digest(self._buffer, other._buffer)

    def close(self) -> None:
        if not self._buffer:
            return
        zero(self._buffer)
        if self._locked:
            _unlock_memory(self.address, len(self._buffer))
            self._locked = False
        self._buffer = bytearray()

    @property
    def closed(self) -> bool:
        return not self._buffer

    def __repr__(self) -> str:
        return f"<Secret {len(self._buffer)} bytes>"
