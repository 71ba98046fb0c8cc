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

import dataclasses
import errno
import os
import re
import shutil
import subprocess
from typing import Iterable, List, Optional, Tuple

import pytest

from kvmpy.selftest import known_issues, results

#: The first line of a report that means the kernel is unhappy.
SPLAT_RE = re.compile(
    r"^(?:"
    r"WARNING: |"                 # WARN_ON, lockdep ("WARNING: possible circular locking")
    r"BUG: |kernel BUG at |"       # BUG_ON, KASAN ("BUG: KASAN: ..."), sleeping in atomic
    r"Oops|general protection fault|"
    r"KASAN: |UBSAN: |KFENCE: |"
    r"Kernel panic - |"
    r"(?:rcu: )?INFO: rcu_\w+ (?:self-)?detected stall|"
    r"INFO: task \S+ blocked for more than|"
    r"watchdog: BUG: soft lockup"
    r")"
)
# Lines quoted after the first line of a splat.
QUOTE_LINES = 30
_END_RE = re.compile(r"^---\[ end trace")
# util-linux `dmesg -r`: "<prio>[  123.456789] message"
_DMESG_RAW_RE = re.compile(r"^<(\d+)>\[\s*(\d+\.\d+)\]\s?(.*)$")
# plain dmesg / console: "[  123.456789] message"
_DMESG_TS_RE = re.compile(r"^\[\s*\d+\.\d+\]\s?")


@dataclasses.dataclass(frozen=True)
class Record:
    """One kernel log record."""

    facility: int  # 0 = the kernel itself; userspace writes to /dev/kmsg get 1+
    text: str


def parse_kmsg_line(line: str) -> Optional[Record]:
    """Parse one /dev/kmsg record ("prio,seq,usec,flags;text"); None for others."""
    if not line or line[0] == " ":  # continuation lines carry key=value metadata
        return None
    head, sep, text = line.partition(";")
    if not sep:
        return None
    try:
        prio = int(head.split(",", 1)[0])
    except ValueError:
        return None
    return Record(prio >> 3, text)


def find_splats(records: Iterable[Record]) -> List[str]:
    """Quotes of the kernel splats in ``records`` (kernel facility only)."""
    lines = [r.text for r in records if r.facility == 0]
    splats = []
    i = 0
    while i < len(lines):
        if SPLAT_RE.match(lines[i]):
            end = min(len(lines), i + 1 + QUOTE_LINES)
            for j in range(i + 1, end):
                if _END_RE.match(lines[j]):
                    end = j + 1
                    break
                if SPLAT_RE.match(lines[j]):  # the next splat starts: this one was cut short
                    end = j
                    break
            splats.append("\n".join(lines[i:end]))
            i = end
        else:
            i += 1
    return splats


def find_splats_in_text(text: str) -> List[str]:
    """Splats in ``dmesg`` or console text (timestamps stripped)."""
    return find_splats(Record(0, _DMESG_TS_RE.sub("", line)) for line in text.splitlines())


class KmsgReader:
    """Reads the records appended to /dev/kmsg (or a file) since it was opened."""

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self._fd, 0, os.SEEK_END)
        self._pending = ""

    def read_new(self) -> List[Record]:
        records = []
        while True:
            try:
                # /dev/kmsg returns one record per read; a file returns a chunk.
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # ring wrapped: records were lost
                    records.append(Record(0, "(kvmpy: kernel log records lost: ring buffer wrapped)"))
                    continue
                raise
            if not data:
                break
            self._pending += data.decode("utf-8", "replace")
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                rec = parse_kmsg_line(line)
                if rec:
                    records.append(rec)
        return records

    def close(self) -> None:
        os.close(self._fd)


class DmesgReader:
    """Fallback for hosts without a readable /dev/kmsg: `dmesg -r`, by timestamp."""

    def __init__(self) -> None:
        self.path = "dmesg"
        self._last = -1.0
        lines = self._lines()
        if lines:
            self._last = lines[-1][0]

    def _lines(self):
        proc = subprocess.run(["dmesg", "-r"], capture_output=True, text=True, timeout=10,
                              errors="replace")
        if proc.returncode != 0:
            raise OSError(proc.stderr.strip() or f"dmesg exited {proc.returncode}")
        out = []
        for line in proc.stdout.splitlines():
            m = _DMESG_RAW_RE.match(line)
            if m:
                out.append((float(m.group(2)), Record(int(m.group(1)) >> 3, m.group(3))))
        return out

    def read_new(self) -> List[Record]:
        new = [(ts, rec) for ts, rec in self._lines() if ts > self._last]
        if new:
            self._last = new[-1][0]
        return [rec for _, rec in new]

    def close(self) -> None:
        pass


def open_reader(path: Optional[str] = None):
    """A reader for the kernel log, or raise OSError saying why there is none."""
    path = path or os.environ.get("KVMPY_KMSG") or "/dev/kmsg"
    try:
        return KmsgReader(path)
    except OSError as exc:
        first = exc
    if path == "/dev/kmsg" and shutil.which("dmesg"):
        try:
            return DmesgReader()
        except (OSError, subprocess.SubprocessError):
            pass
    hint = ""
    if first.errno in (errno.EPERM, errno.EACCES):
        hint = " (run as root, or sysctl kernel.dmesg_restrict=0)"
    raise OSError(f"cannot read the kernel log {path}: {first.strerror}{hint}")


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
