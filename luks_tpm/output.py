"""What commands tell the user: a `Report` (data for --json, lines for people) and progress on stderr."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any


@dataclasses.dataclass(frozen=True)
class Report:
    data: dict[str, Any]
    lines: list[str]

    def emit(self, as_json: bool) -> None:
        if as_json:
            print(json.dumps(self.data, indent=2, sort_keys=True))
        else:
            for line in self.lines:
                print(line)


def progress(message: str) -> None:
    print(f"luks-tpm: {message}", file=sys.stderr, flush=True)
