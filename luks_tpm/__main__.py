"""luks-tpm's entry point: the fixed lines of its own scripts without click (fixed_lines.py), everything
else through the command line (cli); either way through the one boundary (boundary.py)."""

from __future__ import annotations

import gc
import sys
from typing import NoReturn

from .boundary import Console, Plain, exit_now, run


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    # Start-up makes thousands of objects that live as long as the process, and an unlock frees few: the
    # cyclic collector would only walk them, several times per start-up.
    gc.disable()
    from .fixed_lines import boot_line, request_key_line

    request = request_key_line(args)
    if request is not None:  # a kernel upcall: answered through the keyring and syslog
        from .requestkey import Request, handle

        tcti, key, key_type, description, callout, session = request
        exit_now(handle(Request(tcti, key, key_type, description, callout, session)))
    from .secret import make_undumpable

    # Every command may hold key material: no core dumps, no ptrace by unprivileged processes.
    make_undumpable()
    work = boot_line(args)
    if work is not None:
        from .output import configure_logging

        configure_logging(0)
        exit_now(run(work, Console(Plain())))
    gc.enable()  # other commands may run long
    from .cli import Globals
    from .cli import run as run_command_line

    options = Globals()
    exit_now(run(lambda: run_command_line(args, options), Console(options)))


if __name__ == "__main__":
    main()
