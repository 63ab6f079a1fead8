"""GRUB 2.06 commands as the emulation models them: what each reads (and so measures) and what it sets;
and `emulate`, the emulator (grubemu) running GRUB's configuration with them."""

from __future__ import annotations

from collections.abc import Callable

from . import grubcommands, grubscript
from .bootfiles import BootFiles
from .errors import Reason, Unpredictable
from .grubemu import Booted, Emulator, Kind, Measurement, Reader


def _set(emu: Emulator, argv: list[str]) -> int:
    for arg in argv[1:]:
        if "=" in arg:
            name, value = arg.split("=", 1)
            emu.set(name, value)
    return 0


def _unset(emu: Emulator, argv: list[str]) -> int:
    for name in argv[1:]:
        emu.context.variables.pop(name, None)
    return 0


def _export(emu: Emulator, argv: list[str]) -> int:
    emu.context.exported.update(argv[1:])
    return 0


def _insmod(emu: Emulator, argv: list[str]) -> int:
    for name in argv[1:]:
        if emu.modules is not None and name not in emu.modules:
            raise Unpredictable(Reason.UNMODELLED_CONFIG, f"insmod {name}: not built into the signed GRUB image")
    return 0


def _search(emu: Emulator, argv: list[str]) -> int:
    search = grubcommands.parse_search(argv)
    device = emu.files.device_for_uuid(search.key)
    if device is None:
        raise Unpredictable(
            Reason.MISSING_FILE,
            f"search for fs UUID {search.key}: no mapped device has it",
            hint="give the fs UUIDs of the ESP and /boot (BootFiles.uuids)",
        )
    emu.set(search.variable, device)
    return 0


def _test(emu: Emulator, argv: list[str]) -> int:
    args = argv[1:]
    if argv[0] == "[":
        if not args or args[-1] != "]":
            raise Unpredictable(Reason.UNMODELLED_CONFIG, "[ without ]")
        args = args[:-1]

    def unary_file(op: str, name: str) -> bool:
        path = emu.files.locate(name, emu.get("root"))
        if op == "-s":
            if not path.is_file():
                return False
            return len(emu.read(name, contents=True)) > 0
        return path.exists() if op == "-e" else path.is_file() if op == "-f" else path.is_dir()

    return 0 if grubcommands.evaluate_test(args, unary_file) else 1


def _envfile(emu: Emulator, argv: list[str]) -> tuple[str, list[str]]:
    args, name = argv[1:], emu.get("prefix") + "/grubenv"
    if args[:1] in (["-f"], ["--file"]) and len(args) > 1:
        name, args = args[1], args[2:]
    if any(a.startswith("-") for a in args):
        raise Unpredictable(Reason.UNMODELLED_CONFIG, f"{argv[0]} option {args[0]}")
    return name, args


def _load_env(emu: Emulator, argv: list[str]) -> int:
    name, wanted = _envfile(emu, argv)
    if not emu.files.locate(name, emu.get("root")).is_file():
        return 1
    for var, value in grubcommands.parse_envblock(emu.read(name, contents=True)).items():
        if not wanted or var in wanted:
            emu.set(var, value)
    return 0


def _save_env(emu: Emulator, argv: list[str]) -> int:
    _envfile(emu, argv)  # writes through blocklists without a measured read; the next boot is what we predict
    return 0


def _loadfont(emu: Emulator, argv: list[str]) -> int:
    for name in argv[1:]:
        path = name if name[:1] in "(/" else f"{emu.get('prefix')}/fonts/{name}.pf2"
        if not emu.files.locate(path, emu.get("root")).is_file():
            return 1
    return 0


def _linux(emu: Emulator, argv: list[str]) -> int:
    if len(argv) < 2:
        raise Unpredictable(Reason.UNMODELLED_CONFIG, "linux without a kernel")
    emu.read(argv[1], contents=False)
    path = emu.files.locate(argv[1], emu.get("root"))
    emu.measure(Kind.IMAGE, argv[1], path)  # shim_lock Verify, twice (verifier and linuxefi loader)
    emu.measure(Kind.IMAGE, argv[1], path)
    emu.measure(Kind.KERNEL_CMDLINE, " ".join(argv[1:]))
    emu.kernel_loaded = True
    return 0


def _initrd(emu: Emulator, argv: list[str]) -> int:
    if not emu.kernel_loaded:
        raise Unpredictable(Reason.UNMODELLED_CONFIG, "initrd before linux")
    for name in argv[1:]:
        emu.read(name, contents=False)
    return 0


def _source(emu: Emulator, argv: list[str]) -> int:
    emu.config(argv[1], new_context=argv[0] == "configfile")
    return 0


def _setparams(emu: Emulator, argv: list[str]) -> int:
    emu.params[-1] = argv[1:]
    return 0


def _quiet(emu: Emulator, argv: list[str]) -> int:
    return 0


def _false(emu: Emulator, argv: list[str]) -> int:
    return 1


COMMANDS: dict[str, Callable[[Emulator, list[str]], int]] = {
    "set": _set,
    "unset": _unset,
    "export": _export,
    "insmod": _insmod,
    "search": _search,
    "search.fs_uuid": _search,
    "[": _test,
    "test": _test,
    "load_env": _load_env,
    "save_env": _save_env,
    "loadfont": _loadfont,
    "linux": _linux,
    "initrd": _initrd,
    "source": _source,
    "configfile": _source,
    "setparams": _setparams,
    "echo": _quiet,
    "terminal_output": _quiet,
    "terminal_input": _quiet,
    "true": _quiet,
    "false": _false,
}


def emulate(
    files: BootFiles, reader: Reader, builtin: str, modules: frozenset[str] | None, prefix: str, cmdpath: str
) -> list[Measurement]:
    """The measurements from GRUB's built-in configuration (`builtin`, the memdisk's grub.cfg, which
    finds $prefix and sources $prefix/grub.cfg) to the boot."""
    emulator = Emulator(files, reader, modules, files.esp_device, COMMANDS)
    for name, value in (("prefix", prefix), ("cmdpath", cmdpath)):
        emulator.set(name, value)
        emulator.context.exported.add(name)
    try:
        emulator.run(grubscript.parse(builtin))
    except Booted:
        return emulator.measurements
    raise Unpredictable(Reason.UNMODELLED_CONFIG, "GRUB's configs end without booting a kernel")
