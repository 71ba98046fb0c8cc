"""A KVM virtual machine: memslots, capabilities, stats, dirty logging and vCPUs.

The VM fd owns its ioctls, like the kernel selftests' one-line ``vm_*`` wrappers:
each method issues one ioctl and raises IoctlError on failure; the dirty-log
ioctls also have an ``*_unchecked`` variant that returns the kernel's
:class:`~kvmpy.abi.IoctlResult` for tests that expect an errno.
"""
from __future__ import annotations

import functools
import os
import struct
import threading
import weakref

from kvmpy import dirty_ring, faults
from kvmpy.abi import (IoctlResult, cap_name, check_ints, check_unsigned, ffi, ioctl, ioctl_int, ioctl_unchecked, lib,
                       new_struct, require_cap)
from kvmpy.bitmap import DirtyBitmap
from kvmpy.errors import IoctlError, KvmError, RequirementError, release_all
from kvmpy.memory import Anonymous, Backing, Memslot
from kvmpy.stats import Stats
from kvmpy.vcpu import Vcpu

_LOG_DIRTY = lib.KVM_MEM_LOG_DIRTY_PAGES
_REGION = "struct kvm_userspace_memory_region *"
_SET_USER_MEMORY_REGION = lib.KVM_SET_USER_MEMORY_REGION


class Vm:
    """A VM fd. Closing it closes its vCPUs, unmaps its memory and releases every fd.

    A VM dropped without ``close()`` releases them when it is garbage collected, in
    the same order: vCPUs, stats, the VM fd, then the memory. ``vcpu_mmap_size`` is what
    /dev/kvm's KVM_GET_VCPU_MMAP_SIZE said: each vCPU maps that much of its fd.
    """

    def __init__(self, fd: int, vcpu_mmap_size: int, vm_type: int = 0) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self.vm_type = vm_type
        self.memslots: dict[int, Memslot] = {}
        self.vcpus: dict[int, Vcpu] = {}
        self._stats: Stats | None = None
        # Held by close() and around the ioctls whose result size is the kernel's (a dirty log
        # fills the slot's bitmap): one on another thread never reaches a reused fd number.
        self._lock = threading.Lock()
        self._owned = _Owned(fd, self.memslots)
        self._release = weakref.finalize(self, self._owned.release)
        self._release.atexit = False  # at exit the kernel cleans up (and vCPU threads may still run)
        self.dirty_ring_size = 0          # bytes per vCPU ring, 0 when not enabled
        self.dirty_ring_acq_rel = False
        self.manual_protect_flags = 0     # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags enabled

    def __repr__(self) -> str:
        return f"Vm(fd={self.fd}, slots={sorted(self.memslots)}, vcpus={sorted(self.vcpus)})"

    @property
    def name(self) -> str:
        return f"VM fd {self.fd}"

    # -- capabilities ---------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers can differ per VM type)."""
        return ioctl_int(self.fd, "KVM_CHECK_EXTENSION", cap, self.name, cap_name(cap))

    def require_extension(self, cap: int, why: str = "") -> int:
        return require_cap(self.check_extension(cap), cap, why)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM with up to four u64 arguments."""
        what = f"KVM_ENABLE_CAP {cap_name(cap)}"
        if len(args) > 4:
            raise KvmError(f"{what}: {len(args)} arguments, at most 4")
        ec = new_struct("struct kvm_enable_cap *", what, cap=cap, flags=flags, args=list(args))
        ioctl(self.fd, "KVM_ENABLE_CAP", ec, self.name, f"{cap_name(cap)} args={list(args)}")

    def set_tss_addr(self, addr: int) -> None:
        check_ints(f"{self.name}: KVM_SET_TSS_ADDR", addr=addr)
        ioctl_int(self.fd, "KVM_SET_TSS_ADDR", addr, self.name, f"addr {addr:#x}")

    def set_identity_map_addr(self, addr: int) -> None:
        try:
            p = ffi.new("uint64_t *", addr)
        except (OverflowError, TypeError):
            raise KvmError(f"{self.name}: identity map address {addr!r} is not a u64") from None
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", p, self.name, f"addr {addr:#x}")

    # -- memslots ---------------------------------------------------------------
    def _set_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        # On the path of every memslot change (dirty logging on/off): no message is built
        # unless something fails.
        try:
            r = ffi.new(_REGION, (slot, flags, gpa, size, hva))
        except (OverflowError, TypeError):
            r = None
        if r is None or lib.kvmpy_ioctl_ptr(self.fd, _SET_USER_MEMORY_REGION, r) < 0:
            err = ffi.errno
            context = f"slot {slot} gpa {gpa:#x} size {size:#x} flags {flags:#x}"
            if r is None:       # names the field that does not fit
                new_struct(_REGION, f"KVM_SET_USER_MEMORY_REGION [{context}]", slot=slot, flags=flags,
                           guest_phys_addr=gpa, memory_size=size, userspace_addr=hva)
            raise IoctlError("KVM_SET_USER_MEMORY_REGION", err, self.name, context)

    def add_memory(self, slot: int, gpa: int, size: int, backing: Backing | None = None, flags: int = 0) -> Memslot:
        """Allocate ``size`` bytes with ``backing`` (anonymous 4K by default) and map them at ``gpa``."""
        check_ints(f"{self.name}: add_memory", slot=slot, gpa=gpa, size=size, flags=flags)
        if slot in self.memslots:
            raise KvmError(f"{self.name}: slot {slot} is already in use")
        check_unsigned(slot, 32, "memslot id")
        backing = backing or Anonymous()
        mapping = backing.allocate(size)
        try:
            self._set_region(slot, flags, gpa, size, mapping.addr)
        except BaseException:
            mapping.close()
            raise
        ms = Memslot(slot, gpa, size, flags, backing, mapping)
        self.memslots[slot] = ms
        return ms

    def move_memory(self, slot: int, new_gpa: int) -> None:
        """Move ``slot`` to ``new_gpa`` keeping its contents."""
        check_ints(f"{self.name}: move_memory", new_gpa=new_gpa)
        ms = self._slot(slot)
        self._set_region(slot, ms.flags, new_gpa, ms.size, ms.hva)
        ms.gpa = new_gpa

    def set_memory_flags(self, slot: int, flags: int) -> None:
        """Change ``slot``'s flags (e.g. toggle KVM_MEM_LOG_DIRTY_PAGES)."""
        check_ints(f"{self.name}: set_memory_flags", flags=flags)
        ms = self._slot(slot)
        self._set_region(slot, flags, ms.gpa, ms.size, ms.hva)
        ms.flags = flags

    def delete_memory(self, slot: int) -> None:
        """Delete ``slot`` from KVM, then unmap its memory."""
        ms = self._slot(slot)
        self._set_region(slot, ms.flags, ms.gpa, 0, ms.hva)
        del self.memslots[slot]
        ms.mapping.close()

    def _slot(self, slot: int) -> Memslot:
        try:
            return self.memslots[slot]
        except KeyError:
            raise KvmError(f"{self.name}: no memslot {slot}") from None

    def slot_at(self, gpa: int, length: int = 1) -> Memslot:
        """The memslot that holds ``[gpa, gpa+length)``."""
        if not (isinstance(gpa, int) and isinstance(length, int)):
            raise KvmError(f"{self.name}: a GPA range is two ints, not {gpa!r}+{length!r}")
        if length >= 0:
            for ms in self.memslots.values():
                if ms.contains(gpa, length):
                    return ms
        raise KvmError(f"{self.name}: GPA range {gpa:#x}+{length:#x} is not inside one memslot")

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """Writable view of guest memory ``[gpa, gpa+length)`` (must lie in one slot).

        Released when its slot is deleted or the VM closed: using it then raises
        ValueError, never touches unmapped memory (see :class:`~kvmpy.memory.Mapping`).
        ``read``/``write`` copy instead.
        """
        ms = self.slot_at(gpa, length)
        return ms.mapping.view(gpa - ms.gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of guest memory ``[gpa, gpa+length)`` (one slot)."""
        ms = self.slot_at(gpa, length)
        return ms.mapping.read(gpa - ms.gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` to guest memory at ``gpa`` (one slot)."""
        ms = self.slot_at(gpa, len(data))
        ms.mapping.write(gpa - ms.gpa, data)

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u64(self, gpa: int, value: int) -> None:
        try:
            data = struct.pack("<Q", value)
        except struct.error:
            raise KvmError(f"{self.name}: {value!r} is not a u64 (writing GPA {gpa:#x})") from None
        self.write(gpa, data)

    # -- dirty logging ----------------------------------------------------------
    def enable_dirty_logging(self, slot: int, on: bool = True) -> None:
        """Set or clear KVM_MEM_LOG_DIRTY_PAGES on ``slot``."""
        ms = self._slot(slot)
        on = on or faults.active("logging-never-disabled")  # FAULT: logging-never-disabled
        flags = ms.flags | lib.KVM_MEM_LOG_DIRTY_PAGES if on else ms.flags & ~lib.KVM_MEM_LOG_DIRTY_PAGES
        self.set_memory_flags(slot, flags)

    def get_dirty_log(self, slot: int, into: DirtyBitmap | None = None) -> DirtyBitmap:
        """KVM_GET_DIRTY_LOG for ``slot``, which must have KVM_MEM_LOG_DIRTY_PAGES.

        Without manual protect this also write-protects the reported pages again.
        Pass ``into`` (a bitmap of the slot's size) to reuse one bitmap every round.
        """
        ms = self.memslots.get(slot) or self._slot(slot)
        if not ms.flags & _LOG_DIRTY:
            raise KvmError(f"{self.name}: slot {slot} does not have KVM_MEM_LOG_DIRTY_PAGES set")
        bm = self._bitmap(into if into is not None else DirtyBitmap(ms.npages), "get_dirty_log into")
        if bm.npages != ms.npages:
            raise KvmError(f"bitmap has {bm.npages} pages, slot {slot} has {ms.npages}")
        # One C call with the struct on its stack (kvmpy_get_dirty_log): the per-round path.
        with self._lock:
            r = lib.kvmpy_get_dirty_log(self.fd, slot, bm.cdata())
        if r < 0:
            if self.fd == -1:
                raise KvmError(f"{self.name}: KVM_GET_DIRTY_LOG: the VM is closed")
            raise IoctlError("KVM_GET_DIRTY_LOG", -r, self.name, f"slot {slot}")
        return bm

    def get_dirty_log_unchecked(self, slot: int, into: DirtyBitmap | None = None) -> IoctlResult:
        """KVM_GET_DIRTY_LOG as asked (any slot, logged or not); the kernel's answer, never raised.

        The only check is the one that keeps the kernel inside our memory: ``into``
        must cover the slot when it is one of ours.
        """
        ms = self.memslots.get(slot)
        bm = self._bitmap(into if into is not None else DirtyBitmap(ms.npages if ms else 64),
                          "get_dirty_log_unchecked into")
        if ms is not None and bm.npages < ms.npages:
            raise KvmError(f"bitmap of {bm.npages} pages cannot hold slot {slot}'s {ms.npages}")
        log = new_struct("struct kvm_dirty_log *", "KVM_GET_DIRTY_LOG", slot=slot)
        buf = bm.cdata()
        log.dirty_bitmap = buf
        with self._lock:
            return ioctl_unchecked(self.fd, "KVM_GET_DIRTY_LOG", log)

    def _bitmap(self, bm: object, what: str) -> DirtyBitmap:
        # Anything else would hand KVM a buffer whose size nothing checked.
        if not isinstance(bm, DirtyBitmap):
            raise KvmError(f"{self.name}: {what} a DirtyBitmap, not {type(bm).__name__}")
        return bm

    def clear_dirty_log(self, slot: int, bitmap: DirtyBitmap, first_page: int = 0, num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG: write-protect again the pages set in ``bitmap`` within
        [first_page, first_page+num_pages) (default: to the slot's end).

        ``bitmap`` is indexed from page 0 of the slot; the kernel wants first_page a
        multiple of 64 (EINVAL otherwise, raised as IoctlError).
        """
        if num_pages is None:
            num_pages = self._slot(slot).npages - first_page
        self._check(self.clear_dirty_log_unchecked(slot, bitmap, first_page, num_pages), "KVM_CLEAR_DIRTY_LOG",
                    f"slot {slot} first_page {first_page} num_pages {num_pages}")

    def clear_dirty_log_unchecked(self, slot: int, bitmap: DirtyBitmap, first_page: int,
                                  num_pages: int) -> IoctlResult:
        """KVM_CLEAR_DIRTY_LOG as asked; the kernel's answer (e.g. EINVAL), never raised."""
        self._bitmap(bitmap, "clear_dirty_log takes")
        ms = self.memslots.get(slot)
        if ms is not None and bitmap.npages < ms.npages:
            raise KvmError(f"bitmap of {bitmap.npages} pages cannot hold slot {slot}'s {ms.npages}")
        cl = new_struct("struct kvm_clear_dirty_log *", "KVM_CLEAR_DIRTY_LOG", slot=slot, first_page=first_page,
                        num_pages=num_pages)
        # The kernel reads the bits from first_page on, after refusing an unaligned first_page
        # or a range past the slot's end: the rest of our bitmap always covers what it reads.
        # It is handed over in place (a chunked clear of a big slot must not copy it per call).
        offset = first_page // 8 if 0 <= first_page else len(bitmap.buffer)
        buf = bitmap.cdata() if offset < len(bitmap.buffer) else ffi.new("char[]", 8)
        cl.dirty_bitmap = buf + offset if offset < len(bitmap.buffer) else buf
        return ioctl_unchecked(self.fd, "KVM_CLEAR_DIRTY_LOG", cl)

    def enable_manual_protect(self, initially_set: bool = False) -> None:
        """Enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, with INITIALLY_SET if asked (and offered)."""
        offered = self.require_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, "manual dirty-log protect")
        flags = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            if not offered & lib.KVM_DIRTY_LOG_INITIALLY_SET:
                raise RequirementError("KVM lacks KVM_DIRTY_LOG_INITIALLY_SET for KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
            flags |= lib.KVM_DIRTY_LOG_INITIALLY_SET
        self.enable_cap(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)
        self.manual_protect_flags = flags

    def enable_dirty_ring(self, size_bytes: int, acq_rel: bool | None = None) -> None:
        """Enable the per-vCPU dirty ring of ``size_bytes``; must precede vCPU creation.

        ``acq_rel=None`` picks KVM_CAP_DIRTY_LOG_RING_ACQ_REL when offered.
        """
        if self.vcpus:
            raise KvmError(f"{self.name}: the dirty ring must be enabled before creating vCPUs")
        max_plain = self.check_extension(lib.KVM_CAP_DIRTY_LOG_RING)
        max_acq = self.check_extension(lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
        if acq_rel is None:
            acq_rel = bool(max_acq)
        cap = lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else lib.KVM_CAP_DIRTY_LOG_RING
        limit = max_acq if acq_rel else max_plain
        if not limit:
            raise RequirementError(f"KVM lacks {cap_name(cap)}")
        if size_bytes > limit:
            raise RequirementError(f"{cap_name(cap)}: ring of {size_bytes} bytes exceeds KVM's maximum {limit}")
        why = dirty_ring.size_problem(size_bytes, limit)
        if why:
            raise KvmError(f"{self.name}: {cap_name(cap)}: {why}")
        self.enable_cap(cap, size_bytes)
        self.dirty_ring_size = size_bytes
        self.dirty_ring_acq_rel = acq_rel

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect harvested entries; returns how many were reset."""
        return ioctl_int(self.fd, "KVM_RESET_DIRTY_RINGS", 0, self.name)

    def _check(self, res: IoctlResult, ioctl_name: str, context: str) -> None:
        if not res.ok:
            raise IoctlError(ioctl_name, res.errno, self.name, context)

    # -- vCPUs and stats --------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU; the vCPU maps its kvm_run (and dirty ring, if enabled)."""
        if vcpu_id in self.vcpus:
            raise KvmError(f"{self.name}: vCPU {vcpu_id} already exists")
        check_unsigned(vcpu_id, 32, "vCPU id")
        fd = ioctl_int(self.fd, "KVM_CREATE_VCPU", vcpu_id, self.name, f"vcpu {vcpu_id}")
        vcpu = Vcpu(vcpu_id, fd, self.vcpu_mmap_size, self.dirty_ring_size, self._require_stats)
        self.vcpus[vcpu_id] = vcpu
        self._owned.vcpus.append(vcpu._release)
        return vcpu

    def _require_stats(self) -> None:
        """RequirementError unless KVM has binary stats fds (the VM's and its vCPUs')."""
        self.require_extension(lib.KVM_CAP_BINARY_STATS_FD)

    @property
    def stats(self) -> Stats:
        """The VM's binary stats (KVM_GET_STATS_FD), opened on first use."""
        if self._stats is None:
            self._require_stats()
            fd = ioctl_int(self.fd, "KVM_GET_STATS_FD", 0, self.name)
            self._stats = self._owned.stats = Stats(fd, self.name)
        return self._stats

    def close(self) -> None:
        """Close vCPUs, the stats fd and the VM fd, then unmap all guest memory. Idempotent.

        A vCPU another thread is running is kicked out of KVM_RUN first; if one does
        not come out (KvmError), nothing is released yet (the vCPUs refuse new runs) and
        ``close()`` may be called again. Views of guest memory are released (see
        :meth:`gpa_view`).
        """
        if not self._release.alive:
            return
        for vcpu in list(self.vcpus.values()):
            vcpu._stop()
        for vcpu in list(self.vcpus.values()):
            vcpu.close()
        with self._lock:        # a second closer waits here, then finds nothing left to do
            if not self._release.alive:
                return
            # The fd number first: once closed it may be reused by another VM at once.
            self.fd = -1
            self.vcpus.clear()
            self._stats = None
            try:
                self._release()
            finally:
                self.memslots.clear()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Owned:
    """What a VM owns, released once (by ``Vm.close`` or when the VM is collected).

    It holds no reference to the VM (so that the VM can be collected), only to the
    memslots dict it shares with it and to the vCPUs' own releases.
    """

    def __init__(self, fd: int, memslots: dict[int, Memslot]) -> None:
        self.fd = fd
        self.memslots = memslots
        self.vcpus: list[weakref.finalize] = []
        self.stats: Stats | None = None

    def release(self) -> None:
        # Unmap only after the VM fd is gone, so KVM never sees a slot without memory.
        release_all(*self.vcpus, *([self.stats.close] if self.stats is not None else []),
                    functools.partial(os.close, self.fd), *[ms.mapping.close for ms in list(self.memslots.values())])
