"""A kernel module parameter set for the length of a measurement, and put back after it."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

from kvmpy.errors import RequirementError


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
    _write(path, new, f"{module}.{name}")
    out(f"{module}.{name}: {old} -> {new} for this run")
    try:
        yield
    finally:
        _write(path, old, f"{module}.{name}")
        out(f"{module}.{name}: back to {old}")


def _write(path: str, value: str, what: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise RequirementError(f"{what}: cannot write {value} to {path}: {e.strerror} (needs root)") from None
