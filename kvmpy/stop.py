"""How a kvmpy command stops: the signals that stop it and the exit status each gives.

Kept apart from the selftest report and runner (which use it) so that every command
can install its stop handlers without importing them.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

# Signals that stop a run: forwarded to a child pytest, which then unwinds (kvmpy.selftest.guard).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_SIGNAL_BASE = 128  # stopped by signal N: 128 + N (130 SIGINT, 143 SIGTERM)


def stop_signals() -> list[int]:
    """The stop signals to act on: all but a SIGHUP the user ignored (``nohup``).

    SIGINT counts even when a shell started us in the background with it ignored:
    a harness asked to stop stops, with its partial results.
    """
    return [s for s in STOP_SIGNALS if s != signal.SIGHUP or signal.getsignal(s) != signal.SIG_IGN]


def signal_name(signo: int) -> str:
    """``SIGTERM`` for 15; ``signal N`` for a number with no name."""
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


def signal_number(name: str) -> int:
    """The inverse of :func:`signal_name` (0 for '')."""
    if not name:
        return 0
    if name.startswith("signal "):
        return int(name.split()[1])
    return int(signal.Signals[name])


def exit_for_signal(signo: int) -> int:
    """The exit status of a run stopped by ``signo``."""
    return EXIT_SIGNAL_BASE + signo


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Stop signals that arrive in the block are acted on after it (main thread only): for
    the writes that put host state back, which a second Ctrl-C must not cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    saved = {}
    try:
        for signo in STOP_SIGNALS:
            saved[signo] = signal.signal(signo, lambda n, _f: got.append(n))
        yield
    finally:
        for signo, handler in saved.items():
            signal.signal(signo, handler)
        for signo in dict.fromkeys(got):
            signal.raise_signal(signo)
