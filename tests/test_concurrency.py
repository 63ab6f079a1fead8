"""Two luks-tpm processes changing one header at once (issue 8, "Concurrency").

Pairs: enroll + enroll, enroll + remove, reseal + remove (and load-key + load-key), each run many
times with the second command started 0 to 250 ms after the first, so that its header write lands
before, inside and after the other's read-modify-write window. The two processes talk to two swtpm
instances with the same state (same seeds, so every token works on both): swtpm has no resource
manager, and two clients on one instance would exhaust its object slots, which a real /dev/tpmrm0
never does.

After every round:
- nothing claimed is missing: a process that exited 0 has its effect in the header (an enrolled
  token exists and unlocks, a removed token is gone), and no token that nobody removed is lost;
- a process that failed says in plain words that another process changed the header and to retry
  (exit 3 is fine), in one line, never exit 1;
- every way in that should exist works: the passphrase keyslot, and load-key with every token.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import volumes
from .fixtures_tpm import Swtpm
from .forked_cli import ForkedCli

ROUNDS = 10
DELAYS = [0.0, 0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.01, 0.1]


@dataclasses.dataclass(frozen=True)
class Twins:
    a: Swtpm
    b: Swtpm
    base: Path  # keyslot 0, derived token 0, sealed token 1 (made on a; b has the same seeds)
    passphrase: Path


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory, cli: ForkedCli) -> Iterator[Twins]:
    work = tmp_path_factory.mktemp("concurrency")
    a = Swtpm(work / "a")
    a.start()
    b = Swtpm(work / "b")
    try:
        passphrase = volumes.passphrase_file(work)
        base = volumes.luks_format(work / "base.img", passphrase)
        cli.run("enroll", base, "--mode", "derived", "--unlock-key-file", passphrase, tcti=a.tcti)
        cli.run("enroll", base, "--mode", "sealed", "--unlock-key-file", passphrase, tcti=a.tcti)
        a.stop()
        shutil.copytree(a.state, b.state, ignore=shutil.ignore_patterns("*.sock*", "*.log"))
        a.start()
        b.start()
        yield Twins(a, b, base, passphrase)
    finally:
        a.stop()
        b.stop()


def _plain_words(stderr: str) -> bool:
    low = stderr.lower()
    return ("another" in low or "concurrent" in low or "changed" in low) and ("retry" in low or "again" in low)


def _loser_problem(result: Any) -> str | None:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("luks-tpm: hint:")]
    if result.returncode == 1 or "Traceback" in result.stderr:
        return f"internal error: {result.stderr[-300:]!r}"
    if not lines:
        return "no message"
    if not _plain_words(result.stderr):
        return f"does not say another process changed the header and to retry: {lines[-1][:200]}"
    return None


def _round(
    twins: Twins, cli: ForkedCli, work: Path, first: list[str | Path], second: list[str | Path], delay: float
) -> tuple[Path, list[Any]]:
    image = volumes.copy_image(twins.base, work / "disk.img")
    argv = [
        ["--tcti", twins.a.tcti, "--json", *[image if a == "IMAGE" else a for a in first]],
        ["--tcti", twins.b.tcti, "--json", *[image if a == "IMAGE" else a for a in second]],
    ]
    results = cli.run_many(argv, tcti=None, parallel=2, delays=[0.0, delay], timeout=60)
    return image, results


def _ways_in(image: Path, twins: Twins, cli: ForkedCli) -> list[str]:
    broken = []
    if not volumes.passphrase_opens(image, twins.passphrase):
        broken.append("the passphrase keyslot")
    for token_id, token in volumes.tokens(image).items():
        if token.get("type") != "luks-tpm":
            continue
        result = cli.run("load-key", image, "--token-id", str(token_id), tcti=twins.a.tcti, expect=None)
        if result.returncode != 0:
            broken.append(f"token {token_id}: {result.stderr.strip()[:160]}")
    return broken


def _run_pair(
    name: str,
    first: list[str | Path],
    second: list[str | Path],
    twins: Twins,
    cli: ForkedCli,
    tmp_path: Path,
    expect_after: Any,
) -> None:
    failures: list[str] = []
    both_won = losers = 0
    for number in range(ROUNDS):
        before = volumes.tokens(twins.base)
        image, results = _round(twins, cli, tmp_path, first, second, DELAYS[number % len(DELAYS)])
        after = volumes.tokens(image)
        won = [r.returncode == 0 for r in results]
        both_won += all(won)
        for result, ok in zip(results, won, strict=True):
            if not ok:
                losers += 1
                problem = _loser_problem(result)
                if problem:
                    command = " ".join(result.args[3:5])
                    failures.append(f"round {number}: {command}: exit {result.returncode}: {problem}")
        failures += [f"round {number}: {p}" for p in expect_after(before, after, results, won)]
        failures += [f"round {number}: way in lost: {w}" for w in _ways_in(image, twins, cli)]
    summary = f"{name}: {ROUNDS} rounds, both succeeded in {both_won}, {losers} refusals, {len(failures)} problems"
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures)


def _enrolled_ids(results: list[Any], won: list[bool], which: list[int]) -> list[int]:
    return [json.loads(results[i].stdout)["token"] for i in which if won[i]]


def test_enroll_and_enroll(twins: Twins, cli: ForkedCli, tmp_path: Path) -> None:
    command: list[str | Path] = ["enroll", "IMAGE", "--mode", "derived", "--unlock-key-file", twins.passphrase]

    def check(before: dict[int, Any], after: dict[int, Any], results: list[Any], won: list[bool]) -> list[str]:
        problems = [f"token {t} was lost" for t in before if t not in after]
        ids = _enrolled_ids(results, won, [0, 1])
        problems += [f"an enroll reported token {t}, which is not in the header" for t in ids if t not in after]
        if len(set(ids)) != len(ids):
            problems.append(f"both enrolls reported the same token id {ids}")
        extra = set(after) - set(before) - set(ids)
        problems += [f"token {t} appeared without a process reporting it" for t in sorted(extra)]
        return problems

    _run_pair("enroll+enroll", command, command, twins, cli, tmp_path, check)


def test_enroll_and_remove(twins: Twins, cli: ForkedCli, tmp_path: Path) -> None:
    enroll: list[str | Path] = ["enroll", "IMAGE", "--mode", "derived", "--unlock-key-file", twins.passphrase]
    remove: list[str | Path] = ["remove", "IMAGE", "--token-id", "1"]

    def check(before: dict[int, Any], after: dict[int, Any], results: list[Any], won: list[bool]) -> list[str]:
        problems = [f"token {t} was lost" for t in before if t not in after and not (t == 1 and won[1])]
        if won[1] and 1 in after and after[1] == before.get(1):  # a new token may take the free id 1
            problems.append("remove reported token 1 removed, but it is in the header")
        ids = _enrolled_ids(results, won, [0])
        problems += [f"enroll reported token {t}, which is not in the header" for t in ids if t not in after]
        if all(won) and problems:
            problems.insert(0, "both processes claimed success")
        return problems

    _run_pair("enroll+remove", enroll, remove, twins, cli, tmp_path, check)


def test_reseal_and_remove(twins: Twins, cli: ForkedCli, tmp_path: Path) -> None:
    reseal: list[str | Path] = ["reseal", "IMAGE", "--token-id", "1"]
    remove: list[str | Path] = ["remove", "IMAGE", "--token-id", "0"]

    def check(before: dict[int, Any], after: dict[int, Any], results: list[Any], won: list[bool]) -> list[str]:
        problems = []
        if won[1] and 0 in after and after[0] == before.get(0):  # the new token may take the free id 0
            problems.append("remove reported token 0 removed, but it is in the header")
        if not won[1] and 0 not in after:
            problems.append("token 0 is gone, but remove failed")
        ids = _enrolled_ids(results, won, [0])
        problems += [f"reseal reported new token {t}, which is not in the header" for t in ids if t not in after]
        if not won[0] and 1 not in after:
            problems.append("reseal failed and the old sealed token 1 is gone")
        sealed = [t for t, v in after.items() if v.get("mode") == "sealed"]
        if not sealed:
            problems.append("no sealed token is left")
        if all(won) and problems:
            problems.insert(0, "both processes claimed success")
        return problems

    _run_pair("reseal+remove", reseal, remove, twins, cli, tmp_path, check)


def test_load_key_and_load_key(twins: Twins, cli: ForkedCli, tmp_path: Path) -> None:
    """Two units unlocking one volume at once (same key description, same session keyring): both must
    get the key in; neither may fail with an internal error because the other replaced the key."""
    image = volumes.copy_image(twins.base, tmp_path / "disk.img")
    failures = []
    for number in range(2 * ROUNDS):
        results = cli.run_many(
            [["--tcti", twins.a.tcti, "load-key", image], ["--tcti", twins.b.tcti, "load-key", image]],
            tcti=None,
            parallel=2,
            delays=[0.0, DELAYS[number % len(DELAYS)] / 10],
            own_keyring=False,
        )
        failures += [
            f"round {number}: exit {r.returncode}: {r.stderr.strip()[:200]}" for r in results if r.returncode != 0
        ]
    assert not failures, f"{len(failures)} of {4 * ROUNDS} concurrent load-keys failed:\n" + "\n".join(failures)
