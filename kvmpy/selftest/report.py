"""The selftest report: host header, one table row per test, KTAP and JSON renderings."""
from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import dataclass, field

# Outcomes that make `kvmpy selftest` exit 1.
FAILING = {"failed", "error", "xpassed"}
RESULT_LABEL = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP",
                "xfailed": "XFAIL(known)", "xpassed": "XPASS(strict)",
                "known-absent": "PASS(known issue absent)"}


@dataclass
class RunResults:
    """Per-test results of one pytest run in one configuration (host or a bed config)."""

    config: str
    tests: list[dict] = field(default_factory=list)
    exitstatus: int | None = None
    harness_error: str = ""
    seconds: float = 0.0

    @classmethod
    def from_json(cls, config: str, text: str) -> "RunResults":
        data = json.loads(text)
        return cls(config, data.get("tests", []), data.get("exitstatus"), seconds=data.get("seconds", 0.0))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tests:
            out[t["outcome"]] = out.get(t["outcome"], 0) + 1
        return out


def exit_status(runs: list[RunResults]) -> int:
    """0: all passed or skipped with a reason; 1: any failure; 2: harness error."""
    if any(r.harness_error for r in runs):
        return 2
    if any(t["outcome"] in FAILING for r in runs for t in r.tests):
        return 1
    if any(t["outcome"] == "skipped" and not t.get("reason") for r in runs for t in r.tests):
        return 1  # a skip without a reason hides something
    return 0


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
    """'N passed, N failed, N skipped' plus xfail/xpass/error counts when present."""
    s = f"{totals.get('passed', 0) + totals.get('known-absent', 0)} passed, {totals.get('failed', 0) + totals.get('error', 0) + totals.get('xpassed', 0)} failed, {totals.get('skipped', 0)} skipped"
    extra = [f"{totals[k]} {k}" for k in ("xfailed", "xpassed", "error") if totals.get(k)]
    if totals.get("known-absent"):
        extra.append(f"{totals['known-absent']} intermittent known issue absent")
    return s + (f" ({', '.join(extra)})" if extra else "")


def format_ktap(runs: list[RunResults]) -> str:
    """KTAP v1: one line per test and configuration, SKIP/XFAIL directives with reasons."""
    entries = [(r.config, t) for r in runs for t in r.tests]
    out = ["KTAP version 1", f"1..{len(entries) + sum(1 for r in runs if r.harness_error)}"]
    n = 0
    for r in runs:
        if r.harness_error:
            n += 1
            out.append(f"not ok {n} harness {r.config} # {r.harness_error}")
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


def to_json(header: dict, runs: list[RunResults]) -> str:
    return json.dumps({
        "host": header,
        "exit_status": exit_status(runs),
        "runs": [{"config": r.config, "exitstatus": r.exitstatus, "harness_error": r.harness_error,
                  "seconds": r.seconds, "tests": r.tests} for r in runs],
    }, indent=1)
