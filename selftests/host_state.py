"""Host state that only the test bed may change, always restored: hugetlb pools, eager page split,
NX huge pages and their recovery.

On a normal host nothing here changes anything: a pool that is too small or a
module parameter with the wrong value is a RequirementError (a skip) naming the
command that would let the test run. Inside ``kvmpy bed`` (:func:`kvmpy.bed_mark.in_bed`:
marks only the bed's own boot leaves, never an environment variable) the pool is
grown or the parameter set for the test.

Every change goes through a :class:`HostChanges` journal, which records a file's
old value before it writes the new one: a failed write, the failure of a later
write in the same step, an exception in the test and Ctrl-C all end with every
value written back, newest first; stop signals wait until that is done.
"""
from __future__ import annotations

import contextlib
import os

from kvmpy.bed_mark import in_bed
from kvmpy.errors import KvmError, RequirementError, require
from kvmpy.hostmem import hugetlb_pool, hugetlb_pool_dir, hugetlb_shortfall
from kvmpy.memory import Hugetlb
from kvmpy.mmu_params import param_on
from kvmpy.stop import stop_signals_deferred

from . import bed_config
from .kernel_changes import TDP_EAGER_SPLIT

EAGER_PARAM = "/sys/module/kvm/parameters/eager_page_split"
NX_PARAM = "/sys/module/kvm/parameters/nx_huge_pages"
NX_RATIO_PARAM = "/sys/module/kvm/parameters/nx_huge_pages_recovery_ratio"
NX_PERIOD_PARAM = "/sys/module/kvm/parameters/nx_huge_pages_recovery_period_ms"
DROP_CACHES = "/proc/sys/vm/drop_caches"
COMPACT_MEMORY = "/proc/sys/vm/compact_memory"


class HostFs:
    """The host's /proc and /sys, under ``root`` (a fake tree in kvmpy's unit tests)."""

    def __init__(self, root: str = "/") -> None:
        self.root = root

    def path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def read(self, path: str) -> str | None:
        """Stripped contents, None if the file cannot be read."""
        try:
            with open(self.path(path)) as f:
                return f.read().strip()
        except OSError:
            return None

    def write(self, path: str, value: str) -> None:
        """Write ``value``; KvmError naming the file and the errno."""
        try:
            with open(self.path(path), "w") as f:
                f.write(value)
        except OSError as e:
            raise KvmError(f"cannot write {value!r} to {path}: {e.strerror}") from None

    def in_bed(self) -> bool:
        return in_bed(self.root)

    def pool(self, page_size: int) -> dict[str, int] | None:
        return hugetlb_pool(page_size, self.root)

    def available(self, page_size: int) -> int:
        pool = self.pool(page_size)
        return 0 if pool is None else pool["free"] - pool["resv"]


HOST = HostFs()


class HostChanges:
    """A journal of host file writes, undone newest first when the ``with`` block ends.

    ``set`` records the file's value before it writes (a file whose value cannot be
    read is not written); ``trigger`` writes an action file (drop_caches) that has
    nothing to restore. Only inside the bed: outside, both refuse.
    """

    def __init__(self, fs: HostFs = HOST) -> None:
        self.fs = fs
        self._old: dict[str, str] = {}      # insertion order: the order of the first writes

    def _check_bed(self, path: str) -> None:
        if not self.fs.in_bed():
            raise KvmError(f"refusing to write {path}: not inside `kvmpy bed`")

    def set(self, path: str, value: str) -> None:
        self._check_bed(path)
        if path not in self._old:
            old = self.fs.read(path)
            if old is None:
                raise KvmError(f"cannot read {path}: not writing a value it could not restore")
            self._old[path] = old
        self.fs.write(path, value)

    def trigger(self, path: str, value: str) -> None:
        self._check_bed(path)
        self.fs.write(path, value)

    def restore(self) -> None:
        """Write every old value back, newest first; KvmError naming those that failed."""
        failed = []
        with stop_signals_deferred():
            while self._old:
                path, old = next(reversed(self._old.items()))
                try:
                    self.fs.write(path, old)
                except KvmError as e:
                    failed.append(str(e))
                del self._old[path]
        if failed:
            raise KvmError("host state not restored: " + "; ".join(failed))

    def __enter__(self) -> "HostChanges":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _mem_total(fs: HostFs) -> str:
    line = (fs.read("/proc/meminfo") or "").split("\n", 1)[0]
    return line.split(":", 1)[1].strip() if ":" in line else "unknown"


def _grow_pool(changes: HostChanges, page_size: int, count: int) -> None:
    """Bed only: grow the pool until ``count`` pages are free (its old size is in the
    journal before the first write).  Never skips, never raises on a shortfall:
    callers check the pool afterwards."""
    fs = changes.fs
    pool = fs.pool(page_size)
    if pool is None or not fs.in_bed() or fs.available(page_size) >= count:
        return
    path = os.path.join(hugetlb_pool_dir(page_size, "/"), "nr_hugepages")
    for _ in range(2):
        changes.set(path, str(pool["total"] + count - (pool["free"] - pool["resv"])))
        if fs.available(page_size) >= count:
            break
        # Earlier allocations leave memory fragmented: drop caches and compact, then retry.
        changes.trigger(DROP_CACHES, "3")
        changes.trigger(COMPACT_MEMORY, "1")


@contextlib.contextmanager
def reserved_in_bed(*wants: tuple[int, int], fs: HostFs = HOST):
    """Bed only, best effort: reserve ``(page_size, count)`` hugetlb pages for a whole
    module (before its tests fragment memory), restore the pools afterwards."""
    with HostChanges(fs) as changes:
        for page_size, count in wants:
            _grow_pool(changes, page_size, count)
        yield


@contextlib.contextmanager
def hugetlb_pages(page_size: int, count: int, fs: HostFs = HOST):
    """Make ``count`` free hugetlb pages of ``page_size`` available, restoring the pool after.

    On a normal host nothing is reserved: a pool that is too small is a
    RequirementError naming the command to run.  Inside the bed the pool is grown for the test.
    """
    kb = page_size // 1024
    require(fs.pool(page_size) is not None,
            f"no hugetlb pool of {kb}kB pages on this kernel (/sys/kernel/mm/hugepages/hugepages-{kb}kB missing)")
    if fs.available(page_size) >= count:
        yield
        return
    if not fs.in_bed():
        why = hugetlb_shortfall(page_size, count, fs.root)
        raise RequirementError(f"{Hugetlb(page_size).name} backing: {why} "
                               f"(kvmpy reserves hugetlb pages only inside `kvmpy bed`)")
    with HostChanges(fs) as changes:
        _grow_pool(changes, page_size, count)
        require(fs.available(page_size) >= count,
                f"bed: needed {count} free {kb}kB huge pages, the kernel could provide only "
                f"{fs.available(page_size)} even after compaction (bed memory: {_mem_total(fs)}; a 1G page needs "
                f"1 GiB of contiguous free memory: boot with hugepagesz=1G hugepages=1, or --mem 4G+)")
        yield


@contextlib.contextmanager
def eager_page_split(want: bool, fs: HostFs = HOST):
    """Run with kvm.eager_page_split == ``want``: set (and restore) it inside the bed only.

    On a normal host the parameter is global to every VM, so it is never
    changed: a different value is a RequirementError. Inside the bed too when the
    boot fixed it (a matrix row, or --param: selftests/bed_config.py).
    """
    value = fs.read(EAGER_PARAM)
    require(value is not None, f"{EAGER_PARAM} is missing (kvm not loaded, or a kernel older than "
                               f"{TDP_EAGER_SPLIT.first}, which added it with {TDP_EAGER_SPLIT})")
    cur = param_on(value)
    if cur == want:
        yield
        return
    if fs.in_bed() and bed_config.boot_fixes("kvm.eager_page_split"):
        bed_config.require_param("kvm.eager_page_split", "Y" if want else "N", value)
    require(fs.in_bed(), f"needs kvm.eager_page_split={'Y' if want else 'N'}, the host has "
                         f"{'Y' if cur else 'N'}; kvmpy changes it only inside `kvmpy bed` "
                         f"(or run with --param kvm.eager_page_split={'Y' if want else 'N'})")
    with HostChanges(fs) as changes:
        changes.set(EAGER_PARAM, "Y" if want else "N")
        yield


@contextlib.contextmanager
def nx_huge_pages(fs: HostFs = HOST):
    """Run with kvm.nx_huge_pages=Y and its recovery worker stopped (ratio 0); yields
    ``start_recovery(period_ms)``, which makes the worker zap every NX-split shadow page each
    ``period_ms`` (ratio 1). Bed only, and not in a boot that fixed these parameters: the
    test must see the split before the worker can undo it, so it changes them as it goes.
    Everything is restored afterwards.
    """
    params = {NX_PARAM: "kvm.nx_huge_pages", NX_RATIO_PARAM: "kvm.nx_huge_pages_recovery_ratio",
              NX_PERIOD_PARAM: "kvm.nx_huge_pages_recovery_period_ms"}
    values = {path: fs.read(path) for path in params}
    for path, value in values.items():
        require(value is not None, f"{path} is missing (kvm not loaded, or a kernel without it)")
    require(fs.in_bed(), "needs kvm.nx_huge_pages=Y and its recovery worker started and stopped by the "
                         "test; kvmpy changes them only inside `kvmpy bed`: run `kvmpy selftest --bed`")
    fixed = [name for name in params.values() if bed_config.boot_fixes(name)]
    require(not fixed, f"changes {', '.join(params.values())} as it runs, which {bed_config.setting()} "
                       "fixes: one default boot (`kvmpy selftest --bed`) runs it")
    with HostChanges(fs) as changes:
        changes.set(NX_RATIO_PARAM, "0")        # first: no recovery while the test splits
        if not param_on(values[NX_PARAM]):
            changes.set(NX_PARAM, "Y")          # zaps every VM's SPTEs: before the test's VM exists

        def start_recovery(period_ms: int) -> None:
            changes.set(NX_PERIOD_PARAM, str(period_ms))
            changes.set(NX_RATIO_PARAM, "1")    # wakes the worker (recovery was off)
        yield start_recovery
