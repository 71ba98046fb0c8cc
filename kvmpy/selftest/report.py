"""The selftest report: host header, one table row per test, KTAP and JSON renderings.

A run in the bed carries what it ran on (``RunResults.bed``: kernel release, machine,
vendor module, effective module parameters, hugetlb pools); every rendering records it
per configuration, so results of a patched and a base kernel cannot be confused.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import dataclass, field

from kvmpy.stop import exit_for_signal, signal_name, signal_number

# The exit status of `kvmpy selftest` (see exit_status()).
EXIT_OK = 0            # tested, and everything behaved as expected (or as already known)
EXIT_FAILED = 1        # a test failed, or the kernel logged a splat nothing explains
EXIT_NOT_TESTED = 2    # nothing (or not what was asked) was tested: no usable KVM, harness or usage error

# Outcomes that make `kvmpy selftest` exit 1.
FAILING = {"failed", "error", "xpassed"}
# The outcome of the row that says the run tested nothing (kvmpy.selftest.guard).
NOT_TESTED = "not-tested"
RESULT_LABEL = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP",
                "xfailed": "XFAIL(known)", "xpassed": "XPASS(strict)",
                "known-absent": "PASS(known issue absent)", NOT_TESTED: "NOT TESTED",
                "interrupted": "INTERRUPTED"}


@dataclass
class RunResults:
    """Per-test results of one pytest run in one configuration (host or a bed config)."""

    config: str
    tests: list[dict] = field(default_factory=list)
    exitstatus: int | None = None
    harness_error: str = ""
    seconds: float = 0.0
    # The signal that stopped the run (its tests are the partial results); 0 if it ran to the end.
    interrupted: int = 0
    # Tests pytest collected (selected by -k); more than len(tests) when the run was stopped.
    collected: int | None = None
    # Why the results are partial beyond the signal, e.g. "while this configuration ran in the bed".
    stop_detail: str = ""
    # Inside the bed: what the configuration ran on -- {"summary": one line, "requested_params": {...},
    # "facts": kernel, backend, cpu, vendor_module, params, hugepages}; {} on the host.
    bed: dict = field(default_factory=dict)
    # Inside the bed: the row of the run this configuration is (``qemu/6.12/tdp+split``, see --shard).
    row: str = ""

    @classmethod
    def from_json(cls, config: str, text: str) -> "RunResults":
        data = json.loads(text)
        return cls(config, data.get("tests", []), data.get("exitstatus"), seconds=data.get("seconds", 0.0),
                   collected=data.get("collected"))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tests:
            out[t["outcome"]] = out.get(t["outcome"], 0) + 1
        return out


def exit_status(runs: list[RunResults]) -> int:
    """The one rule for `kvmpy selftest`'s exit status, first match wins.

    128+N: stopped by signal N (the results are partial); 2: not tested (no usable
    KVM) or a harness error; 1: a failure, an unexplained kernel splat, a strict
    known issue that did not reproduce, or a skip without a reason; 0 otherwise.
    """
    for r in runs:
        if r.interrupted:
            return exit_for_signal(r.interrupted)
    if any(r.harness_error for r in runs) or any(t["outcome"] == NOT_TESTED for r in runs for t in r.tests):
        return EXIT_NOT_TESTED
    if any(t["outcome"] in FAILING for r in runs for t in r.tests):
        return EXIT_FAILED
    if any(t["outcome"] == "skipped" and not t.get("reason") for r in runs for t in r.tests):
        return EXIT_FAILED  # a skip without a reason hides something
    return EXIT_OK


def stop_note(r: RunResults) -> str:
    """Why ``r``'s results are partial, or ''."""
    if not r.interrupted:
        return ""
    if r.stop_detail:
        return f"stopped by {signal_name(r.interrupted)} {r.stop_detail}"
    ran = sum(1 for t in r.tests if t["outcome"] not in ("interrupted", NOT_TESTED))
    of = f" of {r.collected}" if r.collected is not None else ""
    return f"stopped by {signal_name(r.interrupted)} after {ran}{of} tests: the results are partial"


def format_setting(runs: list[RunResults]) -> str:
    """What each bed configuration ran on, one line each ('' when no run was in the bed)."""
    beds = [r for r in runs if r.bed]
    if not beds:
        return ""
    width = max(len(r.config) for r in beds)
    return "\n".join(["tested in the bed:"] + [f"  {r.config:<{width}}  {r.bed.get('summary', '')}" for r in beds])


def _short_id(nodeid: str) -> str:
    return nodeid.split("/")[-1]


def _fmt_stats(stats: dict) -> str:
    return " ".join(f"{k}={v:+d}" if isinstance(v, int) else f"{k}={v}" for k, v in stats.items())


def format_table(runs: list[RunResults], width: int | None = None) -> str:
    """One row per test and configuration: test, config, result, reason, stats deltas."""
    width = width or max(shutil.get_terminal_size((160, 20)).columns, 120)
    rows = [("test", "config", "result", "reason / first failure line", "stats deltas")]
    for r in runs:
        if r.harness_error:
            rows.append(("(harness)", r.config, "ERROR", r.harness_error, ""))
        if r.interrupted:
            rows.append(("(run)", r.config, "INTERRUPTED", stop_note(r), ""))
        for t in r.tests:
            rows.append((_short_id(t["nodeid"]), r.config, RESULT_LABEL.get(t["outcome"], t["outcome"]),
                         t.get("reason", "") or "", _fmt_stats(t.get("stats", {}))))
    w0 = min(max(len(x[0]) for x in rows), 64)
    w1 = min(max(len(x[1]) for x in rows), 40)
    w2 = max(len(x[2]) for x in rows)
    lines = []
    indent = w0 + w1 + w2 + 6
    reason_w = max(width - indent, 40)
    for i, (a, b, c, d, e) in enumerate(rows):
        # Reasons are what a developer acts on: wrap them, never cut them.
        text = d + (f"  [{e}]" if e else "")
        chunks = textwrap.wrap(text, reason_w) or [""]
        lines.append(f"{a[:w0]:<{w0}}  {b[:w1]:<{w1}}  {c:<{w2}}  {chunks[0]}".rstrip())
        lines.extend(" " * indent + chunk for chunk in chunks[1:])
        if i == 0:
            lines.append("-" * min(width, max(len(x) for x in lines)))
    totals: dict[str, int] = {}
    for r in runs:
        for k, v in r.counts().items():
            totals[k] = totals.get(k, 0) + v
    lines.append("")
    lines.append(summary_line(totals))
    return "\n".join(lines)


def summary_line(totals: dict[str, int]) -> str:
    """'N passed, N failed, N skipped' plus xfail/xpass/error counts when present.

    A run that tested nothing says so first: 0 failures is not a pass there.
    """
    s = f"{totals.get('passed', 0) + totals.get('known-absent', 0)} passed, {totals.get('failed', 0) + totals.get('error', 0) + totals.get('xpassed', 0)} failed, {totals.get('skipped', 0)} skipped"
    extra = [f"{totals[k]} {k}" for k in ("xfailed", "xpassed", "error", "interrupted") if totals.get(k)]
    if totals.get("known-absent"):
        extra.append(f"{totals['known-absent']} intermittent known issue absent")
    s += f" ({', '.join(extra)})" if extra else ""
    return f"NOT TESTED: {s}" if totals.get(NOT_TESTED) else s


def format_ktap(runs: list[RunResults]) -> str:
    """KTAP v1: one line per test and configuration, SKIP/XFAIL directives with reasons."""
    entries = [(r.config, t) for r in runs for t in r.tests]
    notes = [(r.config, r.harness_error or stop_note(r)) for r in runs if r.harness_error or r.interrupted]
    out = ["KTAP version 1", f"1..{len(entries) + len(notes)}"]
    out += [f"# {r.config}: {r.bed['summary']}" for r in runs if r.bed.get("summary")]
    n = 0
    for config, note in notes:
        n += 1
        out.append(f"not ok {n} harness {config} # {note}")
    for config, t in entries:
        n += 1
        name = f"{_short_id(t['nodeid'])} {config}".replace("#", "")
        reason = (t.get("reason") or "").replace("\n", " ")
        o = t["outcome"]
        if o == "passed":
            out.append(f"ok {n} {name}")
        elif o == "known-absent":
            out.append(f"ok {n} {name} # {reason}")
        elif o == "skipped":
            out.append(f"ok {n} {name} # SKIP {reason}")
        elif o == "xfailed":
            out.append(f"ok {n} {name} # XFAIL {reason}")
        else:
            out.append(f"not ok {n} {name}" + (f" # {reason}" if reason else ""))
    return "\n".join(out) + "\n"


def to_json(header: dict, runs: list[RunResults], extra: dict | None = None) -> str:
    """The report as JSON; ``extra`` adds top-level keys (a shard's ``shard``, see kvmpy.selftest.shard)."""
    return json.dumps({
        "host": header,
        "exit_status": exit_status(runs),
        **(extra or {}),
        "runs": [{"config": r.config, **({"row": r.row} if r.row else {}), "exitstatus": r.exitstatus,
                  "harness_error": r.harness_error, "interrupted": signal_name(r.interrupted) if r.interrupted else "",
                  "stop_detail": r.stop_detail, "collected": r.collected, "seconds": r.seconds,
                  **({"bed": r.bed} if r.bed else {}), "tests": r.tests} for r in runs],
    }, indent=1)


def runs_from_json(doc: dict) -> list[RunResults]:
    """The runs of a report :func:`to_json` wrote (KeyError/TypeError/ValueError if it is not one)."""
    return [RunResults(r["config"], list(r["tests"]), r.get("exitstatus"), r.get("harness_error", ""),
                       r.get("seconds", 0.0), signal_number(r.get("interrupted", "")), r.get("collected"),
                       r.get("stop_detail", ""), dict(r.get("bed", {})), r.get("row", ""))
            for r in doc["runs"]]
