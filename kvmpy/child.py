"""Child processes that do not outlive kvmpy: the parent-death signal, in one place.

A test bed machine gets SIGKILL when the harness dies (nothing in it needs to
unwind; :mod:`kvmpy.bed.machine`); the pytest of ``kvmpy selftest`` gets SIGTERM,
so that it unwinds and restores the host (:mod:`kvmpy.selftest.runner`).
"""
from __future__ import annotations

import ctypes
import os
from typing import Callable

PR_SET_PDEATHSIG = 1

# Resolved here, in the parent: a child between fork and exec only calls it.
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def set_parent_death_signal(sig: int, parent: int) -> None:
    """In a child before exec: get ``sig`` when ``parent`` dies (even by SIGKILL).

    If the parent is already gone (it died before this took effect), exit now.
    """
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(128 + int(sig))


def die_with_parent(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` for a child that must not outlive this process: it gets ``sig``."""
    parent = os.getpid()
    return lambda: set_parent_death_signal(sig, parent)
