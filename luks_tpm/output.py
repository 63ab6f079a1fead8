"""What commands tell the user: a `Report` (data for --json, lines for people) and progress on stderr."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from .secret import Secret

_MARKER = "@@LUKS-TPM-RECOVERY-KEY@@"


@dataclasses.dataclass(frozen=True)
class Report:
    data: dict[str, Any]
    lines: list[str]
    # A recovery key to show once. It is written from its Secret as bytes (spliced into the JSON as
    # "recovery_key"), so it never becomes a str; emit() closes it.
    recovery_key: Secret | None = None

    def emit(self, as_json: bool) -> None:
        if as_json:
            data = dict(self.data)
            if self.recovery_key is not None:
                data["recovery_key"] = _MARKER
            text = json.dumps(data, indent=2, sort_keys=True) + "\n"
            before, _, after = text.partition(_MARKER)
            _write(before.encode(), self.recovery_key, after.encode())
        else:
            for line in self.lines:
                print(line)
            if self.recovery_key is not None:
                progress("recovery key (shown once; write it down and keep it away from this machine):")
                _write(b"", self.recovery_key, b"\n")
                progress("it opens the volume with plain cryptsetup if the TPM is cleared, replaced or broken")
        if self.recovery_key is not None:
            self.recovery_key.close()


def _write(before: bytes, secret: Secret | None, after: bytes) -> None:
    sys.stdout.flush()
    out = sys.stdout.fileno()
    os.write(out, before)
    if secret is not None:
        os.write(out, secret.view())
    os.write(out, after)


def progress(message: str) -> None:
    print(f"luks-tpm: {message}", file=sys.stderr, flush=True)
