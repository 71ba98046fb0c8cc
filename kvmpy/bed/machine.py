"""Running a machine process: tied to the harness's life, its console followed, killed by group.

Both backends start their emulator through these helpers, so that every
machine dies with the harness (even a SIGKILLed one: :func:`kvmpy.child.die_with_parent`
with SIGKILL), a SIGTERM to the harness still cleans up, and a result is completed
the same way (:func:`settle`).
:class:`ConsoleLog` collects the console; :class:`ConsolePrinter` is what a
front end echoes of it (everything, or the command's own output).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from kvmpy.bed.protocol import FOLLOW, MARKER, BedError, ConsoleText, MarkerReader
from kvmpy.bed.request import BedFacts, BedRequest, BedResult
from kvmpy.child import die_with_parent
from kvmpy.stop import stop_signals_deferred


@contextlib.contextmanager
def exit_on_sigterm():
    """Turn SIGTERM/SIGHUP into SystemExit for the duration, so cleanup runs.

    Python's default SIGTERM action ends the process without running
    ``finally`` blocks, which would leave the machine's temporary directory
    behind (``timeout kvmpy bed ...`` sends SIGTERM).  Handlers the program
    installed itself are left alone; so is everything outside the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    saved = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


#: Console text a ConsoleLog keeps (the init's markers are kept past it): a kernel printing in a
#: loop must not fill the host's memory. Past it the boot is an error (BedResult.bed_problems).
MAX_CONSOLE_BYTES = 512 << 20
#: Longest line: output with no newline is cut into lines of this size (one split, not one per chunk).
MAX_LINE_BYTES = 1 << 20


class ConsoleLog:
    """A machine's console, fed in chunks: whole lines, echoed, with the bed's markers noted.

    Markers are read strictly (:class:`kvmpy.bed.protocol.MarkerReader`: at the start of a
    line, with the boot's nonce), so what the command prints cannot end the boot early.
    ``hide`` is an optional (begin, end) pair of marker kinds whose lines, inclusive,
    are kept but not echoed (e.g. a base64 block of result files). Lines of followed
    results files (:data:`FOLLOW`) are neither kept nor echoed but collected in ``followed``.
    An echo (``on_console``) that raises (a closed pipe: ``kvmpy bed run ... | head``) is
    dropped, the error kept in ``echo_error``: the boot and its results go on. Past
    ``max_bytes`` of text only marker lines are kept; :meth:`text` says what was dropped.
    """

    def __init__(self, request: BedRequest, start: float, hide: Optional[Tuple[str, str]] = None,
                 max_bytes: int = MAX_CONSOLE_BYTES) -> None:
        self.lines: List[str] = []
        self.kept_bytes = 0
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self._max_bytes = max_bytes
        #: Followed results file name -> its lines, as they came over the console.
        self.followed: Dict[str, List[str]] = {}
        self.boot: Optional[float] = None        # seconds from start to the 'ready' marker
        self.exit_seen_at: Optional[float] = None
        self.echo_error: Optional[BaseException] = None
        self._pending = ""
        self._start = start
        self._echo = request.on_console
        self._hide = hide
        self._hiding = False
        self._markers = MarkerReader(strict=True)

    def feed(self, data: bytes) -> None:
        self._pending += data.decode("utf-8", "replace").replace("\r", "")
        *lines, self._pending = self._pending.split("\n")
        while len(self._pending) > MAX_LINE_BYTES:
            lines.append(self._pending[:MAX_LINE_BYTES])
            self._pending = self._pending[MAX_LINE_BYTES:]
        for line in lines:
            at = line.find(FOLLOW)
            if at >= 0:
                name, _, content = line[at + len(FOLLOW):].partition(" ")
                self.followed.setdefault(name, []).append(content)
                line = line[:at]        # what the kernel printed before it, if anything
                if not line:
                    continue
            marker = self._markers.read(line)
            kind = marker[0] if marker else None
            if marker or not self.dropped_lines and self.kept_bytes + len(line) < self._max_bytes:
                self.lines.append(line)
                self.kept_bytes += len(line) + 1
            else:
                self.dropped_lines += 1
                self.dropped_bytes += len(line) + 1
            if self._hide and kind == self._hide[0]:
                self._hiding = True
            if self._echo and not self._hiding:
                self._say(line)
            if self._hide and kind == self._hide[1]:
                self._hiding = False
            if kind == "ready" and self.boot is None:
                self.boot = time.monotonic() - self._start
            elif kind == "exit" and self.exit_seen_at is None:
                self.exit_seen_at = time.monotonic()

    def _say(self, line: str) -> None:
        try:
            self._echo(line)
        except Exception as exc:   # noqa: BLE001 - an echo is a convenience, the results are not
            self.echo_error = exc
            self._echo = None

    def text(self) -> str:
        """Everything received and kept, the unterminated last line included (read strictly)."""
        text = ConsoleText("\n".join(self.lines + ([self._pending] if self._pending else [])) + "\n")
        if self.dropped_lines:
            text.dropped = (f"the console printed more than {self._max_bytes >> 20} MiB: {self.dropped_lines} "
                            f"later lines ({self.dropped_bytes} bytes) were not kept (nor scanned for splats)")
        return text


class ConsolePrinter:
    """Echo console lines: everything, or only the command's own output (with the init's
    errors); each line after ``prefix`` (which bed it came from, when several run at once)
    and written whole."""

    def __init__(self, everything: bool, stream=None, prefix: str = "") -> None:
        self.everything = everything
        self.stream = stream or sys.stdout
        self.prefix = prefix
        self.inside = False
        self._markers = MarkerReader(strict=True)
        self._blank = False   # an empty line held back: the init's own before a marker

    def _print(self, line: str) -> None:
        self.stream.write(f"{self.prefix}{line}\n")
        self.stream.flush()

    def __call__(self, line: str) -> None:
        if self.everything:
            self._print(line)
            return
        marker = self._markers.read(line)
        if self._blank and marker is None and self.inside:
            self._print("")
        self._blank = False
        if marker is None and self.inside and not line:
            self._blank = True
            return
        if marker is not None:
            if marker[0] == "ready":
                self.inside = True
            elif marker[0] == "exit":
                self.inside = False
            elif marker[0] == "error":
                self._print(line)
            return
        if line.startswith(MARKER) and not self.inside:
            return
        if self.inside:
            self._print(line)


# Every machine this process runs, so that a stop (Ctrl-C, SIGTERM) on the main thread can
# kill those that threads of its own started (``--jobs``, kvmpy.bed.parallel).
_machines_lock = threading.Lock()
_machines: Set[subprocess.Popen] = set()
_refusing = False


def start_machine(argv: List[str], **popen: Any) -> subprocess.Popen:
    """Start a machine process in its own process group, dying with the harness (even SIGKILLed).

    Raises BedError after :func:`stop_machines` (the run is stopping: no new machine).
    """
    with _machines_lock:
        if _refusing:
            raise BedError("the run is stopping: no machine started")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGKILL), **popen)
        _machines.add(proc)
    return proc


def stop_machines() -> int:
    """Kill every machine this process runs and refuse new ones until :func:`allow_machines`;
    returns how many were running. Their threads see them end (no exit status) and return."""
    global _refusing
    with _machines_lock:
        _refusing = True
        procs = list(_machines)
    for proc in procs:
        _killpg(proc)
    return len(procs)


def allow_machines() -> None:
    """Let machines start again (a new run after :func:`stop_machines`)."""
    global _refusing
    with _machines_lock:
        _refusing = False


def _killpg(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_machine(proc: subprocess.Popen) -> None:
    """Stop a machine and everything it started, by its process group; reap it. A second stop
    signal meanwhile is acted on after it: it must not cut the kill short."""
    with stop_signals_deferred():
        _killpg(proc)
        try:
            proc.wait(timeout=30)
        finally:
            with _machines_lock:
                _machines.discard(proc)
            if proc.stdout:
                proc.stdout.close()


def boot_failure(result: BedResult) -> str:
    """The most telling line of a boot that never reached the exit marker (``result``: its
    :func:`parse_console`): the init's first error, else a console line."""
    if result.bed_errors:
        return f"error {result.bed_errors[0]}"
    console = result.console
    for pattern in ("Kernel panic", "qemu-system", "BUG:", "not syncing"):
        for line in console.splitlines():
            if pattern in line:
                return line.strip()
    tail = console.strip().splitlines()[-1:] or ["(no console output)"]
    return f"the bed stopped before the command finished; last console line: {tail[0]}"


def settle(result: BedResult, request: BedRequest, machine: BedFacts, start: float, boot: Optional[float],
           timed_out: bool, pid: int, why_no_status: Callable[[], str]) -> BedResult:
    """Fill a result's timing fields, its facts and, when no exit status came back, the reason.

    ``machine`` holds the facts the backend knows from the host side (backend,
    CPU, kernel image); what the bed's kernel reported takes precedence.
    """
    result.facts.complete(machine)
    result.boot_seconds = boot
    result.seconds = time.monotonic() - start
    result.timed_out = timed_out
    result.pid = pid
    if timed_out:
        result.error = f"timed out after {request.timeout:.0f}s"
    elif result.status is None:
        result.error = why_no_status()
    return result
