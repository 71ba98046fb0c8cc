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
# Outcomes of a test that ran to a verdict: something of KVM was checked. A run with none of
# them (every test skipped, or pytest told not to run them: --collect-only, --setup-plan) tested
# nothing and is never green.
EXECUTED = {"passed", "failed", "error", "xfailed", "xpassed", "known-absent"}
# Every outcome a run records (kvmpy.selftest.results, progress); anything else is not a result.
OUTCOMES = EXECUTED | {"skipped", "interrupted", NOT_TESTED}
# RunResults.splat_watch of a run whose kernel log nobody watched starts with this.
WATCH_OFF = "OFF"
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
    # The kernel log the splat watch read ("/dev/kmsg"), or "OFF: why" when none was watched
    # (kvmpy.selftest.results records it); None when not known (no results from pytest).
    splat_watch: str | None = None
    # The size multiplier the run used (--kvmpy-scale / KVMPY_SCALE); None when not known.
    scale: int | None = None

    @classmethod
    def from_json(cls, config: str, text: str) -> "RunResults":
        data = json.loads(text)
        return cls(config, data.get("tests", []), data.get("exitstatus"), seconds=data.get("seconds", 0.0),
                   collected=data.get("collected"), splat_watch=data.get("splat_watch"), scale=data.get("scale"))

    def add_harness_error(self, why: str) -> None:
        """Add ``why`` to the run's harness error (after what it already says)."""
        self.harness_error = f"{self.harness_error}; {why}" if self.harness_error else why

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tests:
            out[t["outcome"]] = out.get(t["outcome"], 0) + 1
        return out


def exit_status(runs: list[RunResults]) -> int:
    """The one rule for `kvmpy selftest`'s exit status, first match wins.

    128+N: stopped by signal N (the results are partial); 2: not tested (no usable
    KVM) or a harness error; 1: a failure, an unexplained kernel splat, a strict
    known issue that did not reproduce, or a skip without a reason; 2: nothing was
    tested after all (:func:`not_tested_note`: no test ran to a verdict, a test without
    one, a kernel log nobody watched for splats); 0 otherwise.
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
    if not_tested_note(runs):
        return EXIT_NOT_TESTED
    return EXIT_OK


def _reasons(tests: list[dict], most: int = 3) -> str:
    """The commonest skip reasons of ``tests``, with counts: ``"no nested (x12); no 1G pool (x6)"``."""
    counts: dict[str, int] = {}
    for t in tests:
        text = (t.get("reason") or "").strip()
        reason = text.splitlines()[0][:160] if text else "no reason"
        counts[reason] = counts.get(reason, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    text = "; ".join(f"{reason} (x{n})" if n > 1 else reason for reason, n in top[:most])
    return text + (f"; and {len(top) - most} other reason(s)" if len(top) > most else "")


def _all_skipped(tests: list[dict]) -> str:
    """"all N selected tests skipped (commonest reasons)" when every selected test of ``tests``
    skipped, else ''."""
    tests = [t for t in tests if "::" in t["nodeid"]]
    skipped = [t for t in tests if t["outcome"] == "skipped"]
    if skipped and len(skipped) == len(tests):
        return f"all {len(tests)} selected test{'s' if len(tests) != 1 else ''} skipped ({_reasons(skipped)})"
    return ""


def row_not_tested(r: RunResults) -> str:
    """Why the one run ``r`` checked nothing ('' if a test of it ran to a verdict, or it stopped or
    failed to run: those say so themselves). In a matrix, a row whose selected tests all skip (tests
    that apply to other rows, e.g. ``-k splitting`` in a shadow-paging row) is shown, not failed:
    see :func:`not_tested_note`."""
    if r.harness_error or r.interrupted or any(t["outcome"] in EXECUTED for t in r.tests):
        return ""
    recorded = sum(1 for t in r.tests if "::" in t["nodeid"])
    return _all_skipped(r.tests) or f"no test ran ({recorded} recorded, none with a verdict)"


def not_tested_note(runs: list[RunResults]) -> str:
    """Why a run with no failure is still not green (exit 2), or '' if it tested what it claims.

    - A kernel log nobody watched (``RunResults.splat_watch`` OFF: no root, ``KVMPY_KMSG``
      unreadable): a run that cannot see a kernel splat cannot say there was none.
    - A test without a verdict while nothing stopped the run (pytest told not to run the tests:
      --collect-only, --setup-plan, --setup-only; or an outcome no kvmpy run records).
    - No test ran to a verdict anywhere: every selected test skipped, or none ran. A row of a
      matrix whose tests all skip is shown in the table but fails nothing while other rows
      tested something: a matrix row runs the tests that apply to its configuration.
    """
    notes = []
    off = [f"{r.config} ({r.splat_watch})" for r in runs
           if r.splat_watch is not None and r.splat_watch.startswith(WATCH_OFF)]
    if off:
        notes.append(f"the kernel log was not watched for splats in {', '.join(off)}: a run that "
                     f"cannot see a kernel splat cannot pass")
    stray = [t for r in runs if not r.interrupted for t in r.tests if t["outcome"] not in OUTCOMES
             or t["outcome"] == "interrupted"]
    if stray:
        outcomes = sorted({t["outcome"] or "none" for t in stray})
        notes.append(f"{len(stray)} test{'s' if len(stray) != 1 else ''} never ran to a verdict (outcome "
                     f"{', '.join(outcomes)}, e.g. {_short_id(stray[0]['nodeid'])}): pytest did not run "
                     f"{'them' if len(stray) != 1 else 'it'}")
    if not any(t["outcome"] in EXECUTED for r in runs for t in r.tests):
        skipped = _all_skipped([t for r in runs for t in r.tests])
        if skipped:
            notes.append(f"nothing was tested: {skipped}")
        elif not any(r.harness_error or r.interrupted or any(t["outcome"] == NOT_TESTED for t in r.tests)
                     for r in runs):     # (those say so themselves)
            notes.append("nothing was tested: no test ran to a verdict")
    return "; ".join(notes)


VERDICT_CASE = "(verdict)"
PROBLEM_LABEL = {"(harness)": "ERROR", "(run)": "INTERRUPTED"}     # the table's result column


def run_problems(runs: list[RunResults]) -> list[tuple[str, str, str]]:
    """What fails ``runs`` besides their tests, in the order every output lists it, as (case,
    config, text): "(harness)" for a run's harness error, "(run)" for a stop (partial results),
    then "(verdict)" (config '') for why nothing counts as tested (:func:`not_tested_note`).
    The KTAP, JUnit and merged outputs all show these; :func:`exit_status` is the rule."""
    out = [("(harness)", r.config, r.harness_error) for r in runs if r.harness_error]
    out += [("(run)", r.config, stop_note(r)) for r in runs if r.interrupted]
    note = not_tested_note(runs)
    if note:
        out.append((VERDICT_CASE, "", f"NOT TESTED: {note}"))
    return out


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
    problems = run_problems(runs)
    for r in runs:
        rows += [(case, config, PROBLEM_LABEL[case], text, "") for case, config, text in problems
                 if case != VERDICT_CASE and config == r.config]
        nothing = row_not_tested(r)
        if nothing and len(runs) > 1:
            rows.append(("(nothing tested)", r.config, "NOT TESTED", nothing, ""))
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
    lines += [f"kernel splat watch: {w}" for w in watch_lines(runs)]
    lines += scale_lines(runs)
    # The verdict last: why nothing (or not enough) was tested, then the counts.
    note = not_tested_note(runs)
    summary = summary_line(totals)
    if note:
        lines.append(note)
        summary = summary if summary.startswith("NOT TESTED") else f"NOT TESTED: {summary}"
    lines.append(summary)
    return "\n".join(lines)


def watch_lines(runs: list[RunResults]) -> list[str]:
    """What the splat watch read, once if the same for every run, else per configuration."""
    known = [(r.config, r.splat_watch) for r in runs if r.splat_watch is not None]
    if not known:
        return []
    if len({w for _, w in known}) == 1:
        return [known[0][1]]
    return [f"{config}: {w}" for config, w in known]


def scale_lines(runs: list[RunResults]) -> list[str]:
    """The size multiplier when a run used one other than 1 (a setting easily left in a shell)."""
    scales = sorted({r.scale for r in runs if r.scale is not None})
    if scales in ([], [1]):
        return []
    return [f"sizes multiplied by {' / '.join(map(str, scales))} (--kvmpy-scale or KVMPY_SCALE)"]


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
    notes = [("verdict" if case == VERDICT_CASE else config, text) for case, config, text in run_problems(runs)]
    out = ["KTAP version 1", f"1..{len(entries) + len(notes)}"]
    out += [f"# {r.config}: {r.bed['summary']}" for r in runs if r.bed.get("summary")]
    out += [f"# kernel splat watch: {w}" for w in watch_lines(runs)]
    out += [f"# {line}" for line in scale_lines(runs)]
    out += [f"# {r.config}: nothing tested: {why}" for r in runs if len(runs) > 1 and (why := row_not_tested(r))]
    n = 0
    for config, note in notes:
        n += 1
        out.append(f"not ok {n} harness {config} # {note}".replace("\n", " "))
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
        "not_tested": not_tested_note(runs),
        **(extra or {}),
        "runs": [{"config": r.config, **({"row": r.row} if r.row else {}), "exitstatus": r.exitstatus,
                  "harness_error": r.harness_error, "interrupted": signal_name(r.interrupted) if r.interrupted else "",
                  "stop_detail": r.stop_detail, "collected": r.collected, "seconds": r.seconds,
                  **({"splat_watch": r.splat_watch} if r.splat_watch is not None else {}),
                  **({"scale": r.scale} if r.scale is not None else {}),
                  **({"bed": r.bed} if r.bed else {}), "tests": r.tests} for r in runs],
    }, indent=1)


def runs_from_json(doc: dict) -> list[RunResults]:
    """The runs of a report :func:`to_json` wrote (KeyError/TypeError/ValueError if it is not one)."""
    return [RunResults(r["config"], list(r["tests"]), r.get("exitstatus"), r.get("harness_error", ""),
                       r.get("seconds", 0.0), signal_number(r.get("interrupted", "")), r.get("collected"),
                       r.get("stop_detail", ""), dict(r.get("bed", {})), r.get("row", ""), r.get("splat_watch"),
                       r.get("scale"))
            for r in doc["runs"]]
