"""Shared pieces of the MMU selftests (page splitting, recovery, unsync).

* :func:`mmu_flavour` says which KVM MMU backs a new VM (TDP MMU, the shadow
  MMU used for TDP, or shadow paging), from the module parameters.
* :class:`TouchGuest` runs guests/mmu_touch.c against a test memslot and lets
  the test thread drive it pass by pass; between passes the guest is parked in
  a GUEST_SYNC, so the VM is quiescent and the stats are stable.
* Fixtures that change host state do so only inside ``kvmpy bed`` (env
  KVMPY_BED=1, set by the bed's job script) and always restore it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import pytest

from kvmpy.errors import RequirementError
from kvmpy.guest.runner import GuestVm
from kvmpy.guest.stepper import SteppedGuest
from kvmpy.hostinfo import loaded_vendor_module, module_params, require_mmu_visible
from kvmpy.memory import SIZE_2M, Hugetlb, hugetlb_pool

PAGE = 4096
PTES = 512                      # entries per page table: a split makes 512 SPTEs of the next level
TEST_SLOT = 1
TEST_GPA = 1 << 30              # 1 GiB aligned, so 1G mappings are possible
EAGER_PARAM = "/sys/module/kvm/parameters/eager_page_split"

OP_QUIT, OP_READ, OP_WRITE = 0, 1, 2
SIZES = ("pages_4k", "pages_2m", "pages_1g")


def in_bed() -> bool:
    """True inside ``kvmpy bed`` (a throwaway VM where tests may change host knobs)."""
    return os.environ.get("KVMPY_BED") == "1"


def require_mmu() -> None:
    """Skip unless guest accesses create SPTEs that the pages_* stats count."""
    try:
        require_mmu_visible()
    except RequirementError as e:
        pytest.skip(str(e))


@dataclass(frozen=True)
class MmuFlavour:
    vendor_module: str
    tdp: bool                   # two-dimensional paging (NPT/EPT) in use
    tdp_mmu: bool               # the TDP MMU (tdp_mmu.c) handles this VM
    eager_page_split: bool
    tdp_mmu_param: str = "?"

    @property
    def name(self) -> str:
        if self.tdp_mmu:
            return "TDP MMU"
        return "shadow MMU over TDP" if self.tdp else "shadow MMU with shadow paging (TDP off)"

    @property
    def params(self) -> str:
        tdp_param = "npt" if self.vendor_module == "kvm_amd" else "ept"
        return (f"{self.vendor_module}.{tdp_param}={'Y' if self.tdp else 'N'} "
                f"kvm.tdp_mmu={self.tdp_mmu_param} "
                f"kvm.eager_page_split={'Y' if self.eager_page_split else 'N'}")


def param_on(v: str | None) -> bool:
    """True for a Y/y/1 module parameter value."""
    return v in ("Y", "y", "1")


def mmu_flavour() -> MmuFlavour:
    """The MMU a VM created now gets; skips when the parameters are unreadable."""
    vendor = loaded_vendor_module()
    if vendor not in ("kvm_amd", "kvm_intel"):
        pytest.skip(f"MMU flavour unknown: vendor module is {vendor or 'not loaded'} (need kvm_amd or kvm_intel)")
    kvm = module_params("kvm") or {}
    vp = module_params(vendor) or {}
    tdp = param_on(vp.get("npt" if vendor == "kvm_amd" else "ept"))
    # kvm.tdp_mmu reads Y even with npt=0/ept=0: the TDP MMU needs TDP too.
    return MmuFlavour(vendor, tdp, tdp and param_on(kvm.get("tdp_mmu")), param_on(kvm.get("eager_page_split")),
                      kvm.get("tdp_mmu", "absent"))


def counts(vm) -> dict[str, int]:
    """pages_4k/2m/1g of ``vm`` right now."""
    snap = vm.stats.snapshot()
    return {k: int(snap[k]) for k in SIZES}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in SIZES}


def sized(pages_4k: int = 0, pages_2m: int = 0, pages_1g: int = 0) -> dict[str, int]:
    return {"pages_4k": pages_4k, "pages_2m": pages_2m, "pages_1g": pages_1g}


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            return f.readline().split(":", 1)[1].strip()
    except (OSError, IndexError):
        return "unknown"


# -- host state that only the bed may change ------------------------------------------

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

    On a normal host nothing is reserved: a pool that is too small is a skip
    naming the command to run.  Inside the bed the pool is grown for the test.
    """
    kb = page_size // 1024
    if hugetlb_pool(page_size) is None:
        pytest.skip(f"no hugetlb pool of {kb}kB pages on this kernel "
                    f"(/sys/kernel/mm/hugepages/hugepages-{kb}kB missing)")
    if _available(page_size) >= count:
        yield
        return
    if not in_bed():
        try:
            Hugetlb(page_size).check(count * page_size)
        except RequirementError as e:
            pytest.skip(f"{e} (kvmpy reserves hugetlb pages only inside `kvmpy bed`)")
    old = None
    try:
        old = _grow_pool(page_size, count)
        if _available(page_size) < count:
            pytest.skip(f"bed: needed {count} free {kb}kB huge pages, the kernel could provide only "
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
    changed: a different value is a skip.
    """
    cur = param_on(module_params("kvm").get("eager_page_split")) if module_params("kvm") else None
    if cur is None:
        pytest.skip(f"{EAGER_PARAM} is missing (kernel older than 6.0 or kvm not loaded)")
    if cur == want:
        yield
        return
    if not in_bed():
        pytest.skip(f"needs kvm.eager_page_split={'Y' if want else 'N'}, the host has "
                    f"{'Y' if cur else 'N'}; kvmpy changes it only inside `kvmpy bed` "
                    f"(or run with --param kvm.eager_page_split={'Y' if want else 'N'})")
    old = "Y" if cur else "N"
    try:
        _write(EAGER_PARAM, "Y" if want else "N")
        yield
    finally:
        # Restored even when the test fails or is interrupted.
        _write(EAGER_PARAM, old)


# -- host THP accounting ------------------------------------------------------------------

def thp_chunks(addr: int, size: int) -> list[bool] | None:
    """For each 2M chunk of [addr, addr+size): is it backed by a transparent huge page?

    Uses /proc/self/pagemap + /proc/kpageflags (root only); None when the PFNs
    are hidden from this process.
    """
    KPF_THP = 1 << 22
    out = []
    try:
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            for chunk in range(addr, addr + size, SIZE_2M):
                pm.seek(chunk // PAGE * 8)
                ent = int.from_bytes(pm.read(8), "little")
                pfn = ent & ((1 << 55) - 1)
                if not ent >> 63 & 1:
                    out.append(False)
                    continue
                if pfn == 0:
                    return None
                kf.seek(pfn * 8)
                out.append(bool(int.from_bytes(kf.read(8), "little") & KPF_THP))
    except OSError:
        return None
    return out


# -- the guest -------------------------------------------------------------------------------

class TouchGuest:
    """guests/mmu_touch.c with a test memslot at TEST_GPA, driven from the test thread.

    The test region is slot ``TEST_SLOT`` (``size`` bytes of ``backing``),
    identity-mapped in the guest with ``guest_page``-sized pages.  Slot 0 (the
    runtime) is anonymous memory with THP off, so it never contributes 2M/1G
    SPTEs.  Construction runs the guest to its first park.
    """

    def __init__(self, kvm, backing, size: int, guest_page: int = SIZE_2M, timeout: float = 900.0) -> None:
        g = GuestVm("mmu_touch", kvm=kvm)
        self.runner = SteppedGuest(g, "mmu_touch", {"op": OP_QUIT}, timeout)
        try:
            self.slot = g.add_memory(TEST_SLOT, TEST_GPA, size, backing)
            g.map(TEST_GPA, TEST_GPA, size, guest_page)
            g.write_global("test_gva", TEST_GPA)
            g.write_global("test_size", size)
            self.g, self.vm, self.size = g, g.vm, size
            self.runner.start()
        except BaseException:
            self.runner.close()
            raise

    def touch(self, op: int, start: int = 0, length: int | None = None, stride: int = PAGE,
              stamp: int = 0, timeout: float = 600.0) -> int:
        """One guest pass over [start, start+length) of the region; returns how many
        addresses it touched.  Returns with the guest parked again."""
        length = self.size - start if length is None else length
        self.runner.step({"op": op, "start": start, "length": length, "stride": stride, "stamp": stamp}, timeout)
        return self.g.read_global("touched")

    def write(self, start: int = 0, length: int | None = None, stride: int = PAGE, stamp: int = 1) -> int:
        return self.touch(OP_WRITE, start, length, stride, stamp)

    def read(self, start: int = 0, length: int | None = None, stride: int = PAGE) -> int:
        return self.touch(OP_READ, start, length, stride)

    def counts(self) -> dict[str, int]:
        return counts(self.vm)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "TouchGuest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def record(request, **deltas) -> None:
    """Record the stats deltas a test asserted (shown in `kvmpy selftest`'s report)."""
    request.getfixturevalue("kvmpy_stats")(**deltas)
