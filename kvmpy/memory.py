"""Guest memory backings: anonymous 4K, THP, hugetlb 2M/1G and shared memfd.

Each backing says up front whether the host can provide it (``check``), raising
:class:`RequirementError` with the exact reason, so tests skip precisely. Nothing
here reserves hugetlb pages: that is the host administrator's decision.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from kvmpy.abi import ffi, lib
from kvmpy.errors import KvmError, RequirementError

# The x86 page sizes, for host backings and guest mappings alike (the one definition).
PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def read_sysfs(path: str) -> str | None:
    """Stripped contents of a sysfs/procfs file, None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def thp_mode() -> str | None:
    """The bracketed THP mode ('always', 'madvise', 'never'), or None if THP is absent."""
    raw = read_sysfs(THP_ENABLED)
    if raw is None or "[" not in raw:
        return None
    return raw[raw.index("[") + 1 : raw.index("]")]


def hugetlb_pool(page_size: int) -> dict[str, int] | None:
    """Counters of the hugetlb pool for ``page_size`` (total/free/resv), None if absent."""
    base = f"/sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB"
    if not os.path.isdir(base):
        return None
    out = {}
    for key, name in (("total", "nr_hugepages"), ("free", "free_hugepages"), ("resv", "resv_hugepages")):
        val = read_sysfs(os.path.join(base, name))
        out[key] = int(val) if val is not None else 0
    return out


def thp_backed_chunks(addr: int, size: int) -> list[bool] | None:
    """For each 2M chunk of the host range [addr, addr+size): is a transparent huge page behind it?

    Reads /proc/self/pagemap and /proc/kpageflags (root only); None when the PFNs
    are hidden from this process.
    """
    kpf_thp = 1 << 22
    out = []
    try:
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            for chunk in range(addr, addr + size, PAGE_2M):
                pm.seek(chunk // PAGE_4K * 8)
                ent = int.from_bytes(pm.read(8), "little")
                pfn = ent & ((1 << 55) - 1)
                if not ent >> 63 & 1:
                    out.append(False)
                    continue
                if pfn == 0:
                    return None
                kf.seek(pfn * 8)
                out.append(bool(int.from_bytes(kf.read(8), "little") & kpf_thp))
    except OSError:
        return None
    return out


class Mapping:
    """A host mapping that backs guest memory. ``close()`` unmaps it and closes its fd."""

    def __init__(self, addr: int, size: int, fd: int = -1, unmap_size: int | None = None) -> None:
        self.addr = addr
        self.size = size
        self.fd = fd
        self._unmap_size = unmap_size or size
        self._view: memoryview | None = memoryview(ffi.buffer(ffi.cast("char *", addr), size))

    @property
    def view(self) -> memoryview:
        """Writable memoryview of the whole mapping (invalid after ``close``)."""
        if self._view is None:
            raise KvmError("guest memory mapping used after close")
        return self._view

    def close(self) -> None:
        if self._view is None:
            return
        self._view.release()
        self._view = None
        lib.kvmpy_munmap(ffi.cast("void *", self.addr), self._unmap_size)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def mmap(size: int, prot: int, flags: int, fd: int = -1, offset: int = 0, what: str = "") -> int:
    """mmap(2) returning the address; KvmError naming ``what`` and the errno on failure."""
    p = lib.kvmpy_mmap(ffi.NULL, size, prot, flags, fd, offset)
    if p == ffi.NULL:
        err = ffi.errno
        raise KvmError(f"mmap of {what or 'memory'} ({size:#x} bytes) failed: {os.strerror(err)}")
    return int(ffi.cast("uintptr_t", p))


def _memfd_mapping(name: str, flags: int, size: int) -> Mapping:
    """A shared mapping of a new memfd of ``size`` bytes; the Mapping owns the fd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | flags)
    try:
        os.ftruncate(fd, size)
        addr = mmap(size, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, fd)
    except BaseException:
        os.close(fd)
        raise
    return Mapping(addr, size, fd)


class Backing:
    """How guest memory is provided. Subclasses define ``page_size`` and ``allocate``."""

    name = "backing"
    page_size = PAGE_4K

    def check(self, size: int) -> None:
        """Raise RequirementError if the host cannot provide ``size`` bytes of this backing."""
        if size <= 0 or size % self.page_size:
            raise KvmError(f"{self.name}: size {size:#x} is not a positive multiple of {self.page_size:#x}")

    def allocate(self, size: int) -> Mapping:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Anonymous(Backing):
    """Private anonymous memory in 4K pages (THP explicitly disabled for it)."""

    name = "anonymous"

    def allocate(self, size: int) -> Mapping:
        self.check(size)
        addr = mmap(size, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE)
        # Keep this backing honest: 4K host pages even when THP mode is 'always'.
        lib.kvmpy_madvise(ffi.cast("void *", addr), size, lib.MADV_NOHUGEPAGE)
        return Mapping(addr, size)


class Thp(Backing):
    """Anonymous memory, 2M-aligned and madvised for transparent huge pages."""

    name = "thp"
    page_size = PAGE_4K  # THP is best effort: any page-multiple size works

    def check(self, size: int) -> None:
        super().check(size)
        mode = thp_mode()
        if mode is None:
            raise RequirementError(f"THP backing: {THP_ENABLED} is absent (kernel built without THP)")
        if mode == "never":
            raise RequirementError(f"THP backing: {THP_ENABLED} is [never]")

    def allocate(self, size: int) -> Mapping:
        self.check(size)
        span = size + PAGE_2M
        raw = mmap(span, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE)
        aligned = (raw + PAGE_2M - 1) & ~(PAGE_2M - 1)
        # Trim the unaligned head and tail so the mapping is exactly the aligned range.
        if aligned > raw:
            lib.kvmpy_munmap(ffi.cast("void *", raw), aligned - raw)
        tail = raw + span - (aligned + size)
        if tail:
            lib.kvmpy_munmap(ffi.cast("void *", aligned + size), tail)
        lib.kvmpy_madvise(ffi.cast("void *", aligned), size, lib.MADV_HUGEPAGE)
        return Mapping(aligned, size)


class Hugetlb(Backing):
    """hugetlbfs pages (2M or 1G) through memfd_create(MFD_HUGETLB)."""

    def __init__(self, page_size: int = PAGE_2M) -> None:
        if page_size not in (PAGE_2M, PAGE_1G):
            raise KvmError(f"hugetlb page size must be 2M or 1G, not {page_size:#x}")
        self.page_size = page_size
        self.name = "hugetlb-" + ("2M" if page_size == PAGE_2M else "1G")

    def check(self, size: int) -> None:
        super().check(size)
        pool = hugetlb_pool(self.page_size)
        kb = self.page_size // 1024
        if pool is None:
            raise RequirementError(f"{self.name} backing: no hugetlb pool of {kb}kB pages on this host")
        need = size // self.page_size
        if pool["free"] - pool["resv"] < need:
            raise RequirementError(
                f"{self.name} backing: needs {need} free {kb}kB huge pages, the pool has "
                f"{pool['free'] - pool['resv']} available ({pool['total']} total); reserve them with "
                f"`echo N > /sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages`"
            )

    def allocate(self, size: int) -> Mapping:
        self.check(size)
        huge_flag = os.MFD_HUGE_2MB if self.page_size == PAGE_2M else os.MFD_HUGE_1GB
        return _memfd_mapping(f"kvmpy-{self.name}", os.MFD_HUGETLB | huge_flag, size)


class SharedMemfd(Backing):
    """Shared memfd (shmem) memory, 4K pages."""

    name = "shared-memfd"

    def allocate(self, size: int) -> Mapping:
        self.check(size)
        return _memfd_mapping("kvmpy-shmem", 0, size)


def backing_by_name(name: str) -> Backing:
    """Backing from a short name: anonymous, thp, hugetlb-2M, hugetlb-1G, shared-memfd."""
    table = {
        "anonymous": Anonymous, "thp": Thp, "shared-memfd": SharedMemfd,
        "hugetlb-2M": lambda: Hugetlb(PAGE_2M), "hugetlb-1G": lambda: Hugetlb(PAGE_1G),
    }
    if name not in table:
        raise KvmError(f"unknown backing {name!r}; choose from {', '.join(table)}")
    return table[name]()


@dataclass
class Memslot:
    """One KVM memory slot and the host mapping behind it."""

    slot: int
    gpa: int
    size: int
    flags: int
    backing: Backing
    mapping: Mapping

    @property
    def view(self) -> memoryview:
        """Writable memoryview of the slot's memory (index 0 is ``gpa``)."""
        return self.mapping.view

    @property
    def npages(self) -> int:
        return self.size // PAGE_4K

    @property
    def hva(self) -> int:
        return self.mapping.addr

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size
