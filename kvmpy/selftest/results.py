"""pytest plugin: record each selftest's outcome, reason and asserted stats deltas as JSON.

Loaded by ``kvmpy selftest`` (``-p kvmpy.selftest.results``); the JSON file is what
the report, KTAP and ``--json`` outputs are built from, on the host and in the bed.
Until it is written, a progress file beside it shows each test as it starts and ends
(:mod:`kvmpy.selftest.progress`: what a killed run leaves).
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import pytest

from kvmpy.selftest.options import OptionError, scale_of
from kvmpy.selftest.progress import PROGRESS_SUFFIX, STOPPED_TEST

RESULTS_OPTION = "--kvmpy-results"
PROGRESS_OPTION = "--kvmpy-progress"
# A row's user property that sets its recorded outcome (e.g. report.NOT_TESTED).
OUTCOME_PROPERTY = "kvmpy_outcome"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(RESULTS_OPTION, default=os.environ.get("KVMPY_RESULTS_JSON"),
                     help="write per-test outcomes to this JSON file")
    parser.addoption(PROGRESS_OPTION, default=None,
                     help="write the progress lines here (default: beside the results, removed at the end)")


@pytest.fixture
def kvmpy_stats(request: pytest.FixtureRequest):
    """Record the key stats deltas a test asserted, shown in the report: ``kvmpy_stats(pages_2m=-512)``."""

    def record(**deltas: int) -> None:
        request.node.user_properties.append(("stats", deltas))

    return record


def report_session_row(config: pytest.Config, name: str, text: str, outcome: str = "failed") -> None:
    """Report a failure that belongs to no test: a kernel splat between tests, a run that tested nothing.

    It goes through pytest's own report hook, so the terminal, ``--junitxml`` and the
    results JSON all show it as a failed row named ``name`` (reason: ``text``'s first
    line), and pytest counts it. ``outcome`` is the outcome the results JSON records.
    """
    report = pytest.TestReport(nodeid=name, location=(name, None, name), keywords={}, outcome="failed",
                               longrepr=text, when="call", user_properties=[(OUTCOME_PROPERTY, outcome)])
    config.hook.pytest_runtest_logreport(report=report)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return ""


def _scale(config: pytest.Config) -> int | None:
    """The run's size multiplier (kvmpy.selftest.options.scale_of), None if malformed."""
    try:
        return scale_of(config.getoption("--kvmpy-scale", None))
    except OptionError:
        return None


def splat_watch_state(config: pytest.Config) -> str:
    """The kernel log the splat watch (kvmpy.selftest.splat) read this session, or "OFF: why"
    (the report's verdict: a run whose kernel log nobody watched cannot be green)."""
    from kvmpy.selftest.report import WATCH_OFF

    watch = config.pluginmanager.get_plugin("kvmpy-splat-watch")
    if watch is None:
        return f"{WATCH_OFF}: the splat watch was not loaded (--no-splat-watch or -p no:kvmpy.selftest.splat)"
    if watch.unavailable or watch.reader is None:
        return f"{WATCH_OFF}: {watch.unavailable or 'no kernel log reader'}"
    return str(watch.reader.path)


class _Recorder:
    def __init__(self, path: str, progress_path: str | None = None) -> None:
        self.path = path
        # A progress file of our own choosing (beside the results) goes once they are written.
        self.progress_path, self.own_progress = progress_path or path + PROGRESS_SUFFIX, not progress_path
        self.tests: dict[str, dict] = {}
        self.started = time.time()
        self.running = ""
        self.progress = None    # the progress file; False once it could not be written

    def _note(self, record: dict) -> None:
        """One line of the progress file (best effort: the results file is what counts)."""
        if self.progress is False:
            return
        try:
            if self.progress is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.progress_path)), exist_ok=True)
                self.progress = open(self.progress_path, "w")
            self.progress.write(json.dumps(record) + "\n")
            self.progress.flush()
        except (OSError, ValueError):
            if self.progress:
                with contextlib.suppress(OSError):
                    self.progress.close()
            self.progress = False

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.running = nodeid
        self._note({"started": nodeid})

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self.running = ""
        if nodeid in self.tests:
            self._note({"test": self.tests[nodeid]})

    def _entry(self, report: pytest.TestReport) -> dict:
        # The outcome stays "" until a phase decides it: a test stopped mid-call has none.
        return self.tests.setdefault(report.nodeid, {
            "nodeid": report.nodeid, "outcome": "", "reason": "", "duration": 0.0, "stats": {},
        })

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        e = self._entry(report)
        e["duration"] += report.duration
        for key, val in report.user_properties:
            if key == "stats" and isinstance(val, dict):
                e["stats"].update(val)
        if report.skipped:
            if hasattr(report, "wasxfail"):
                e["outcome"], e["reason"] = "xfailed", report.wasxfail
            elif e["outcome"] in ("", "passed"):
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                e["outcome"], e["reason"] = "skipped", reason.removeprefix("Skipped: ")
        elif report.failed:
            kind = "failed" if report.when == "call" else "error"
            if e["outcome"] not in ("failed", "error"):
                e["outcome"] = kind
                msg = ""
                crash = getattr(report.longrepr, "reprcrash", None)
                if crash is not None:
                    msg = crash.message
                e["reason"] = _first_line(msg or report.longreprtext)
                if report.when != "call":
                    e["reason"] = f"{report.when}: {e['reason']}"
                override = [v for k, v in report.user_properties if k == OUTCOME_PROPERTY]
                if override:
                    e["outcome"] = override[0]
        elif report.passed and hasattr(report, "wasxfail") and report.when == "call":
            e["outcome"], e["reason"] = "xpassed", report.wasxfail
        elif report.passed and report.when == "call":
            absent = [v for k, v in report.user_properties if k == "known_issue_absent"]
            if absent:
                e["outcome"], e["reason"] = "known-absent", absent[0]
            else:
                e["outcome"] = "passed"
        if report.nodeid != self.running:   # a row of no test (a splat between tests): noted now
            self._note({"test": e})

    @pytest.hookimpl(trylast=True)  # after the rows other plugins report at session end
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        for e in self.tests.values():
            if not e["outcome"]:
                e["outcome"], e["reason"] = STOPPED_TEST
        data = {"exitstatus": int(session.exitstatus), "seconds": round(time.time() - self.started, 2),
                "collected": session.testscollected, "splat_watch": splat_watch_state(session.config),
                "scale": _scale(session.config),
                "tests": list(self.tests.values())}
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(data, f, indent=1)
        except BrokenPipeError:
            return  # `kvmpy selftest` reads them through a pipe and has died: nobody is left to tell
        if self.progress:
            self.progress.close()
            if self.own_progress:
                with contextlib.suppress(OSError):
                    os.unlink(self.progress_path)


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption(RESULTS_OPTION)
    if path:
        config.pluginmanager.register(_Recorder(path, config.getoption(PROGRESS_OPTION)), "kvmpy-results-recorder")
