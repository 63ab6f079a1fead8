"""The one C-binding helper: a library that is not installed is a user error naming what to install."""

from __future__ import annotations

import pytest

from luks_tpm.clib import CLibrary, Convention
from luks_tpm.errors import ExitCode, LuksTpmError

ABSENT = "libluks-tpm-test-absent.so.9"


def test_a_missing_library_says_what_to_install() -> None:
    library = CLibrary(ABSENT, {}, convention=Convention.MINUS_ONE, install_hint="install libabsent9")
    with pytest.raises(LuksTpmError) as raised:
        library.library()
    assert raised.value.message == f"cannot load {ABSENT}"
    assert raised.value.hint == "install libabsent9" and raised.value.code == ExitCode.UNSUPPORTED


def test_without_a_hint_the_loader_error_stays() -> None:
    with pytest.raises(OSError, match=ABSENT.replace(".", r"\.")):
        CLibrary(ABSENT, {}, convention=Convention.MINUS_ONE).library()
