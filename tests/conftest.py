"""Fixtures live in one plugin module per concern so each stays readable on its own."""

pytest_plugins = [
    "tests.fixtures_tpm",
    "tests.fixtures_luks",
    "tests.fixtures_keyring",
    "tests.fixtures_cli",
    "tests.fixtures_files",
    "tests.fixtures_package",
    "tests.fixtures_upcall",
]
