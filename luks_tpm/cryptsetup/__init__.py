"""The one package that calls libcryptsetup (`libcryptsetup.so.12`), through ctypes.

Every C function used is declared once, in `_SIGNATURES`, and resolved on first use, so a function
missing from an older library fails only the feature that needs it (see `has_function`).
A negative errno from libcryptsetup becomes a `CryptsetupError` naming the function; `open_device`
alone turns the errors of opening a device into user-facing `LuksTpmError`s.

libcryptsetup's own messages go to `logging.getLogger("luks_tpm.cryptsetup")`.

Key material (volume keys, passphrases) is passed as `Secret` and handed to C as a pointer into
its locked buffer: it never becomes `bytes` or `str` here, is never logged and never put in an error.
Structures and constants follow `/usr/include/libcryptsetup.h` of cryptsetup 2.6.1 (unchanged in 2.7).

The package is the only code that calls libcryptsetup: `binding` (the library and its table of
signatures), `device` (a loaded header), `opening` (`open_device` and the header facts).
"""

from .binding import (
    ACTIVATE_ALLOW_DISCARDS,
    ACTIVATE_KEYRING_KEY,
    ACTIVATE_READONLY,
    ANY_SLOT,
    ANY_TOKEN,
    SONAME,
    CryptsetupError,
    TokenInfo,
    device_mapper_available,
    has_function,
    library_version,
    set_debug,
)
from .device import Device
from .opening import HeaderFacts, header_facts, open_device, write_error

__all__ = [
    "ACTIVATE_ALLOW_DISCARDS",
    "ACTIVATE_KEYRING_KEY",
    "ACTIVATE_READONLY",
    "ANY_SLOT",
    "ANY_TOKEN",
    "SONAME",
    "CryptsetupError",
    "Device",
    "HeaderFacts",
    "TokenInfo",
    "device_mapper_available",
    "has_function",
    "header_facts",
    "library_version",
    "open_device",
    "set_debug",
    "write_error",
]
