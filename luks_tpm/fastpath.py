"""The unlock commands' plain command lines, run without the command-line parser.

Importing click and building its command tree is a good part of an unlock's start-up (see
`scripts/benchmark`), and unlocks are what boots, fleets and key-loading scripts run most. A command line
made only of these words runs here, through the very functions the CLI calls, with the same output and
exit codes:

    [--tcti SPEC] [--json] load-key [--keyring SPEC] DEVICE...
    [--tcti SPEC] [--json] open DEVICE NAME
    [--tcti SPEC] [--json] open --all [--crypttab FILE]
    [--tcti SPEC] [--json] fence

in any order click would accept them (options before or after the command name, `--opt=value` or
`--opt value`). Any other word (another option, -h, -v, a repeated option, a word starting with a dash),
and values click's types would refuse (a crypttab that is not a readable file, a keyring that does not
parse), send the whole line to cli.py, which words its errors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .output import Report
from .settings import Activation, tcti_from_environment

# command -> (options taking a value, flags), beside the global --tcti and --json
_GRAMMAR: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "load-key": (frozenset({"--keyring"}), frozenset()),
    "open": (frozenset({"--crypttab"}), frozenset({"--all"})),
    "fence": (frozenset(), frozenset()),
}


@dataclasses.dataclass(frozen=True)
class FastCommand:
    run: Callable[[], Report]
    json: bool


@dataclasses.dataclass
class _Words:
    command: str | None = None
    values: dict[str, str] = dataclasses.field(default_factory=dict)
    flags: set[str] = dataclasses.field(default_factory=set)
    operands: list[str] = dataclasses.field(default_factory=list)


def fast_command(args: list[str]) -> FastCommand | None:
    """The command `args` asks for when it is one of the lines above, else None (for click)."""
    words = _split(args)
    if words is None or words.command is None:
        return None
    tcti = tcti_from_environment(words.values.pop("--tcti", None), dict(os.environ))
    as_json = "--json" in words.flags
    words.flags.discard("--json")
    run = _COMMANDS[words.command](tcti, words)
    return None if run is None else FastCommand(run, as_json)


def _split(args: list[str]) -> _Words | None:
    words = _Words()
    remaining: Iterator[str] = iter(args)
    for word in remaining:
        values, flags = _GRAMMAR.get(words.command or "", (frozenset(), frozenset()))
        name, equals, value = word.partition("=")
        if name == "--tcti" or name in values:
            if not equals:
                value = next(remaining, "")
            if name in words.values or not value:
                return None
            words.values[name] = value
        elif word == "--json" or word in flags:
            words.flags.add(word)
        elif not word or word.startswith("-"):
            return None
        elif words.command is None:
            if word not in _GRAMMAR:
                return None
            words.command = word
        else:
            words.operands.append(word)
    return words


def _load_key(tcti: str, words: _Words) -> Callable[[], Report] | None:
    from . import keyring

    if not words.operands:
        return None
    try:
        target = keyring.load_key_target(words.values.get("--keyring", "@s"))
    except (ValueError, keyring.KeyringError):
        return None
    devices = [Path(operand) for operand in words.operands]

    def run() -> Report:
        from .activate import load_keys
        from .prompt import pin_source

        return load_keys(tcti, devices, target, None, False, None, pin_source(None))

    return run


def _open(tcti: str, words: _Words) -> Callable[[], Report] | None:
    if words.flags == {"--all"} and not words.operands:
        crypttab = words.values.get("--crypttab", "/etc/crypttab")
        return (lambda: _open_all(tcti, Path(crypttab))) if _readable_file(crypttab) else None
    if words.flags or words.values or len(words.operands) != 2:
        return None
    device, name = Path(words.operands[0]), words.operands[1]

    def run() -> Report:
        from .activate import open_volume
        from .prompt import pin_source

        return open_volume(tcti, device, name, Activation(), None, pin_source(None))

    return run


def _open_all(tcti: str, crypttab: Path) -> Report:
    from . import crypttab as tab
    from .activate import open_all
    from .prompt import pin_source

    return open_all(tcti, tab.read(crypttab), pin_source(None))


def _readable_file(path: str) -> bool:
    """What click's `--crypttab` type accepts (exists, not a directory, readable)."""
    return os.path.exists(path) and not os.path.isdir(path) and os.access(path, os.R_OK)


def _fence(tcti: str, words: _Words) -> Callable[[], Report] | None:
    if words.flags or words.values or words.operands:
        return None

    def run() -> Report:
        from .activate import raise_fence

        return raise_fence(tcti)

    return run


_COMMANDS: dict[str, Callable[[str, _Words], Callable[[], Report] | None]] = {
    "load-key": _load_key,
    "open": _open,
    "fence": _fence,
}
