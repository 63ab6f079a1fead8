"""The command lines luks-tpm's own scripts run, matched whole and run without the command-line parser.

    --tcti SPEC open --all --crypttab FILE    hooks/functions.sh: the boot's unlock pass
    --tcti SPEC fence                         hooks/functions.sh: the fence
    --tcti SPEC request-key KEY TYPE DESCRIPTION CALLOUT SESSION
                                              etc/request-key.d/luks-tpm.conf (also without --tcti,
                                              as older confs wrote it)

The project writes these lines itself, and they run on every boot and every key upcall, where importing
click and building its command tree would be a good part of the time. Exactly these shapes are matched,
word for word, and they call the very functions the commands call; any other line, however close, goes to
the command line (luks_tpm.cli), the one grammar.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .output import Report
from .settings import tcti_from_environment

Work = Callable[[], Report]


def _open_all(tcti: str, crypttab: str) -> Work:
    def work() -> Report:
        from . import crypttab as tab
        from .bootpass import open_all
        from .prompt import pin_source

        return open_all(tcti, tab.read(Path(crypttab)), pin_source(None))

    return work


def _fence(tcti: str) -> Work:
    def work() -> Report:
        from .fence import raise_fence

        return raise_fence(tcti)

    return work


def boot_line(args: list[str]) -> Work | None:
    """The work of a boot script's line, or None when `args` is not one."""
    match args:
        case ["--tcti", tcti, "open", "--all", "--crypttab", crypttab] if tcti and crypttab:
            return _open_all(tcti, crypttab)
        case ["--tcti", tcti, "fence"] if tcti:
            return _fence(tcti)
    return None


def request_key_line(args: list[str]) -> list[str] | None:
    """[tcti, key, type, description, callout, session] of request-key.conf's line, or None."""
    match args:
        case ["--tcti", tcti, "request-key", key, key_type, description, callout, session] if tcti:
            return [tcti, key, key_type, description, callout, session]
        case ["request-key", key, key_type, description, callout, session]:
            return [tcti_from_environment(None, dict(os.environ)), key, key_type, description, callout, session]
    return None
