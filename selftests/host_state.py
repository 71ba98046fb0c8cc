"""Host state that only the test bed may change, always restored: hugetlb pools, eager page split.

On a normal host nothing here changes anything: a pool that is too small or a
module parameter with the wrong value is a RequirementError (a skip) naming the
command that would let the test run. Inside ``kvmpy bed`` (env KVMPY_BED=1, set
by the bed's job script) the pool is grown or the parameter set for the test,
and restored afterwards, also on failure or Ctrl-C.
"""
from __future__ import annotations

import contextlib
import os

from kvmpy.errors import RequirementError, require
from kvmpy.hostinfo import module_params, param_on
from kvmpy.memory import Hugetlb, hugetlb_pool

from . import bed_config

EAGER_PARAM = "/sys/module/kvm/parameters/eager_page_split"


def in_bed() -> bool:
    """True inside ``kvmpy bed`` (a throwaway VM where tests may change host knobs)."""
    return os.environ.get("KVMPY_BED") == "1"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            return f.readline().split(":", 1)[1].strip()
    except (OSError, IndexError):
        return "unknown"


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _pool_path(page_size: int) -> str:
    return f"/sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB/nr_hugepages"


def _available(page_size: int) -> int:
    pool = hugetlb_pool(page_size)
    return 0 if pool is None else pool["free"] - pool["resv"]


def _grow_pool(page_size: int, count: int) -> int | None:
    """Bed only: grow the pool until ``count`` pages are free; returns the old pool size
    to restore (None if the pool was not touched).  Never skips, never raises on a
    shortfall: callers check :func:`_available` afterwards."""
    pool = hugetlb_pool(page_size)
    if pool is None or not in_bed() or _available(page_size) >= count:
        return None
    old = pool["total"]
    for _ in range(2):
        _write(_pool_path(page_size), str(old + count - (pool["free"] - pool["resv"])))
        if _available(page_size) >= count:
            break
        # Earlier allocations leave memory fragmented: drop caches and compact, then retry.
        _write("/proc/sys/vm/drop_caches", "3")
        _write("/proc/sys/vm/compact_memory", "1")
    return old


@contextlib.contextmanager
def reserved_in_bed(*wants: tuple[int, int]):
    """Bed only, best effort: reserve ``(page_size, count)`` hugetlb pages for a whole
    module (before its tests fragment memory), restore the pools afterwards."""
    restore: list[tuple[int, int]] = []
    try:
        for page_size, count in wants:
            old = _grow_pool(page_size, count)
            if old is not None:
                restore.append((page_size, old))
        yield
    finally:
        for page_size, old in reversed(restore):
            _write(_pool_path(page_size), str(old))


@contextlib.contextmanager
def hugetlb_pages(page_size: int, count: int):
    """Make ``count`` free hugetlb pages of ``page_size`` available, restoring the pool after.

    On a normal host nothing is reserved: a pool that is too small is a
    RequirementError naming the command to run.  Inside the bed the pool is grown for the test.
    """
    kb = page_size // 1024
    require(hugetlb_pool(page_size) is not None,
            f"no hugetlb pool of {kb}kB pages on this kernel (/sys/kernel/mm/hugepages/hugepages-{kb}kB missing)")
    if _available(page_size) >= count:
        yield
        return
    if not in_bed():
        try:
            Hugetlb(page_size).check(count * page_size)
        except RequirementError as e:
            raise RequirementError(f"{e} (kvmpy reserves hugetlb pages only inside `kvmpy bed`)") from None
    old = None
    try:
        old = _grow_pool(page_size, count)
        require(_available(page_size) >= count,
                f"bed: needed {count} free {kb}kB huge pages, the kernel could provide only "
                f"{_available(page_size)} even after compaction (bed memory: {_mem_total()}; a 1G page needs "
                f"1 GiB of contiguous free memory: boot with hugepagesz=1G hugepages=1, or --mem 4G+)")
        yield
    finally:
        if old is not None:
            _write(_pool_path(page_size), str(old))


@contextlib.contextmanager
def eager_page_split(want: bool):
    """Run with kvm.eager_page_split == ``want``: set (and restore) it inside the bed only.

    On a normal host the parameter is global to every VM, so it is never
    changed: a different value is a RequirementError. Inside the bed too when the
    boot fixed it (a matrix row, or --param: selftests/bed_config.py).
    """
    value = (module_params("kvm") or {}).get("eager_page_split")
    require(value is not None, f"{EAGER_PARAM} is missing (kernel older than 6.0 or kvm not loaded)")
    cur = param_on(value)
    if cur == want:
        yield
        return
    if in_bed() and not bed_config.may_change("kvm.eager_page_split"):
        bed_config.require_param("kvm.eager_page_split", "Y" if want else "N", value)
    require(in_bed(), f"needs kvm.eager_page_split={'Y' if want else 'N'}, the host has "
                      f"{'Y' if cur else 'N'}; kvmpy changes it only inside `kvmpy bed` "
                      f"(or run with --param kvm.eager_page_split={'Y' if want else 'N'})")
    old = "Y" if cur else "N"
    try:
        _write(EAGER_PARAM, "Y" if want else "N")
        yield
    finally:
        # Restored even when the test fails or is interrupted.
        _write(EAGER_PARAM, old)
