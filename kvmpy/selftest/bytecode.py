"""The suite's bytecode, compiled on the host before a bed boots.

Inside the QEMU bed the host's tree is read over 9p, and whatever Python writes there goes
to an overlay that dies with the boot: without .pyc files on the host, every boot compiles
kvmpy's modules and pytest rewrites the asserts of every test module again, under TCG
(about 10 s of each boot's start, measured with cProfile inside the bed). Done here,
natively, it takes about a second (the collection; compiling skips what is up to date).

What is written is what Python itself writes next to its sources (``__pycache__``, ignored
by git), and the bed checks it as Python does (mtime and size; pytest's by source hash), so
a stale file is never used. Running as root in a tree someone else owns, the files written
are given to the tree's owner.
"""
from __future__ import annotations

import compileall
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, List

from kvmpy import faults
from kvmpy.selftest.runner import pytest_command, selftests_dir

COLLECT_TIMEOUT = 120.0


def compile_suite(log: Callable[[str], None], suite: Path | None = None) -> bool:
    """Byte-compile kvmpy and the selftests (or ``suite``), with pytest's assertion rewriting, in place.

    Best effort: returns False (and says why through ``log``) when the tree is not writable
    or the collection failed; the bed then compiles for itself, as before.
    """
    suite = suite or selftests_dir()
    package = Path(__file__).resolve().parent.parent
    roots = [package, suite]
    unwritable = [str(r) for r in roots if not os.access(r, os.W_OK)]
    if unwritable:
        log(f"bytecode: {', '.join(unwritable)} not writable; the bed compiles the suite itself")
        return False
    ok = all(compileall.compile_dir(str(r), quiet=2, workers=1) for r in roots)
    ok = _rewrite_tests(suite) and ok
    _give_to_owner(roots)
    if not ok:
        log("bytecode: could not compile all of the suite on the host; the bed compiles the rest")
    return ok


def _rewrite_tests(suite: Path) -> bool:
    """Collect the suite with the bed's pytest command so that pytest writes its rewritten
    test modules and plugins (it rewrites while importing them, and writes only when asked)."""
    with tempfile.TemporaryDirectory(prefix="kvmpy-collect-") as tmp:
        cmd = pytest_command(os.path.join(tmp, "results.json"), None, None, ["--collect-only", "-q"],
                             suite=suite)
        # Bytecode written, and no injected fault: this is a build step, not a test run.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", faults.ENV)}
        try:
            proc = subprocess.run(cmd, env=env, cwd=str(suite.parent), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=COLLECT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return proc.returncode == 0


def _give_to_owner(roots: List[Path]) -> None:
    """As root in another user's tree, hand the ``__pycache__`` we created to that user."""
    if os.geteuid() != 0:
        return
    for root in roots:
        owner = root.stat()
        if owner.st_uid == 0:
            continue
        for cache in root.rglob("__pycache__"):
            for path in [cache, *cache.iterdir()]:
                st = path.lstat()
                if st.st_uid == 0:
                    os.lchown(path, owner.st_uid, owner.st_gid)
