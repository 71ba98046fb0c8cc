"""A memory cgroup (v2) holding the test process, for tests of KVM under memory pressure: bed only.

KVM charges what it allocates for a VM with GFP_KERNEL_ACCOUNT (shadow pages and
the caches they come from, rmap descriptors, dirty bitmaps) to the memory cgroup
of the task in the ioctl.  :func:`memory_cgroup` moves this process (all its
threads: the VM's vCPU threads too) into a new child of the cgroup v2 root,
which the bed's init mounts with the memory controller on, sets its
oom_score_adj to -1000 (through host_state's journal) so that a charge over
memory.max fails with ENOMEM instead of OOM-killing pytest, and puts
everything back afterwards, also on failure and Ctrl-C.

:meth:`MemoryCgroup.limited` runs one operation under memory.max =
memory.current + margin.  A small helper process outside the group lifts the
limit when signalled right after the operation: once the group is at its
limit, this process cannot even fault in a page of its own heap (the fault is
retried until memory is freed), so it must not be the one that lifts it.  The
helper lifts it by itself after LIFT_TIMEOUT seconds if no signal comes.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import Iterator

from kvmpy.bed_mark import in_bed
from kvmpy.errors import RequirementError, require
from kvmpy.stop import stop_signals_deferred

from .host_state import HostChanges

CGROUP_ROOT = "/sys/fs/cgroup"
LIFT_TIMEOUT = 300.0

# The helper: armed by SIGUSR1 (a limit is set), lifts it at SIGUSR2 or after the timeout
# ("lifted" / "timeout" on stdout), ends at SIGTERM.  Signals need no memory to deliver.
_LIFTER = r"""
import signal, sys
path, timeout = sys.argv[1], float(sys.argv[2])
USR1, USR2, TERM = signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM
signal.pthread_sigmask(signal.SIG_BLOCK, {USR1, USR2, TERM})
print("ready", flush=True)
while True:
    sig = signal.sigwait({USR1, USR2, TERM})
    if sig == TERM:
        break
    if sig == USR2:             # late: the timeout closed its window already
        continue
    info = signal.sigtimedwait({USR2, TERM}, timeout)
    with open(path, "w") as f:
        f.write("max")
    print("lifted" if info else "timeout", flush=True)
    if info and info.si_signo == TERM:
        break
"""


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class MemoryCgroup:
    """The child group this process runs in (see :func:`memory_cgroup`)."""

    def __init__(self, path: str, lifter: subprocess.Popen) -> None:
        self.path = path
        self._lifter = lifter
        self.lifted_by_timeout = False

    def current(self) -> int:
        """memory.current: bytes charged to the group now."""
        return int(_read(f"{self.path}/memory.current"))

    def events(self) -> dict[str, int]:
        """memory.events: how often the group hit memory.max ("max"), invoked the OOM killer
        ("oom"), and how many tasks that killed ("oom_kill")."""
        return {k: int(v) for k, v in (line.split() for line in _read(f"{self.path}/memory.events").splitlines())}

    @contextlib.contextmanager
    def limited(self, margin: int) -> Iterator[int]:
        """Run the block under memory.max = memory.current + ``margin`` (yielded); the helper
        lifts it again right after (or after LIFT_TIMEOUT s: ``lifted_by_timeout``).

        Reclaimable memory of the group (page cache) is reclaimed first, so the block cannot
        get more by reclaiming it.  Charges the kernel batches per CPU (up to 64 pages each,
        MEMCG_CHARGE_BATCH) are in memory.current already but unused: the block may get up to
        that much more than ``margin``."""
        with contextlib.suppress(OSError):      # EAGAIN: not all of it was reclaimable
            _write(f"{self.path}/memory.reclaim", str(1 << 30))
        limit = self.current() + margin
        _write(f"{self.path}/memory.max", str(limit))
        os.kill(self._lifter.pid, signal.SIGUSR1)
        try:
            yield limit
        finally:
            os.kill(self._lifter.pid, signal.SIGUSR2)
            answer = self._lifter.stdout.readline().strip()
            self.lifted_by_timeout = answer == "timeout"
            if answer not in ("lifted", "timeout"):
                _write(f"{self.path}/memory.max", "max")
                raise RuntimeError(f"memory.max lifter answered {answer!r} (exit {self._lifter.poll()})")


def start_lifter(max_path: str, timeout: float = LIFT_TIMEOUT) -> subprocess.Popen:
    """The helper that writes "max" to ``max_path`` when signalled (see MemoryCgroup.limited)."""
    lifter = subprocess.Popen([sys.executable, "-c", _LIFTER, max_path, str(timeout)],
                              stdout=subprocess.PIPE, text=True)
    if lifter.stdout.readline().strip() != "ready":
        raise RuntimeError(f"memory.max lifter did not start (exit {lifter.wait()})")
    return lifter


def stop_lifter(lifter: subprocess.Popen) -> None:
    lifter.terminate()
    lifter.wait(30)
    lifter.stdout.close()


def _own_cgroup() -> str:
    for line in _read("/proc/self/cgroup").splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT + line[3:].rstrip("/")
    raise RequirementError("this process is in no cgroup v2 group (/proc/self/cgroup has no 0:: line)")


@contextlib.contextmanager
def memory_cgroup() -> Iterator[MemoryCgroup]:
    """This process in a new memory cgroup, unkillable by the OOM killer, for the block; bed only."""
    require(in_bed(), "puts the test process into a memory-limited cgroup: only inside `kvmpy bed` "
                      "(kvmpy selftest --bed)")
    controllers = f"{CGROUP_ROOT}/cgroup.subtree_control"
    require(os.path.exists(controllers) and "memory" in _read(controllers).split(),
            f"no cgroup v2 memory controller for child groups ({controllers}): the bed's init mounts "
            "cgroup2 on /sys/fs/cgroup and enables it")
    home = _own_cgroup()
    path = f"{CGROUP_ROOT}/kvmpy-{os.getpid()}"
    with HostChanges() as changes:                  # restores oom_score_adj last
        lifter = None
        made = moved = False
        try:
            with stop_signals_deferred():           # a Ctrl-C now comes after `made` is set
                os.mkdir(path)
                made = True
            # Started before this process moves, so it stays outside the group it will rescue.
            lifter = start_lifter(f"{path}/memory.max")
            changes.set("/proc/self/oom_score_adj", "-1000")
            _write(f"{path}/cgroup.procs", str(os.getpid()))
            moved = True
            yield MemoryCgroup(path, lifter)
        finally:
            with stop_signals_deferred():           # a second Ctrl-C must not cut the clean-up short
                try:
                    with contextlib.suppress(OSError):
                        _write(f"{path}/memory.max", "max")
                    if moved:
                        _write(f"{home}/cgroup.procs", str(os.getpid()))
                finally:
                    if lifter is not None:
                        stop_lifter(lifter)
                    if made:
                        os.rmdir(path)
