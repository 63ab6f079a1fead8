"""The JSON contract (docs/json-schema.json, described in docs/json.md) as a validator for the tests."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "json-schema.json"


@functools.cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return loaded


@functools.cache
def _validator(definition: str) -> jsonschema.Draft202012Validator:
    defs = schema()["$defs"]
    assert definition in defs, f"docs/json-schema.json has no definition {definition!r}"
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{definition}", "$defs": defs})


def validate(definition: str, data: Any) -> None:
    """Fail with every violation if `data` is not what definition `definition` (a command, or "error") allows."""
    errors = sorted(_validator(definition).iter_errors(data), key=lambda error: list(error.absolute_path))
    assert not errors, (
        f"{definition} output does not match docs/json-schema.json:\n"
        + "\n".join(f"  at {'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}" for error in errors)
        + f"\n{json.dumps(data, indent=2)}"
    )
