"""Guest memory backings: anonymous 4K, THP, hugetlb 2M/1G and shared memfd.

Each backing says up front whether the host can provide it (``check``), raising
:class:`RequirementError` with the exact reason, so tests skip precisely. Nothing
here reserves hugetlb pages: that is the host administrator's decision.
"""
from __future__ import annotations

import errno
import mmap as _mmap
import os
import sys
import threading
import warnings

from kvmpy.abi import ffi, lib
from kvmpy.errors import KvmError, RequirementError
from kvmpy.hostmem import THP_ENABLED, hugetlb_shortfall, thp_mode
from kvmpy.record import Record

# The x86 page sizes, for host backings and guest mappings alike (the one definition).
PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30

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
    """A host mapping that backs guest memory (or a vCPU's shared page). ``close()`` unmaps it.

    The memory is a Python ``mmap.mmap``, and every view of it is a Python buffer view of
    that object, so no view can ever point to unmapped memory:

    * views handed out (:meth:`view`, hence ``Memslot.view``, ``Vm.gpa_view`` and the
      ``data`` of a vCPU's I/O and MMIO exits) are released by ``close()``: using one
      afterwards raises ``ValueError`` (a released memoryview), never a crash;
    * a view derived from one (a slice, ``memoryview(v)``, ``ffi.from_buffer(v)``)
      keeps the memory mapped until it is dropped: ``close()`` then leaves the unmap
      to Python (with a ResourceWarning) instead of pulling the memory from under it.

    :meth:`read` and :meth:`write` copy and hand out nothing.
    """

    def __init__(self, mm: _mmap.mmap, offset: int = 0, size: int | None = None, what: str = "memory") -> None:
        self.size = len(mm) - offset if size is None else size
        self.what = what
        with ffi.from_buffer(mm) as base:
            self.addr = int(ffi.cast("uintptr_t", base)) + offset
        self._mm: _mmap.mmap | None = mm
        self._offset = offset
        self._whole: memoryview | None = memoryview(mm)[offset: offset + self.size]
        self._views = _HandedOut()

    @property
    def closed(self) -> bool:
        return self._whole is None

    def _memory(self) -> memoryview:
        whole = self._whole
        if whole is None:
            raise KvmError(f"{self.what} used after close")
        return whole

    def owner_view(self) -> memoryview:
        """The mapping's own view of all its bytes, for the object that owns the mapping (a vCPU
        reading its run page per exit): ``release_views`` leaves it, ``close()`` releases it."""
        return self._memory()

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """Writable view of ``[offset, offset+length)`` (default: to the end); released by ``close()``."""
        length = self.size - offset if length is None else length
        self._check(offset, length)
        return self._views.add(self._memory()[offset: offset + length])

    def read(self, offset: int, length: int) -> bytes:
        """A copy of ``[offset, offset+length)``."""
        self._check(offset, length)
        return bytes(self._memory()[offset: offset + length])

    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` to ``offset``."""
        self._check(offset, len(data))
        self._memory()[offset: offset + len(data)] = data

    def populate(self, offset: int = 0, length: int | None = None) -> None:
        """Back ``[offset, offset+length)`` (default: to the end) with host pages now, writable
        (madvise MADV_POPULATE_WRITE), so a guest's first touch costs KVM's fault path only.
        RequirementError on a kernel without it (before 5.14); KvmError if the host is out of memory."""
        length = self.size - offset if length is None else length
        self._check(offset, length)
        self._memory()
        try:
            self._mm.madvise(lib.MADV_POPULATE_WRITE, self._offset + offset, length)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise RequirementError(f"{self.what}: madvise(MADV_POPULATE_WRITE) refused (EINVAL): "
                                       f"it needs Linux 5.14 or later") from None
            raise KvmError(f"{self.what}: populating {length:#x} bytes at {offset:#x} failed: "
                           f"{errno.errorcode.get(e.errno, e.errno)} ({e.strerror})") from None

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise KvmError(f"{self.what}: range {offset:#x}+{length:#x} is outside its {self.size:#x} bytes")

    def release_views(self) -> None:
        """Release the views handed out so far (using one raises ValueError from now on)."""
        self._views.release()

    def close(self) -> None:
        """Release the views handed out, then unmap (unless a derived view still holds the memory)."""
        if self._whole is None:
            return
        self._views.release()
        whole, self._whole = self._whole, None
        whole.release()
        mm, self._mm = self._mm, None
        try:
            mm.close()
        except BufferError:
            # A view derived from one we handed out exports the memory: Python unmaps it
            # when that view goes. Never unmap under it.
            warnings.warn(f"{self.what}: a view of it is still alive, the memory stays mapped until it is "
                          f"dropped", ResourceWarning, stacklevel=2)


class _HandedOut:
    """The memoryviews a mapping handed out, released together by ``close()``.

    memoryviews take no weak references: the list forgets, now and then, the views
    nobody else holds any more (their reference count says so), so it stays short.
    """

    def __init__(self) -> None:
        self._views: list[memoryview] = []
        self._prune_at = _PRUNE_MIN
        self._lock = threading.Lock()

    def add(self, view: memoryview) -> memoryview:
        with self._lock:
            self._views.append(view)
            if len(self._views) >= self._prune_at:
                self._views = [v for v in self._views if sys.getrefcount(v) > _UNHELD]
                self._prune_at = max(_PRUNE_MIN, 2 * len(self._views))
        return view

    def release(self) -> None:
        if not self._views:     # the common case on a vCPU's run page, once per KVM_RUN
            return
        with self._lock:
            views, self._views = self._views, []
        for v in views:
            try:
                v.release()
            except BufferError:
                pass  # something exports from it: it holds the memory (see Mapping.close)


_PRUNE_MIN = 64
# The reference count of a list element nobody else holds, seen from a comprehension.
_UNHELD = [sys.getrefcount(o) for o in [object()]][0]


def map_memory(size: int, fd: int = -1, offset: int = 0, shared: bool = True, what: str = "memory",
               flags: int = 0) -> _mmap.mmap:
    """mmap(2) ``size`` bytes read-write (of ``fd`` at ``offset``, or anonymous when ``fd`` is -1);
    KvmError naming ``what`` and the errno on failure."""
    kind = _mmap.MAP_SHARED if shared else _mmap.MAP_PRIVATE
    try:
        return _mmap.mmap(fd, size, flags=kind | flags, prot=_mmap.PROT_READ | _mmap.PROT_WRITE, offset=offset)
    except (OSError, ValueError, OverflowError) as e:
        why = os.strerror(e.errno) if getattr(e, "errno", None) else str(e)
        raise KvmError(f"mmap of {what} ({size:#x} bytes) failed: {why}") from None


def _memfd_mapping(name: str, flags: int, size: int, what: str) -> Mapping:
    """A shared mapping of a new memfd of ``size`` bytes (the mapping keeps the file)."""
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | flags)
    except OSError as e:
        raise KvmError(f"{what}: memfd_create failed: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
        return Mapping(map_memory(size, fd, what=what), what=what)
    except OSError as e:
        raise KvmError(f"{what}: cannot size the memfd to {size:#x} bytes: {e.strerror}") from None
    finally:
        os.close(fd)


def _advise(mm: _mmap.mmap, advice: int, offset: int, size: int) -> None:
    """madvise(2), best effort: a kernel without THP refuses the THP advice (EINVAL)."""
    try:
        mm.madvise(advice, offset, size)
    except OSError:
        pass


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
        mm = map_memory(size, shared=False, flags=lib.MAP_NORESERVE, what=f"{self.name} guest memory")
        # Keep this backing honest: 4K host pages even when THP mode is 'always'.
        _advise(mm, lib.MADV_NOHUGEPAGE, 0, size)
        return Mapping(mm, what=f"{self.name} guest memory")


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
        # 2M more than asked, to start on a 2M boundary; the unused head and tail are
        # never touched (NORESERVE: no memory behind them).
        mm = map_memory(size + PAGE_2M, shared=False, flags=lib.MAP_NORESERVE, what="thp guest memory")
        with ffi.from_buffer(mm) as base:
            offset = -int(ffi.cast("uintptr_t", base)) % PAGE_2M
        _advise(mm, lib.MADV_HUGEPAGE, offset, size)
        return Mapping(mm, offset, size, what="thp guest memory")


class Hugetlb(Backing):
    """hugetlbfs pages (2M or 1G) through memfd_create(MFD_HUGETLB)."""

    def __init__(self, page_size: int = PAGE_2M) -> None:
        if page_size not in (PAGE_2M, PAGE_1G):
            raise KvmError(f"hugetlb page size must be 2M or 1G, not {page_size:#x}")
        self.page_size = page_size
        self.name = "hugetlb-" + ("2M" if page_size == PAGE_2M else "1G")

    def check(self, size: int) -> None:
        super().check(size)
        why = hugetlb_shortfall(self.page_size, size // self.page_size)
        if why is not None:
            raise RequirementError(f"{self.name} backing: {why}")

    def allocate(self, size: int) -> Mapping:
        self.check(size)
        huge_flag = os.MFD_HUGE_2MB if self.page_size == PAGE_2M else os.MFD_HUGE_1GB
        return _memfd_mapping(f"kvmpy-{self.name}", os.MFD_HUGETLB | huge_flag, size, f"{self.name} guest memory")


class SharedMemfd(Backing):
    """Shared memfd (shmem) memory, 4K pages."""

    name = "shared-memfd"

    def allocate(self, size: int) -> Mapping:
        self.check(size)
        return _memfd_mapping("kvmpy-shmem", 0, size, "shared-memfd guest memory")


def backing_by_name(name: str) -> Backing:
    """Backing from a short name: anonymous, thp, hugetlb-2M, hugetlb-1G, shared-memfd."""
    table = {
        "anonymous": Anonymous, "thp": Thp, "shared-memfd": SharedMemfd,
        "hugetlb-2M": lambda: Hugetlb(PAGE_2M), "hugetlb-1G": lambda: Hugetlb(PAGE_1G),
    }
    if name not in table:
        raise KvmError(f"unknown backing {name!r}; choose from {', '.join(table)}")
    return table[name]()


class Memslot(Record):
    """One KVM memory slot and the host mapping behind it."""

    slot: int
    gpa: int
    size: int
    flags: int
    backing: Backing
    mapping: Mapping

    @property
    def view(self) -> memoryview:
        """Writable memoryview of the slot's memory (index 0 is ``gpa``).

        Released when the slot is deleted or the VM closed: using it then raises
        ValueError (see :class:`Mapping` for views derived from it).
        """
        return self.mapping.view()

    @property
    def npages(self) -> int:
        return self.size // PAGE_4K

    @property
    def hva(self) -> int:
        return self.mapping.addr

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size
