"""pytest plugin for the suite as `kvmpy selftest` runs it (on the host and in the bed).

Three rules that make the verdict honest, wherever pytest runs:

- Nothing tested is never green. Before the first test the run checks that
  /dev/kvm can be opened and used (open, KVM_GET_API_VERSION, KVM_CREATE_VM).
  If not, no test runs and one "(not tested)" row names the cause; the report
  turns it into exit 2.
- A stop signal unwinds. SIGTERM (also what `kvmpy selftest` forwards, and what
  the child gets when its parent dies) becomes KeyboardInterrupt, like Ctrl-C, so
  ``finally`` blocks and fixture teardowns restore the host and pytest writes the
  results and the JUnit file; a kernel alarm bounds how long that may take.
- A run with faults injected (kvmpy.faults, ``KVMPY_FAULTS``) says so in its
  header; an unknown fault name is a usage error, not a run without it.
"""
from __future__ import annotations

import signal
import threading

import pytest

from kvmpy import faults
from kvmpy.selftest.report import NOT_TESTED
from kvmpy.selftest.results import report_session_row
from kvmpy.stop import STOP_SIGNALS

NOT_TESTED_ROW = "(not tested)"
# Seconds a stopped run may spend unwinding before SIGALRM's default action ends it.
UNWIND_SECONDS = 10


def kvm_unusable(path: str = "/dev/kvm") -> str:
    """Why ``path`` cannot run a VM, or '' when it can (opened, API version checked, a VM created)."""
    from kvmpy.errors import KvmError
    from kvmpy.kvm import Kvm

    try:
        with Kvm(path) as kvm, kvm.create_vm():
            return ""
    except (KvmError, OSError) as e:
        return str(e)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session):
    if session.config.option.collectonly:
        return None
    cause = kvm_unusable()
    if not cause:
        return None
    n = session.testscollected
    report_session_row(session.config, NOT_TESTED_ROW,
                       f"not tested: {cause}\nnone of the {n} selected test{'s' if n != 1 else ''} ran: "
                       f"they need a usable /dev/kvm", outcome=NOT_TESTED)
    return True  # the tests do not run: each would only skip for the same reason


def _unwind(signo: int, _frame) -> None:
    # Later signals must not cut the unwinding short; the alarm bounds it.
    for other in _STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    signal.alarm(UNWIND_SECONDS)
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signo).name}")


_STOP_SIGNALS = tuple(s for s in STOP_SIGNALS if s != signal.SIGINT)   # pytest handles SIGINT itself
_saved = pytest.StashKey[dict]()


def pytest_report_header(config: pytest.Config) -> str | None:
    line = faults.banner("this run tests the tests")
    return f"kvmpy {line}" if line else None


def pytest_configure(config: pytest.Config) -> None:
    try:
        faults.enabled()
    except faults.FaultError as e:
        raise pytest.UsageError(str(e)) from None
    if threading.current_thread() is threading.main_thread():
        config.stash[_saved] = {signo: signal.signal(signo, _unwind) for signo in _STOP_SIGNALS
                                if signal.getsignal(signo) != signal.SIG_IGN}  # nohup: leave SIGHUP ignored


def pytest_unconfigure(config: pytest.Config) -> None:
    for signo, handler in config.stash.get(_saved, {}).items():
        signal.signal(signo, handler)
