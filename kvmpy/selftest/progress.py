"""The progress file of a selftest run, and its reader (no pytest here: the bed runner reads it).

``kvmpy.selftest.results`` writes it next to the results file while the run goes (or where
``--kvmpy-progress`` says: the host run's second pipe): a JSON line for each test as it starts
and as it ends. A run killed before pytest's own end (the bed's timeout, a machine that died,
a pytest that would not stop) still shows what had finished and which test was running; the
file next to the results is removed once they are written.
"""
from __future__ import annotations

import json

from kvmpy.selftest.report import RunResults

PROGRESS_SUFFIX = ".progress"
#: (outcome, reason) of a test a stop caught running.
STOPPED_TEST = ("interrupted", "the run was stopped during this test")


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


def unfinished_tests(text: str, outcome: str, reason: str) -> tuple[list[dict], str]:
    """What a run that never wrote its results shows in its progress file ``text``: the tests that
    finished, then the one it was running given ``outcome`` and ``reason``; and that one's
    nodeid ('' if none)."""
    tests, running = read_progress(text)
    if running:
        tests.append({"nodeid": running, "outcome": outcome, "reason": reason, "duration": 0.0, "stats": {}})
    return tests, running


def progress_note(tests: list[dict], running: str) -> str:
    """What :func:`unfinished_tests` found, in words: how many finished, which one was running."""
    finished = len(tests) - bool(running)
    return ", ".join(([f"{finished} test(s) had finished"] if finished else []) + ([f"{running} was running"] if running else []))


def add_unfinished(run: RunResults, text: str, outcome: str, reason: str) -> None:
    """Give ``run``, whose pytest never wrote its results, the tests its progress lines ``text``
    show (:func:`unfinished_tests`), and say so after its harness error."""
    run.tests, running = unfinished_tests(text, outcome, reason)
    if run.tests:
        run.harness_error += f"; {progress_note(run.tests, running)}"
