"""An emulation of Debian GRUB 2.06-13's script execution and TPM measurements (PCRs 8, 9 and, through
shim_lock, 4), from the ESP stub grub.cfg to the boot of the default entry.

What GRUB 2.06-13 measures, as found by booting it (OVMF + shim 16.1 + Secure Boot, see the report):
- every simple command GRUB executes, after expansion: the arguments joined by one space (empty quoted
  arguments kept: `[ "" ]` is `[  ]`), PCR 8, event text `grub_cmd: ...`; this includes assignments
  (`font=unicode`), function calls (`load_video`), `setparams` of the entry booted (and of a submenu
  entered), and `menuentry`/`submenu` registrations as `menuentry ARGS {RAW BODY}`; not `if`/`function`
  themselves;
- `linux`: the kernel file (PCR 9), its Authenticode hash twice (PCR 4, shim_lock), then
  `kernel_cmdline: PATH ARGS` (PCR 8);
- file contents (PCR 9, named as opened): configfile/source targets, `load_env`'s grubenv, the file of
  `[ -s FILE ]`, each initrd. Not measured: `[ -e/-f/-d ]`, `save_env`, `loadfont`'s font.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from . import grubcommands, grubscript
from .bootfiles import BootFiles
from .errors import Reason, Unpredictable
from .grubscript import Command, Entry, Function, If, Node, PartKind, Word

# Variables GRUB 2.06 (x86_64-efi) sets before it reads any config; all exported.
FEATURES = [
    "feature_chainloader_bpb",
    "feature_ntldr",
    "feature_platform_search_hint",
    "feature_default_font_path",
    "feature_all_video_module",
    "feature_menuentry_id",
    "feature_menuentry_options",
    "feature_200_final",
    "feature_nativedisk_cmd",
    "feature_timeout_style",
]
_QUIET_COMMANDS = {"echo", "terminal_output", "terminal_input", "true"}


class Kind(enum.Enum):
    COMMAND = "grub_cmd"  # PCR 8
    KERNEL_CMDLINE = "kernel_cmdline"  # PCR 8
    FILE = "file"  # PCR 9: a file's contents
    IMAGE = "image"  # PCR 4: a kernel's Authenticode hash (shim_lock)


@dataclasses.dataclass(frozen=True)
class Measurement:
    kind: Kind
    text: str  # the command string, or the file name as GRUB opened it
    path: Path | None = None  # FILE/IMAGE: where the file is in the BootFiles view


# (name as GRUB opened it, host path, whether its contents are needed) -> the contents, or b"" when
# not needed; raises Unpredictable when the file cannot be had. The prediction reads the disk; the
# validation over the booted boot answers from the log and the snapshots.
Reader = Callable[[str, Path, bool], bytes]


class Booted(Exception):
    """The default entry loaded a kernel: GRUB boots it, nothing more is measured."""


@dataclasses.dataclass
class _Context:
    variables: dict[str, str]
    exported: set[str]
    menu: list[tuple[Entry, list[str]]]


class Emulator:
    """Runs GRUB scripts against a `BootFiles` view, collecting the measurements in order."""

    def __init__(
        self,
        files: BootFiles,
        reader: Reader,
        modules: frozenset[str] | None,
        esp_device: str,
        commands: Mapping[str, Callable[[Emulator, list[str]], int]],
    ) -> None:
        self.files = files
        self.commands = commands  # grubbuiltins.COMMANDS
        self.reader = reader
        self.modules = modules
        self.measurements: list[Measurement] = []
        initial = {name: "y" for name in FEATURES}
        initial.update(grub_platform="efi", grub_cpu="x86_64", root=esp_device)
        self.contexts = [_Context(initial, set(initial), [])]
        self.functions: dict[str, Function] = {}
        self.params: list[list[str]] = [[]]
        self.kernel_loaded = False

    # -- variables -------------------------------------------------------------------------------
    @property
    def context(self) -> _Context:
        return self.contexts[-1]

    def get(self, name: str) -> str:
        if name.isdigit():
            params = self.params[-1]
            return params[int(name) - 1] if 0 < int(name) <= len(params) else ""
        if name == "#":
            return str(len(self.params[-1]))
        return self.context.variables.get(name, "")

    def set(self, name: str, value: str) -> None:
        self.context.variables[name] = value
        if name in ("lang", "locale_dir"):
            self._check_gettext()

    def open_context(self) -> None:
        old = self.context
        self.contexts.append(
            _Context({n: old.variables[n] for n in old.exported if n in old.variables}, set(old.exported), [])
        )

    def _check_gettext(self) -> None:
        lang = self.get("lang")
        if not lang or lang == "C":
            return
        directories = [d for d in (self.get("locale_dir"), self.get("prefix") + "/locale") if d]
        for directory in directories:
            for name in {lang, lang.split("_", 1)[0]}:
                for suffix in (".mo", ".mo.gz"):
                    if self.files.locate(f"{directory}/{name}{suffix}", self.get("root")).exists():
                        raise Unpredictable(
                            Reason.UNMODELLED_CONFIG, f"GRUB would read the gettext catalog {directory}/{name}{suffix}"
                        )

    # -- expansion -------------------------------------------------------------------------------
    def expand(self, words: Sequence[Word]) -> list[str]:
        argv: list[str] = []
        for word in words:
            fields: list[str] = [""]
            keep = False  # a quoted part makes an argument even when empty
            for part in word:
                if part.kind is PartKind.VARIABLE:
                    value = self.get(part.text).split()
                    if value:
                        fields[-1] += value[0]
                        fields.extend(value[1:])
                        keep = True
                elif part.kind is PartKind.QUOTED_VARIABLE:
                    fields[-1] += self.get(part.text)
                    keep = True
                else:
                    fields[-1] += part.text
                    keep = True
            if keep:
                argv.extend(fields)
        return argv

    def measure(self, kind: Kind, text: str, path: Path | None = None) -> None:
        self.measurements.append(Measurement(kind, text, path))

    def read(self, name: str, contents: bool) -> bytes:
        """Open a file as GRUB does: measured into PCR 9 under the name it was opened by."""
        path = self.files.locate(name, self.get("root"))
        data = self.reader(name, path, contents)
        self.measure(Kind.FILE, name, path)
        return data

    # -- execution -------------------------------------------------------------------------------
    def run(self, nodes: Sequence[Node]) -> int:
        status = 0
        for node in nodes:
            status = self.statement(node)
        return status

    def statement(self, node: Node) -> int:
        if isinstance(node, Command):
            return self.command(self.expand(node.words))
        if isinstance(node, If):
            for condition, body in node.branches:
                if self.run(condition) == 0:
                    return self.run(body)
            return self.run(node.otherwise)
        if isinstance(node, Function):
            self.functions[node.name] = node
            return 0
        return self.register(node)

    def register(self, entry: Entry) -> int:
        argv = self.expand(entry.words)
        self.measure(Kind.COMMAND, " ".join([entry.keyword, *argv]) + " {" + entry.source + "}")
        self.context.menu.append((entry, argv))
        return 0

    def command(self, argv: list[str]) -> int:
        if not argv:
            return 0
        self.measure(Kind.COMMAND, " ".join(argv))
        handler = self.commands.get(argv[0])
        if handler is not None:
            status = handler(self, argv)
        elif argv[0] in self.functions:
            self.params.append(argv[1:])
            try:
                status = self.run(self.functions[argv[0]].body)
            finally:
                self.params.pop()
        elif "=" in argv[0] and len(argv) == 1 and argv[0].split("=", 1)[0].isidentifier():
            name, value = argv[0].split("=", 1)
            self.set(name, value)
            status = 0
        else:
            raise Unpredictable(Reason.UNMODELLED_CONFIG, f"GRUB command {argv[0]!r} is not modelled")
        self.context.variables["?"] = str(status)
        return status

    def config(self, name: str, new_context: bool) -> None:
        """`source` (same context) or `configfile` (new context and menu, then the menu runs)."""
        text = self.read(name, contents=True).decode("utf-8", "surrogateescape")
        nodes = grubscript.parse(text)
        if new_context:
            self.open_context()
        directory = name.rsplit("/", 1)[0]
        self.set("config_directory", directory)
        self.set("config_file", name)
        self.context.exported.update(("config_directory", "config_file"))
        self.run(nodes)
        if new_context:
            self.boot_default()

    # -- the menu --------------------------------------------------------------------------------
    def boot_default(self) -> None:
        """GRUB's menu after a configfile: boot the default entry (timeouts do not change what runs)."""
        if not self.context.menu:
            raise Unpredictable(Reason.UNMODELLED_CONFIG, "a configfile defines no menu entry")
        default = self.get("default") or "0"
        head, _, rest = default.partition(">")
        entry, argv = self._find_entry(head)
        args = grubcommands.entry_args(argv)
        self.set("chosen", args.positional[0])
        self.open_context()
        if entry.keyword == "submenu":
            self.context.variables["default"] = rest
        self.params.append(list(args.positional))
        self.measure(Kind.COMMAND, " ".join(["setparams", *args.positional]))
        self.run(grubscript.parse(entry.source))
        if entry.keyword == "submenu":
            self.boot_default()
        if not self.kernel_loaded:
            raise Unpredictable(Reason.UNMODELLED_CONFIG, f"the default entry {args.positional[0]!r} loads no kernel")
        raise Booted

    def _find_entry(self, key: str) -> tuple[Entry, list[str]]:
        menu = self.context.menu
        if key.isdigit():
            if int(key) < len(menu):
                return menu[int(key)]
            raise Unpredictable(Reason.UNMODELLED_CONFIG, f"default entry {key} does not exist")
        for entry, argv in menu:
            args = grubcommands.entry_args(argv)
            if key in (args.entry_id, args.positional[0]):
                return entry, argv
        raise Unpredictable(Reason.UNMODELLED_CONFIG, f"default entry {key!r} is not in the menu")
