"""Kernel-splat watch: fail the test during which the kernel logged a splat.

A KVM patch that trips a WARN_ON (or KASAN, lockdep, a BUG, an RCU stall...)
must fail the suite even when every assertion held.  This pytest plugin reads
the kernel log (``/dev/kmsg``, non-blocking, from its end) after each test
phase and turns a new splat into a failure of that phase, quoting it.  When
nothing was logged the check is a single ``read()`` that returns EAGAIN.

Register it with ``pytest_plugins = ["kvmpy.selftest.splat"]`` or
``-p kvmpy.selftest.splat``; disable it with ``--no-splat-watch``.  When the
kernel log cannot be read (no root, ``kernel.dmesg_restrict=1``) the watch
says so once, in the header and the summary, and lets the tests run.
``$KVMPY_KMSG`` names another log to watch (a file in the plugin's own tests).
"""

from __future__ import annotations

import subprocess
from typing import List, Optional, Tuple

import pytest

# The parser and the readers live in kvmpy.kernel_log (the bed uses them too);
# re-exported here for the plugin and its callers.
from kvmpy.kernel_log import (  # noqa: F401
    QUOTE_LINES, SPLAT_RE, DmesgReader, KmsgReader, Record, find_splats, find_splats_in_text,
    open_reader, parse_kmsg_line,
)
from kvmpy.selftest import known_issues, results


class SplatWatch:
    """The plugin object: one reader, checked after every test phase.

    A splat during a test fails that test, unless the test's known issue names it
    (``splats`` in known_issues.toml): then it is marked for the known-issue plugin,
    which makes it part of that issue's outcome.  A splat between tests or after the
    last one fails the run as a row of its own.
    """

    def __init__(self) -> None:
        self.reader = None
        self.unavailable: Optional[str] = None
        # (row name, splats) per stretch of kernel log between two tests.
        self.outside: List[Tuple[str, List[str]]] = []
        self.last_test = ""
        try:
            self.reader = open_reader()
        except OSError as exc:
            self.unavailable = str(exc)

    def _drain(self) -> List[str]:
        if self.reader is None:
            return []
        try:
            return find_splats(self.reader.read_new())
        except (OSError, subprocess.SubprocessError) as exc:
            self.unavailable = f"kernel log stopped being readable: {exc}"
            self.reader = None
            return []

    def _drain_outside(self) -> None:
        splats = self._drain()
        if splats:
            where = f"after {self.last_test}" if self.last_test else "before the first test"
            self.outside.append((f"(kernel log {where})", splats))

    def pytest_report_header(self, config):
        if self.unavailable:
            return f"kernel splat watch: OFF, {self.unavailable}"
        return f"kernel splat watch: {self.reader.path}"

    def pytest_runtest_logstart(self, nodeid, location):
        # Whatever arrived between tests belongs to no test; it is reported at the end.
        self._drain_outside()

    def pytest_runtest_logfinish(self, nodeid, location):
        self.last_test = nodeid

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        splats = self._drain()
        if not splats:
            return
        report = outcome.get_result()
        unexplained = []
        for splat in splats:
            explained = call.when == "call" and known_issues.explains_splat(item, splat)
            report.user_properties.append((known_issues.SPLAT_PROPERTY, (splat.splitlines()[0], explained)))
            if explained:
                report.sections.append(("kernel splat (named by the test's known issue)", splat))
            else:
                unexplained.append(splat)
        if not unexplained:
            return
        quote = "\n\n".join(unexplained)
        message = f"kernel splat during {call.when} of {item.nodeid}:\n{quote}"
        report.sections.append(("kernel splat", quote))
        if report.failed:
            report.longrepr = f"{report.longrepr}\n\n{message}"
        else:
            report.outcome = "failed"
            report.longrepr = message
            if hasattr(report, "wasxfail"):
                del report.wasxfail

    @pytest.hookimpl(tryfirst=True)  # before the results and JUnit plugins write their files
    def pytest_sessionfinish(self, session, exitstatus):
        # A splat no test owns still means the kernel broke during the run: a failed row of its own.
        self._drain_outside()
        for row, splats in self.outside:
            results.report_session_row(session.config, row, "\n\n".join(splats))
        if self.outside and session.exitstatus == 0:
            session.exitstatus = 1

    def pytest_terminal_summary(self, terminalreporter):
        if self.unavailable:
            terminalreporter.write_line(f"kernel splat watch: OFF, {self.unavailable}")

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


def pytest_addoption(parser):
    parser.addoption("--no-splat-watch", action="store_true", default=False,
                     help="do not fail tests during which the kernel logged a splat")


def pytest_configure(config):
    if config.getoption("no_splat_watch", False):
        return
    config.pluginmanager.register(SplatWatch(), "kvmpy-splat-watch")


def pytest_unconfigure(config):
    watch = config.pluginmanager.get_plugin("kvmpy-splat-watch")
    if watch is not None:
        watch.close()
        config.pluginmanager.unregister(watch)
