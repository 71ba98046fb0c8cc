"""The kernel log: its records, the splats in it, and readers of the host's log.

A *splat* is a report that means the kernel is unhappy (WARN_ON, BUG, KASAN,
lockdep, an oops, an RCU stall, ...).  Everything here is free of pytest and
of the bed, so both the per-test watch (:mod:`kvmpy.selftest.splat`) and the
bed (:mod:`kvmpy.bed.request`, which scans a bed kernel's ``dmesg``) use it:

* :func:`parse_kmsg_line` turns a ``/dev/kmsg`` record into a :class:`Record`;
* :func:`find_splats` / :func:`find_splats_in_text` quote the splats in records
  or in ``dmesg``/console text;
* :func:`open_reader` reads what the host kernel logs from now on
  (:class:`KmsgReader`, or :class:`DmesgReader` where /dev/kmsg is unreadable).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import subprocess
from typing import Iterable, List, Optional

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
