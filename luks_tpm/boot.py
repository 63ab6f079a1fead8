"""The boot scripts' two command lines, run without the command-line parser.

At boot hooks/functions.sh runs exactly `luks-tpm --tcti TCTI open --all --crypttab FILE` (the unlock
pass) and `luks-tpm --tcti TCTI fence`, and nothing else. Importing click and building the command tree
is a good part of each run's start-up (see `scripts/benchmark`), paid on every boot, twice. These two
argv shapes, word for word, are run here through the very functions the CLI calls, with the same output
and exit codes; any other argv, and these with a crypttab that is not a readable file, go through
cli.py, which also words their errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .output import Report
from .settings import tcti_from_environment


def boot_command(args: list[str]) -> Callable[[], Report] | None:
    """The command `args` asks for when it is one of the boot scripts' shapes, else None."""
    if len(args) < 3 or args[0] != "--tcti":
        return None
    tcti, rest = tcti_from_environment(args[1], dict(os.environ)), args[2:]
    if rest == ["fence"]:
        return lambda: _fence(tcti)
    if len(rest) == 4 and rest[:3] == ["open", "--all", "--crypttab"] and _readable_file(rest[3]):
        crypttab = Path(rest[3])
        return lambda: _open_all(tcti, crypttab)
    return None


def _readable_file(path: str) -> bool:
    """What click's `--crypttab` type accepts (exists, not a directory, readable)."""
    return os.path.exists(path) and not os.path.isdir(path) and os.access(path, os.R_OK)


def _fence(tcti: str) -> Report:
    from .activate import raise_fence

    return raise_fence(tcti)


def _open_all(tcti: str, crypttab: Path) -> Report:
    from . import crypttab as tab
    from .activate import open_all
    from .prompt import pin_source

    return open_all(tcti, tab.read(crypttab), pin_source(None))
