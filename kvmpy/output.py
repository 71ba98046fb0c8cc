"""A command's output: stdout (which may be full, a closed pipe or closed) and the files asked for.

A report that does not reach its reader is no verdict: each failure is an OutputError
(exit 2), never a traceback or a silent success.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


class OutputError(Exception):
    """The output (or a file asked for) could not be written."""


def emit(text: str, end: str = "\n") -> None:
    """``text`` on stdout, flushed; OutputError if it cannot be written (a full disk, /dev/full,
    a closed pipe, or stdout closed from the start: ``print()`` would drop it silently)."""
    if sys.stdout is None:
        raise OutputError("cannot write to standard output: it is closed")
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except OSError as e:
        drop_stdout()
        raise OutputError(f"cannot write to standard output: {e.strerror or e}") from None


def drop_stdout() -> None:
    """After a failed write: point stdout at /dev/null, so that what is still buffered does not
    fail again at exit."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass       # not a real file (e.g. captured): nothing buffered will reach a device


def write_file(path: Path, data: bytes, option: str) -> None:
    """Write an output file asked for with ``option`` (``--junit``): OutputError saying why not."""
    try:
        path.write_bytes(data)
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot write: {e.strerror or e}") from None
