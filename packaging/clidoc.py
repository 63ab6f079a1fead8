"""The man page and the bash completion of luks-tpm, generated from its click definitions.

    python3 packaging/clidoc.py [--path DIR] man TEMPLATE [--version VERSION] > luks-tpm.8
    python3 packaging/clidoc.py [--path DIR] bash-completion > luks-tpm

Why generated: the command line changes, and a hand-kept list of commands and options drifts from
`--help` within weeks. So the lists come from the same click objects `--help` is made of (the same help
records, word for word); the prose around them (description, exit codes, files, security notes) is
hand-written in TEMPLATE, which names the generated parts with @SYNOPSIS@, @GLOBAL_OPTIONS@ and
@COMMANDS@ lines. --path puts DIR first on sys.path (packaging/build-deb points it at the runtime it is
about to package, so the documentation describes exactly the code that ships).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

PROG = "luks-tpm"


@dataclasses.dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]  # every spelling: -v, --verbose
    record: tuple[str, str]  # what --help prints: ("--pcrs TEXT", "PCRs to bind ... [default: ...]")
    value: str  # "" (a flag), "none" (a value we cannot guess), "file", or "choice"
    choices: tuple[str, ...] = ()
    is_help: bool = False


@dataclasses.dataclass(frozen=True)
class Argument:
    metavar: str  # DEVICE
    kind: str  # "device" (a path argument: a block device or an image file) or "none"
    repeated: bool


@dataclasses.dataclass(frozen=True)
class Command:
    name: str  # "" for the top level
    usage: tuple[str, ...]  # ("[OPTIONS]", "DEVICE")
    help: str
    options: tuple[Option, ...]
    arguments: tuple[Argument, ...]


def _click() -> Any:
    import click

    return click


def _option(param: Any, ctx: Any) -> Option | None:
    click = _click()
    record = param.get_help_record(ctx)
    if record is None:  # hidden
        return None
    flags = tuple(param.opts) + tuple(param.secondary_opts)
    if param.is_flag or param.count:
        return Option(flags, record, "", is_help=set(flags) <= set(ctx.help_option_names))
    if isinstance(param.type, click.Choice):
        return Option(flags, record, "choice", tuple(str(c) for c in param.type.choices))
    if isinstance(param.type, click.Path | click.File):
        return Option(flags, record, "file")
    return Option(flags, record, "none")


def _command(command: Any, ctx: Any, name: str) -> Command:
    click = _click()
    options: list[Option] = []
    arguments: list[Argument] = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            option = _option(param, ctx)
            if option is not None:
                options.append(option)
        elif isinstance(param, click.Argument):
            kind = "device" if isinstance(param.type, click.Path) else "none"
            arguments.append(Argument(param.make_metavar(ctx), kind, param.nargs != 1))
    text = inspect.cleandoc(command.help or "").split("\f", 1)[0]
    return Command(name, tuple(command.collect_usage_pieces(ctx)), text, tuple(options), tuple(arguments))


def model(path: str | None = None) -> tuple[Command, list[Command]]:
    """The top level (global options) and every visible command, in --help order."""
    if path:
        sys.path.insert(0, path)
    click = _click()
    from luks_tpm import cli

    group = cli.main
    top_ctx = click.Context(group, info_name=PROG, **group.context_settings)
    top = _command(group, top_ctx, "")
    commands = []
    for name in group.list_commands(top_ctx):
        command = group.get_command(top_ctx, name)
        if command is None or command.hidden:
            continue
        commands.append(_command(command, click.Context(command, info_name=name, parent=top_ctx), name))
    return top, commands


# --- man page ------------------------------------------------------------------------------------------


def roff(text: str) -> str:
    """Text for a roff text line: backslashes and minus signs escaped, no line starting with a control."""
    escaped = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", escaped, flags=re.MULTILINE)


def _paragraphs(text: str) -> list[str]:
    """click's help text as roff paragraphs: blank lines separate them, \\b keeps a paragraph's lines."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if block.startswith("\b"):
            lines = block[1:].strip("\n").splitlines()
            out.append(".nf\n" + "\n".join(roff(line.strip()) for line in lines) + "\n.fi")
        elif block.strip():
            out.append(roff(" ".join(line.strip() for line in block.splitlines())))
    return out


def _usage_piece(piece: str) -> str:
    bracketed = re.fullmatch(r"\[(.*)\](\.\.\.)?", piece)
    if bracketed:
        return f"[\\fI{roff(bracketed[1])}\\fR]{roff(bracketed[2] or '')}"
    return f"\\fI{roff(piece)}\\fR"


def _synopsis_line(command: Command) -> str:
    pieces = " ".join(_usage_piece(p) for p in command.usage)
    return f"\\fB{roff(PROG)}\\fR [\\fIGLOBAL OPTIONS\\fR] \\fB{roff(command.name)}\\fR {pieces}"


def _option_items(options: tuple[Option, ...]) -> list[str]:
    items = []
    for option in options:
        spelled, help_text = option.record
        # "-v, --verbose" in bold, the value's metavar ("SPEC", "[256|512]") in italics
        words = []
        for word in re.split(r"( |, | / )", spelled):
            if word.startswith("-"):
                words.append(f"\\fB{roff(word)}\\fR")
            elif word.strip(" ,/"):
                words.append(f"\\fI{roff(word)}\\fR")
            else:
                words.append(roff(word))
        items.append(".TP\n" + "".join(words) + "\n" + (roff(help_text) if help_text else "\\&"))
    return items


def manpage(template: str, version: str | None, date: str, path: str | None = None) -> str:
    top, commands = model(path)
    if not version:
        import luks_tpm

        version = luks_tpm.__version__
    parts = {
        "@SYNOPSIS@": "\n.br\n".join(_synopsis_line(c) for c in commands),
        "@GLOBAL_OPTIONS@": "\n".join(_option_items(top.options)),
        "@COMMANDS@": "\n".join(
            f'.SS "{roff(c.name)} {" ".join(roff(p) for p in c.usage)}"\n'
            + "\n.PP\n".join(_paragraphs(c.help))
            + "".join("\n" + item for item in _option_items(tuple(o for o in c.options if not o.is_help)))
            for c in commands
        ),
    }
    lines = []
    for line in template.replace("@VERSION@", version).replace("@DATE@", date).splitlines():
        lines.append(parts.get(line.strip(), line))
    return "\n".join(lines) + "\n"


# --- bash completion -----------------------------------------------------------------------------------

COMPLETION_BODY = r"""
# LUKS block devices (from lsblk, which reads the udev database: no root needed), then any file name:
# image files and /dev/disk/by-* paths are devices too.
_luks_tpm_devices() {
    local cur=$1 dev fstype
    while read -r dev fstype; do
        [[ $fstype == crypto_LUKS && $dev == "$cur"* ]] && COMPREPLY+=("$dev")
    done < <(lsblk -rnpo NAME,FSTYPE 2>/dev/null)
    _luks_tpm_files "$cur"
}

_luks_tpm_files() {
    compopt -o filenames 2>/dev/null
    local file
    while IFS= read -r file; do COMPREPLY+=("$file"); done < <(compgen -f -- "$1")
}

_luks_tpm() {
    COMPREPLY=()
    local cur=${COMP_WORDS[COMP_CWORD]}
    # The words up to the cursor, split at blanks only: COMP_WORDS also splits at = and :, which
    # TCTI strings (swtpm:path=...) and --pcr-value INDEX=HEX are full of.
    local line=${COMP_LINE:0:COMP_POINT} words
    read -r -a words <<<"$line"
    [[ -z $line || $line == *[[:space:]] ]] && words+=("")
    local n=${#words[@]} i word command="" position=0 value=""
    for ((i = 1; i < n - 1; i++)); do
        word=${words[i]}
        case $word in
        --*=*) ;;
        -?*)
            value=$(_luks_tpm_value "$command" "$word")
            if [[ -n $value ]]; then
                ((i == n - 2)) && break  # the cursor is on this option's value
                value=""
                ((i++))
            fi
            ;;
        *) if [[ -z $command ]]; then command=$word; else ((position++)); fi ;;
        esac
    done
    case $value in
    choice:*) mapfile -t COMPREPLY < <(compgen -W "${value#choice:}" -- "$cur"); return ;;
    file) _luks_tpm_files "$cur"; return ;;
    none) return ;;
    esac
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$(_luks_tpm_options "$command")" -- "$cur")
    elif [[ -z $command ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$_luks_tpm_commands" -- "$cur")
    else
        case $(_luks_tpm_argument "$command" "$position") in
        device) _luks_tpm_devices "$cur" ;;
        esac
    fi
}

complete -F _luks_tpm luks-tpm
"""


def _case(arms: list[tuple[str, str]], indent: str = "    ") -> str:
    lines = [f"{indent}case $1:$2 in"]
    lines += [f"{indent}{pattern}) echo {shlex.quote(answer)} ;;" for pattern, answer in arms]
    return "\n".join([*lines, f"{indent}esac"])


def completion(path: str | None = None) -> str:
    top, commands = model(path)
    out = [
        "# bash completion for luks-tpm(8): commands, options, option values and device arguments.",
        "# Generated from luks-tpm's command-line definitions by packaging/clidoc.py: do not edit.",
        "# shellcheck shell=bash",
        f"_luks_tpm_commands={shlex.quote(' '.join(c.name for c in commands))}",
        "",
        '# _luks_tpm_options COMMAND: its options ("" = the global ones)',
        "_luks_tpm_options() {",
        "    case $1 in",
    ]
    for command in [top, *commands]:
        flags = " ".join(flag for option in command.options for flag in option.flags)
        pattern = shlex.quote(command.name) if command.name else '""'
        out.append(f"    {pattern}) echo {shlex.quote(flags)} ;;")
    out += [
        "    esac",
        "}",
        "",
        "# _luks_tpm_value COMMAND OPTION: what the option takes (choice:..., file, none), empty for a flag",
        "_luks_tpm_value() {",
    ]
    arms = []
    for command in [top, *commands]:
        for option in command.options:
            answer = f"choice:{' '.join(option.choices)}" if option.value == "choice" else option.value
            if answer:
                arms += [(shlex.quote(f"{command.name}:{flag}"), answer) for flag in option.flags]
    out += [
        _case(arms),
        "}",
        "",
        "# _luks_tpm_argument COMMAND N: the kind of its Nth positional argument (device, none)",
        "_luks_tpm_argument() {",
    ]
    arms = []
    for command in commands:
        for index, argument in enumerate(command.arguments):
            pattern = f"{index}" if not argument.repeated else "*"
            arms.append((f"{shlex.quote(command.name)}:{pattern}", argument.kind))
    out += [_case(arms), "}"]
    return "\n".join(out) + "\n" + COMPLETION_BODY


def _date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch else datetime.datetime.now(datetime.UTC)
    return moment.strftime("%Y-%m-%d")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", help="put this directory first on sys.path (the runtime to document)")
    sub = parser.add_subparsers(dest="what", required=True)
    man = sub.add_parser("man")
    man.add_argument("template", type=Path)
    man.add_argument("--version", default="")
    sub.add_parser("bash-completion")
    args = parser.parse_args(argv)
    if args.what == "man":
        sys.stdout.write(manpage(args.template.read_text(), args.version, _date(), args.path))
    else:
        sys.stdout.write(completion(args.path))


if __name__ == "__main__":
    main()
