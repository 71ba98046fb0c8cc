"""A kernel module parameter set for the length of a measurement, and put back after it."""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Callable, Iterator

from kvmpy.errors import RequirementError
from kvmpy.stop import stop_signals_deferred


@contextmanager
def module_param(module: str, name: str, value: bool | None, out: Callable[[str], None],
                 root: str = "/sys/module") -> Iterator[None]:
    """Set boolean parameter ``module.name`` to ``value`` (None: leave it) until the block ends.

    The old value is written back when the block ends, also on an exception or Ctrl-C.
    RequirementError when the kernel has no such parameter or it cannot be written.
    """
    if value is None:
        yield
        return
    path = f"{root}/{module}/parameters/{name}"
    try:
        with open(path) as f:
            old = f.read().strip()
    except OSError:
        raise RequirementError(f"{module}.{name}: this kernel has no such module parameter ({path})") from None
    new = "Y" if value else "N"
    if old == new:
        yield
        return
    what = f"{module}.{name}"
    changed = False
    try:
        # A stop signal during a write is acted on after it, inside this try: once the new
        # value is written, nothing (a Ctrl-C, a failed printout) skips the restore.
        with stop_signals_deferred():
            _write(path, new, what)
            changed = True
        out(f"{what}: {old} -> {new} for this run")
        yield
    finally:
        if changed:
            with stop_signals_deferred():
                _write(path, old, what)
            out(f"{what}: back to {old}")


def _write(path: str, value: str, what: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM):
            why = ""
        elif os.geteuid():
            why = " (needs root)"
        else:
            why = " (read-only on this kernel: set it when the module is loaded)"
        raise RequirementError(f"{what}: cannot write {value} to {path}: {e.strerror}{why}") from None
