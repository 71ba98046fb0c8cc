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
from typing import List, Optional

import pytest

# The parser and the readers live in kvmpy.kernel_log (the bed uses them too);
# re-exported here for the plugin and its callers.
from kvmpy.kernel_log import (  # noqa: F401
    QUOTE_LINES, SPLAT_RE, DmesgReader, KmsgReader, Record, find_splats, find_splats_in_text,
    open_reader, parse_kmsg_line,
)


class SplatWatch:
    """The plugin object: one reader, checked after every test phase."""

    def __init__(self) -> None:
        self.reader = None
        self.unavailable: Optional[str] = None
        self.outside: List[str] = []
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

    def pytest_report_header(self, config):
        if self.unavailable:
            return f"kernel splat watch: OFF, {self.unavailable}"
        return f"kernel splat watch: {self.reader.path}"

    def pytest_runtest_logstart(self, nodeid, location):
        # Whatever arrived between tests belongs to no test; keep it for the summary.
        self.outside += self._drain()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        splats = self._drain()
        if not splats:
            return
        report = outcome.get_result()
        quote = "\n\n".join(splats)
        message = f"kernel splat during {call.when} of {item.nodeid}:\n{quote}"
        report.sections.append(("kernel splat", quote))
        if report.failed:
            report.longrepr = f"{report.longrepr}\n\n{message}"
        else:
            report.outcome = "failed"
            report.longrepr = message
            if hasattr(report, "wasxfail"):
                del report.wasxfail

    def pytest_sessionfinish(self, session, exitstatus):
        # A splat no test owns still means the kernel broke during the run.
        self.outside += self._drain()
        if self.outside and session.exitstatus == 0:
            session.exitstatus = 1

    def pytest_terminal_summary(self, terminalreporter):
        if self.unavailable:
            terminalreporter.write_line(f"kernel splat watch: OFF, {self.unavailable}")
        for splat in self.outside:
            terminalreporter.write_line(f"kernel splat outside any test:\n{splat}", red=True)

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
