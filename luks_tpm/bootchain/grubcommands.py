"""Pure pieces of GRUB 2.06's commands the emulation needs: `test`/`[`, the grubenv block, `search`
options, menu entry options. No file access here: the interpreter (grubemu) supplies it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from .errors import Reason, Unpredictable

ENVBLOCK_HEADER = "# GRUB Environment Block\n"
_ENTRY_OPTIONS_WITH_VALUE = {"--class", "--users", "--hotkey", "--id", "--source"}
_ENTRY_FLAGS = {"--unrestricted"}
_BINARY = {"=", "==", "!=", "<", "<=", ">", ">=", "-eq", "-ne", "-lt", "-le", "-gt", "-ge"}
_UNARY = {"-d", "-e", "-f", "-s", "-n", "-z"}


def parse_envblock(data: bytes) -> dict[str, str]:
    """Variables of a grubenv file (GRUB's own format: header, name=value lines, '#' padding)."""
    text = data.decode("utf-8", "surrogateescape")
    if not text.startswith(ENVBLOCK_HEADER):
        raise Unpredictable(Reason.UNMODELLED_CONFIG, "grubenv is not a GRUB environment block")
    variables = {}
    for line in text[len(ENVBLOCK_HEADER) :].split("\n"):
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, raw = line.split("=", 1)
        value, i = "", 0
        while i < len(raw):
            if raw[i] == "\\" and i + 1 < len(raw):
                value += {"n": "\n"}.get(raw[i + 1], raw[i + 1])
                i += 2
            else:
                value += raw[i]
                i += 1
        variables[name] = value
    return variables


@dataclasses.dataclass(frozen=True)
class EntryArgs:
    positional: tuple[str, ...]  # the title first: what `setparams` gets
    entry_id: str | None


def entry_args(argv: Sequence[str]) -> EntryArgs:
    positional, entry_id, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg in _ENTRY_OPTIONS_WITH_VALUE and i + 1 < len(argv):
            entry_id = argv[i + 1] if arg == "--id" else entry_id
            i += 2
            continue
        if arg.startswith("--") and "=" in arg and arg.split("=", 1)[0] in _ENTRY_OPTIONS_WITH_VALUE:
            entry_id = arg.split("=", 1)[1] if arg.startswith("--id=") else entry_id
        elif arg not in _ENTRY_FLAGS:
            positional.append(arg)
        i += 1
    if not positional:
        raise Unpredictable(Reason.UNMODELLED_CONFIG, "menu entry without a title")
    return EntryArgs(tuple(positional), entry_id)


@dataclasses.dataclass(frozen=True)
class Search:
    key: str
    variable: str
    hints: tuple[str, ...]


def parse_search(argv: Sequence[str]) -> Search:
    """`search --fs-uuid [--set[=VAR]] [--hint...] UUID` and `search.fs_uuid UUID [VAR [HINT...]]`."""
    command, args = argv[0], list(argv[1:])
    if command == "search.fs_uuid":
        if not args:
            raise Unpredictable(Reason.UNMODELLED_CONFIG, "search.fs_uuid without a UUID")
        return Search(args[0], args[1] if len(args) > 1 else "root", tuple(args[2:]))
    if command != "search":
        raise Unpredictable(Reason.UNMODELLED_CONFIG, f"{command} (only searches by fs UUID are modelled)")
    variable, hints, keys, by_uuid = None, [], [], False
    for arg in args:
        if arg in ("--fs-uuid", "-u"):
            by_uuid = True
        elif arg in {"--set", "-s"}:
            variable = "root"
        elif arg.startswith("--set="):
            variable = arg.split("=", 1)[1]
        elif arg.startswith("--hint"):
            hints.append(arg.split("=", 1)[1] if "=" in arg else "")
        elif arg in ("--no-floppy", "-n"):
            pass
        elif arg.startswith("-"):
            raise Unpredictable(Reason.UNMODELLED_CONFIG, f"search option {arg}")
        else:
            keys.append(arg)
    if not by_uuid or len(keys) != 1:
        raise Unpredictable(Reason.UNMODELLED_CONFIG, "search other than one --fs-uuid")
    if variable is None:
        raise Unpredictable(Reason.UNMODELLED_CONFIG, "search without --set (only prints)")
    return Search(keys[0], variable, tuple(hints))


def _compare(left: str, op: str, right: str) -> bool:
    if op in ("=", "=="):
        return left == right
    if op == "!=":
        return left != right
    if op in ("<", "<=", ">", ">="):
        return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]
    try:
        a, b = int(left), int(right)
    except ValueError:
        a, b = 0, 0  # GRUB's strtol: non-numbers count as 0
    return {"-eq": a == b, "-ne": a != b, "-lt": a < b, "-le": a <= b, "-gt": a > b, "-ge": a >= b}[op]


def evaluate_test(args: Sequence[str], unary_file: Callable[[str, str], bool]) -> bool:
    """GRUB's `test`: left to right, `!` inverts the next primary, -a binds tighter than -o, no short
    circuit (every file primary is evaluated, as GRUB does: `-s` opens, and so measures, its file)."""
    result, _ = _evaluate(list(args), 0, unary_file)
    return result


def _evaluate(args: list[str], i: int, unary_file: Callable[[str, str], bool]) -> tuple[bool, int]:
    state_and, state_or, invert = True, False, False

    def update(value: bool) -> None:
        nonlocal state_and, invert
        state_and = state_and and (value != invert)
        invert = False

    while i < len(args):
        arg = args[i]
        if arg == ")":
            return state_or or state_and, i + 1
        if arg == "(":
            value, i = _evaluate(args, i + 1, unary_file)
            update(value)
        elif i + 2 < len(args) + 0 and args[i + 1] in _BINARY:
            update(_compare(arg, args[i + 1], args[i + 2]))
            i += 3
        elif arg in _UNARY and i + 1 < len(args):
            operand = args[i + 1]
            update(len(operand) > 0 if arg == "-n" else len(operand) == 0 if arg == "-z" else unary_file(arg, operand))
            i += 2
        elif arg == "!":
            invert = not invert
            i += 1
        elif arg == "-a":
            i += 1
        elif arg == "-o":
            state_or, state_and = state_or or state_and, True
            i += 1
        else:
            update(len(arg) > 0)
            i += 1
    return state_or or state_and, i
