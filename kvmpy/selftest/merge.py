"""`kvmpy report merge`: the shard reports of one run (``--shard K/N --json``) as one report, one verdict.

Shards are grouped by the rows of the run they slice (``shard.all_rows``); each group
must be complete (every K of its N, each once, all with the same N) and each shard must
have run exactly its slice. No row may come from two reports. The merged runs are the
shards' runs in shard order (K = 1..N), which, shards being contiguous slices, is the
unsharded run's order: merged, a sharded run's report is the unsharded one. Groups of
different runs (e.g. a QEMU run and a Bochs run) follow each other in the order their
first report was given.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvmpy.selftest.json_fields import expect, require
from kvmpy.selftest.report import OUTCOMES, RunResults, runs_from_json
from kvmpy.selftest.shard import Shard, slice_of
from kvmpy.stop import signal_number


class MergeError(ValueError):
    """Reports that do not make one whole run (overlapping, inconsistent, missing): nothing merged."""


@dataclass
class ShardReport:
    """One shard's report: where it came from, its host header, shard and runs."""

    path: str
    host: dict
    shard: Shard
    runs: list[RunResults]


def load(path: str) -> ShardReport:
    """A shard report from ``path`` (MergeError naming the file, and the field, if it is not one)."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise MergeError(f"{path}: cannot read: {e.strerror}") from None
    except RecursionError:
        raise MergeError(f"{path}: not a kvmpy selftest report (JSON nested too deeply)") from None
    except ValueError as e:     # also not UTF-8
        raise MergeError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or "runs" not in doc:
        raise MergeError(f"{path}: not a kvmpy selftest report (no 'runs'; made by `kvmpy selftest --json`)")
    if "shard" not in doc:
        raise MergeError(f"{path}: not a shard report (no 'shard'; made by "
                         f"`kvmpy selftest --bed [--matrix] --shard K/N --json`)")
    try:
        shard = Shard.from_dict(doc["shard"])
        check_report(doc)
        runs = runs_from_json(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise MergeError(f"{path}: malformed report: {e}") from None
    return ShardReport(path, doc.get("host", {}), shard, runs)


def check_report(doc: dict) -> None:
    """ValueError naming the first field of ``doc`` that `kvmpy selftest --json` would not have
    written: each run a config, its row, counts, signal and tests; each test a node id and one of
    the outcomes a run records."""
    expect("host", doc.get("host", {}), (dict,), "an object")
    expect("runs", doc["runs"], (list,), "a list")
    for i, run in enumerate(doc["runs"]):
        at = f"runs[{i}]"
        expect(at, run, (dict,), "an object")
        require(at, run, ("config", "tests"))
        expect(f"{at}.config", run["config"], (str,), "text")
        for key in ("row", "harness_error", "interrupted", "stop_detail", "splat_watch"):
            if run.get(key) is not None or key != "splat_watch":
                expect(f"{at}.{key}", run.get(key, ""), (str,), "text")
        if run.get("scale") is not None:
            expect(f"{at}.scale", run["scale"], (int,), "a whole number")
        if run.get("interrupted"):
            try:
                signal_number(run["interrupted"])
            except (KeyError, ValueError, IndexError):
                raise ValueError(f"{at}.interrupted: {run['interrupted']!r} names no signal") from None
        for key in ("exitstatus", "collected"):
            if run.get(key) is not None:
                expect(f"{at}.{key}", run[key], (int,), "a whole number or null")
        expect(f"{at}.seconds", run.get("seconds", 0.0), (int, float), "a number")
        expect(f"{at}.bed", run.get("bed", {}), (dict,), "an object")
        expect(f"{at}.tests", run["tests"], (list,), "a list")
        for j, test in enumerate(run["tests"]):
            tat = f"{at}.tests[{j}]"
            expect(tat, test, (dict,), "an object")
            require(tat, test, ("nodeid", "outcome"))
            for key in ("nodeid", "outcome"):
                expect(f"{tat}.{key}", test[key], (str,), "text")
            if not test["nodeid"]:
                raise ValueError(f"{tat}.nodeid: empty")
            if test["outcome"] not in OUTCOMES:
                raise ValueError(f"{tat}.outcome: {test['outcome']!r} is no outcome of a run "
                                 f"({', '.join(sorted(OUTCOMES))})")
            if test.get("reason") is not None:
                expect(f"{tat}.reason", test["reason"], (str,), "text")
            expect(f"{tat}.duration", test.get("duration", 0.0), (int, float), "a number")
            expect(f"{tat}.stats", test.get("stats", {}), (dict,), "an object")


def _check_coverage(r: ShardReport) -> None:
    """MergeError unless ``r``'s runs are its rows: one run per row it claims, each run of one of
    them, each with its tests. Only a stop, or a harness error, leaves rows without a run (the
    report says which were not run) or a run of no row."""
    cut = any(run.interrupted or run.harness_error for run in r.runs)
    seen: dict[str, int] = {}
    for i, run in enumerate(r.runs):
        if not run.row:
            if not (run.interrupted or run.harness_error):
                raise MergeError(f"{r.path}: runs[{i}] ({run.config}) names no row: which of shard "
                                 f"{r.shard.name}'s rows ({', '.join(r.shard.rows)}) it ran is unknown")
            continue
        if run.row in seen:     # a row outside the slice: refused by _check_group first
            raise MergeError(f"{r.path}: row {run.row} has two runs (runs[{seen[run.row]}] and runs[{i}])")
        seen[run.row] = i
        if not run.tests and not (run.interrupted or run.harness_error):
            raise MergeError(f"{r.path}: runs[{i}] (row {run.row}) has no tests, and no harness error or "
                             f"stop that would say why")
    missing = [row for row in r.shard.rows if row not in seen]
    if missing and not cut:
        raise MergeError(f"{r.path}: shard {r.shard.name} claims row{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} but has no run of {'them' if len(missing) > 1 else 'it'}")


def _check_group(group: list[ShardReport]) -> list[ShardReport]:
    """The group's shards in order K = 1..N, or MergeError for a wrong N, a shard twice or missing."""
    counts = {r.shard.count for r in group}
    if len(counts) > 1:
        given = ", ".join(f"{r.path} ({r.shard.name})" for r in group)
        raise MergeError(f"inconsistent shards: the same rows sliced in {' and '.join(map(str, sorted(counts)))} "
                         f"parts: {given}")
    n = counts.pop()
    by_index: dict[int, ShardReport] = {}
    for r in group:
        if r.shard.index in by_index:
            raise MergeError(f"shard {r.shard.name} given twice: {by_index[r.shard.index].path} and {r.path}")
        want = tuple(slice_of(list(r.shard.all_rows), r.shard.index, n))
        if r.shard.rows != want:
            raise MergeError(f"{r.path}: shard {r.shard.name} ran rows {', '.join(r.shard.rows)}, but "
                             f"{r.shard.name} of its run is {', '.join(want) or 'nothing'}")
        stray = [run.row for run in r.runs if run.row and run.row not in r.shard.rows]
        if stray:
            raise MergeError(f"{r.path}: shard {r.shard.name} reports rows outside its slice: {', '.join(stray)}")
        _check_coverage(r)
        by_index[r.shard.index] = r
    missing = [f"{k}/{n}" for k in range(1, n + 1) if k not in by_index]
    if missing:
        rows = [row for k in range(1, n + 1) if k not in by_index
                for row in slice_of(list(group[0].shard.all_rows), k, n)]
        raise MergeError(f"missing shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                         f"(rows {', '.join(rows)}); given: {', '.join(r.path for r in group)}")
    return [by_index[k] for k in range(1, n + 1)]


def merge(reports: list[ShardReport]) -> tuple[dict, list[RunResults], dict]:
    """(host header, runs, extra top-level keys) of the whole run; MergeError if the reports are not one.

    The header is the first shard's; when the shards ran on hosts with different
    headers, ``shard_hosts`` (in the extra keys) records each shard's.
    """
    if not reports:
        raise MergeError("no reports to merge")
    groups: dict[tuple[str, ...], list[ShardReport]] = {}
    for r in reports:
        groups.setdefault(r.shard.all_rows, []).append(r)
    ordered = [s for group in groups.values() for s in _check_group(group)]
    owner: dict[str, ShardReport] = {}
    for r in ordered:
        for row in r.shard.rows:
            if row in owner:
                raise MergeError(f"row {row} is in two reports: {owner[row].path} (shard {owner[row].shard.name}) "
                                 f"and {r.path} (shard {r.shard.name})")
            owner[row] = r
    runs = [run for r in ordered for run in r.runs]
    host = ordered[0].host
    extra = {}
    if any(r.host != host for r in ordered):
        extra["shard_hosts"] = [{"report": r.path, "shard": r.shard.name, "host": r.host} for r in ordered]
    return host, runs, extra
