"""The one way luks-tpm binds a C library: exact soname, one table of signatures, errno as exceptions.

A `CLibrary` is loaded on first use (so a command that never needs it works without it) and resolves
each function once, from its table. Failures become `CLibraryError` (or the subclass the binding
names), carrying the function and the errno, never the arguments: those may be key material.
"""

from __future__ import annotations

import ctypes
import enum
import os
from collections.abc import Callable
from errno import EIO
from typing import Any

from .errors import Cause, ExitCode, LuksTpmError

Signatures = dict[str, tuple[Any, list[Any]]]  # name -> (restype, argtypes)


class CLibraryError(OSError):
    """A C call failed: `.errno` says why, `.function` which call."""

    def __init__(self, errno: int, function: str) -> None:
        super().__init__(errno, os.strerror(errno))
        self.function = function

    def __str__(self) -> str:
        return f"{self.function}: {self.strerror}"


class Convention(enum.Enum):
    NEGATIVE_ERRNO = "negative"  # returns -errno (libcryptsetup)
    MINUS_ONE = "minus-one"  # returns -1 and sets errno (libc, libkeyutils)
    ONE_IS_SUCCESS = "one"  # returns 1 on success, anything else on failure, no errno (libcrypto)
    ZERO_IS_SUCCESS = "zero"  # returns 0 on success, else a library-specific code, no errno (the TSS)


# Every library luks-tpm binds, by soname: what the initramfs hooks must copy besides what the Python
# modules link (hooks/initramfs/luks-tpm-files loads them all and reads /proc/self/maps).
SONAMES: list[str] = []


class CLibrary:
    def __init__(
        self,
        soname: str,
        signatures: Signatures,
        *,
        convention: Convention,
        error: type[CLibraryError] = CLibraryError,
        install_hint: str | None = None,
    ) -> None:
        self.soname = soname
        SONAMES.append(soname)
        self._signatures = signatures
        self._convention = convention
        self._error = error
        self._install_hint = install_hint  # what to install when the library is missing: a user error then
        self._library: ctypes.CDLL | None = None
        self._functions: dict[str, Callable[..., Any]] = {}

    def library(self) -> ctypes.CDLL:
        if self._library is None:
            try:
                self._library = ctypes.CDLL(self.soname, use_errno=True)
            except OSError as error:
                if self._install_hint is None:
                    raise error
                raise LuksTpmError(
                    f"cannot load {self.soname}",
                    hint=self._install_hint,
                    code=ExitCode.UNSUPPORTED,
                    cause=Cause.UNSUPPORTED,
                ) from None
        return self._library

    def has(self, name: str) -> bool:
        return hasattr(self.library(), name)

    def function(self, name: str) -> Callable[..., Any]:
        """The C function `name` as declared in the table; ENOSYS when this library lacks it."""
        function = self._functions.get(name)
        if function is None:
            restype, argtypes = self._signatures[name]
            try:
                function = getattr(self.library(), name)
            except AttributeError:
                raise self._error(38, name) from None  # ENOSYS
            function.restype, function.argtypes = restype, argtypes
            self._functions[name] = function
        return function

    def call(self, name: str, *args: Any) -> int:
        """Call an int-returning function; its failure is raised with the errno."""
        ctypes.set_errno(0)
        result: int = self.function(name)(*args)
        if self._convention is Convention.NEGATIVE_ERRNO and result < 0:
            raise self._error(-result, name)
        if self._convention is Convention.MINUS_ONE and result == -1:
            raise self._error(ctypes.get_errno(), name)
        if self._convention is Convention.ONE_IS_SUCCESS and result != 1:
            raise self._error(EIO, name)  # the reason is on libcrypto's error queue, not in errno
        if self._convention is Convention.ZERO_IS_SUCCESS and result != 0:
            raise self._error(EIO, name)
        return result
