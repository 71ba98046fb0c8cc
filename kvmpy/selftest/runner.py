"""`kvmpy selftest`: run the packaged selftests through pytest and build the report.

The host run's pytest is a child that lives no longer than `kvmpy selftest`: it is
in its own process group (a terminal's Ctrl-C reaches only us, and we forward it
once), it gets SIGTERM when we die (even by SIGKILL), and its results come back
through a pipe, so nothing is left on disk either (its progress lines, through a second
one). Only a child stuck in the kernel, which no signal ends, is left behind, with the
report saying where its threads wait.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvmpy.child import set_parent_death_signal
from kvmpy.selftest.progress import STOPPED_TEST, add_unfinished
from kvmpy.selftest.report import RunResults
from kvmpy.stop import signal_name, stop_signals

# pytest exit codes that mean the harness, not a test, went wrong.
PYTEST_HARNESS_ERRORS = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}
# Seconds pytest gets to unwind after a forwarded signal (fixture teardowns, host restores).
GRACE_SECONDS = 15.0
# Seconds to wait, once pytest has exited, for the end of its results.
RESULTS_WAIT_SECONDS = 10.0
# Seconds a SIGKILLed pytest gets to die: one that does not is stuck in the kernel (a KVM
# deadlock puts its threads in uninterruptible sleep), and waiting longer would hang us too.
KILL_WAIT_SECONDS = 10.0


def pytest_harness_error(exitstatus: int | None) -> str:
    """The harness error of a pytest that exited ``exitstatus`` with its results written ('' for
    an exit status of tests: 0 or 1)."""
    if exitstatus not in PYTEST_HARNESS_ERRORS:
        return ""
    return f"pytest: {PYTEST_HARNESS_ERRORS[exitstatus]} (exit {exitstatus})"


def selftests_dir() -> Path:
    """The selftests: the source tree's ``selftests/`` or the installed ``kvmpy/selftests``."""
    pkg = Path(__file__).resolve().parent.parent
    for candidate in (pkg.parent / "selftests", pkg / "selftests"):
        if (candidate / "conftest.py").exists():
            return candidate
    raise FileNotFoundError(f"kvmpy selftests not found next to {pkg} (broken install?)")


def pytest_command(results_json: str, junit: str | None, keyword: str | None,
                   extra: list[str] | None = None, python: str | None = None,
                   suite: Path | None = None, progress: str | None = None) -> list[str]:
    """The pytest command line used on the host and inside the bed (on ``suite``, default the
    selftests); ``progress``: where the progress lines go (default: beside the results)."""
    cmd = [python or sys.executable, "-m", "pytest", str(suite or selftests_dir()), "-v", "-rN", "--tb=short",
           "-p", "no:cacheprovider", "-p", "kvmpy.selftest.results", "-p", "kvmpy.selftest.guard",
           "-p", "kvmpy.selftest.parts",
           f"--kvmpy-results={results_json}"]
    if progress:
        cmd.append(f"--kvmpy-progress={progress}")
    if junit:
        cmd.append(f"--junitxml={junit}")
    if keyword:
        cmd += ["-k", keyword]
    return cmd + list(extra or [])


def _child_setup(parent: int):
    """``preexec_fn`` of the pytest child: own process group, SIGTERM when the parent dies.

    SIGINT gets its default back: a shell starts background jobs with it ignored, and
    the child must see the SIGINT we forward (its own process group shields it from others).
    """

    def setup() -> None:
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        set_parent_death_signal(signal.SIGTERM, parent)

    return setup


def _wait(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for ``proc``, forwarding the first stop signal; return (that signal or 0, what went wrong).

    The child gets a grace period to unwind (GRACE_SECONDS); a second signal, or the
    end of the grace period, kills it. One that SIGKILL does not end within
    KILL_WAIT_SECONDS is left behind, stuck in the kernel: what goes wrong says where.
    """
    got: list[int] = []
    killed: list[float] = []

    def kill() -> None:
        proc.kill()
        killed.append(time.monotonic())

    def forward(signo: int, _frame) -> None:
        if got:
            kill()  # asked twice: stop waiting for the cleanup
            return
        got.append(signo)
        proc.send_signal(signal.SIGINT if signo == signal.SIGINT else signal.SIGTERM)

    main = threading.current_thread() is threading.main_thread()
    saved = {signo: signal.signal(signo, forward) for signo in stop_signals()} if main else {}
    problem = ""
    try:
        deadline = None
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if got and deadline is None:
                    deadline = time.monotonic() + GRACE_SECONDS
                if deadline is not None and time.monotonic() > deadline and not killed:
                    problem = f"pytest did not stop within {GRACE_SECONDS:.0f} s of {signal_name(got[0])}: killed"
                    kill()
                if killed and time.monotonic() > killed[0] + KILL_WAIT_SECONDS:
                    problem = (f"{problem or f'pytest killed on a second {signal_name(got[-1])}'}; it did not die "
                               f"within {KILL_WAIT_SECONDS:.0f} s of SIGKILL: pid {proc.pid} is stuck in the kernel "
                               f"and left behind ({stuck_in(proc.pid)})")
                    break
    finally:
        for signo, handler in saved.items():
            signal.signal(signo, handler)
    if got and proc.returncode == -signal.SIGKILL and not problem:
        problem = f"pytest killed on a second {signal_name(got[-1])}"
    return (got[0] if got else 0), problem


def stuck_in(pid: int) -> str:
    """Where the threads of process ``pid`` wait in the kernel: each one's state and wait
    channel, and for those in uninterruptible sleep the top of their kernel stack (as root)."""
    where = []
    try:
        tasks = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as e:
        return f"/proc/{pid}/task: {e.strerror}"
    for tid in tasks:
        task = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{task}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            with open(f"{task}/wchan") as f:
                wchan = f.read().strip()
        except (OSError, IndexError):
            continue
        line = f"thread {tid} {state} in {wchan}" if wchan not in ("", "0") else f"thread {tid} {state}"
        if state == "D":
            try:
                with open(f"{task}/stack") as f:
                    frames = [fr.split("] ", 1)[-1].split("+")[0] for fr in f.read().splitlines()[:4]]
                line += f" [{' < '.join(frames)}]"
            except OSError:
                pass
        where.append(line)
    return "; ".join(where) or "no thread left to show"


def run_host(junit: str | None = None, keyword: str | None = None, extra: list[str] | None = None,
             config: str = "host", machine_output: bool = False) -> RunResults:
    """Run the suite against this host's /dev/kvm, streaming pytest's per-test lines.

    With ``machine_output`` pytest's own output goes to stderr, keeping stdout for JSON/KTAP.
    A stop signal (SIGINT, SIGTERM, SIGHUP) is forwarded to pytest; the results it recorded
    until then come back marked as interrupted by that signal.
    """
    # The results, and the progress lines that show what a pytest killed before its end had done.
    (read_end, write_end), (progress_read, progress_write) = os.pipe(), os.pipe()
    cmd = pytest_command(f"/proc/self/fd/{write_end}", junit, keyword, extra,
                         progress=f"/proc/self/fd/{progress_write}")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=str(selftests_dir().parent), pass_fds=(write_end, progress_write),
                                stdout=sys.stderr if machine_output else None,
                                preexec_fn=_child_setup(os.getpid()))
    except BaseException:
        os.close(read_end)
        os.close(progress_read)
        raise
    finally:
        os.close(write_end)
        os.close(progress_write)
    chunks: list[bytes] = []
    progress: list[bytes] = []
    readers = [threading.Thread(target=_read_all, args=(fd, out), daemon=True)
               for fd, out in ((read_end, chunks), (progress_read, progress))]
    for reader in readers:
        reader.start()
    signo, problem = _wait(proc)
    until = time.monotonic() + RESULTS_WAIT_SECONDS
    for reader in readers:      # a process pytest left behind (or pytest stuck) may still hold the pipes
        reader.join(timeout=max(0.0, until - time.monotonic()))
    raw = b"".join(chunks).decode(errors="replace")
    try:
        run = RunResults.from_json(config, raw) if raw else None
    except ValueError as e:
        run, problem = None, problem or f"pytest's results are unreadable ({e})"
    if run is None:
        killed = proc.returncode is not None and proc.returncode < 0
        how = f"killed by {signal_name(-proc.returncode)}" if killed else "see output above"
        run = RunResults(config, exitstatus=proc.returncode, interrupted=signo,
                         harness_error=problem or f"pytest exited {proc.returncode} without results ({how})")
        # What its progress lines show: the test it hung in is named.
        ended = f"was {how}" if killed else f"exited {proc.returncode}"
        add_unfinished(run, b"".join(progress).decode(errors="replace"),
                       *(STOPPED_TEST if signo else ("failed", f"did not finish: pytest {ended}")))
        return run
    run.interrupted = signo
    if problem:
        run.harness_error = problem
    elif not signo:
        run.harness_error = pytest_harness_error(run.exitstatus)
    return run


def _read_all(fd: int, chunks: list[bytes]) -> None:
    # Chunk by chunk: what arrived is there even if the pipe never reaches EOF.
    try:
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
