"""The progress file of a selftest run, and its reader (no pytest here: the bed runner reads it).

``kvmpy.selftest.results`` writes it next to the results file while the run goes: a JSON line
for each test as it starts and as it ends. A run killed before pytest's own end (the bed's
timeout, a machine that died) still shows what had finished and which test was running; the
file is removed once the results are written.
"""
from __future__ import annotations

import json

PROGRESS_SUFFIX = ".progress"


def read_progress(text: str) -> tuple[list[dict], str]:
    """The tests a progress file shows finished (their entries, as in the results file) and the
    nodeid of one it shows started and not finished ('' if none). A line the kill cut is skipped."""
    tests: dict[str, dict] = {}
    running = ""
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        entry = record.get("test")
        if isinstance(record.get("started"), str):
            running = record["started"]
        elif isinstance(entry, dict) and isinstance(entry.get("nodeid"), str):
            duration, stats = entry.get("duration"), entry.get("stats")
            tests[entry["nodeid"]] = {
                "nodeid": entry["nodeid"], "outcome": str(entry.get("outcome") or ""),
                "reason": str(entry.get("reason") or ""), "stats": stats if isinstance(stats, dict) else {},
                "duration": float(duration) if isinstance(duration, (int, float)) else 0.0}
            if entry["nodeid"] == running:
                running = ""
    return list(tests.values()), running
