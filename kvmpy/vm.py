"""A KVM virtual machine: memslots, capabilities, stats, dirty logging and vCPUs."""
from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from kvmpy import dirty_log
from kvmpy.abi import cap_name, ffi, ioctl, ioctl_int, lib, require_cap
from kvmpy.bitmap import DirtyBitmap
from kvmpy.errors import KvmError
from kvmpy.memory import Anonymous, Backing, Memslot
from kvmpy.stats import Stats

if TYPE_CHECKING:
    from kvmpy.kvm import Kvm
    from kvmpy.vcpu import Vcpu


class Vm:
    """A VM fd. Closing it closes its vCPUs, unmaps its memory and releases every fd."""

    def __init__(self, kvm: "Kvm", fd: int, vm_type: int = 0) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vm_type = vm_type
        self.memslots: dict[int, Memslot] = {}
        self.vcpus: dict[int, "Vcpu"] = {}
        self._stats: Stats | None = None
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
        ec = ffi.new("struct kvm_enable_cap *")
        ec.cap = cap
        ec.flags = flags
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, "KVM_ENABLE_CAP", ec, self.name, f"{cap_name(cap)} args={list(args)}")

    def set_tss_addr(self, addr: int) -> None:
        ioctl_int(self.fd, "KVM_SET_TSS_ADDR", addr, self.name, f"addr {addr:#x}")

    def set_identity_map_addr(self, addr: int) -> None:
        p = ffi.new("uint64_t *", addr)
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", p, self.name, f"addr {addr:#x}")

    # -- memslots ---------------------------------------------------------------
    def _set_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, flags, gpa, size, hva
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", r, self.name,
              f"slot {slot} gpa {gpa:#x} size {size:#x} flags {flags:#x}")

    def add_memory(self, slot: int, gpa: int, size: int, backing: Backing | None = None, flags: int = 0) -> Memslot:
        """Allocate ``size`` bytes with ``backing`` (anonymous 4K by default) and map them at ``gpa``."""
        if slot in self.memslots:
            raise KvmError(f"{self.name}: slot {slot} is already in use")
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
        ms = self._slot(slot)
        self._set_region(slot, ms.flags, new_gpa, ms.size, ms.hva)
        ms.gpa = new_gpa

    def set_memory_flags(self, slot: int, flags: int) -> None:
        """Change ``slot``'s flags (e.g. toggle KVM_MEM_LOG_DIRTY_PAGES)."""
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
        for ms in self.memslots.values():
            if ms.contains(gpa, length):
                return ms
        raise KvmError(f"{self.name}: GPA range {gpa:#x}+{length:#x} is not inside one memslot")

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """Writable view of guest memory ``[gpa, gpa+length)`` (must lie in one slot)."""
        ms = self.slot_at(gpa, length)
        off = gpa - ms.gpa
        return ms.view[off: off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.gpa_view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.gpa_view(gpa, len(data))[:] = data

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.gpa_view(gpa, 8))[0]

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.gpa_view(gpa, 8), 0, value)

    # -- dirty logging ----------------------------------------------------------
    def enable_dirty_logging(self, slot: int, on: bool = True) -> None:
        """Set or clear KVM_MEM_LOG_DIRTY_PAGES on ``slot``."""
        ms = self._slot(slot)
        flags = ms.flags | lib.KVM_MEM_LOG_DIRTY_PAGES if on else ms.flags & ~lib.KVM_MEM_LOG_DIRTY_PAGES
        self.set_memory_flags(slot, flags)

    def get_dirty_log(self, slot: int, into: DirtyBitmap | None = None) -> DirtyBitmap:
        """KVM_GET_DIRTY_LOG for ``slot``."""
        return dirty_log.get(self, self._slot(slot), into)

    def clear_dirty_log(self, slot: int, bitmap: DirtyBitmap, first_page: int = 0, num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG: write-protect again the set pages of ``bitmap`` in the range."""
        dirty_log.clear(self, self._slot(slot), bitmap, first_page, num_pages)

    def enable_manual_protect(self, initially_set: bool = False) -> None:
        """Enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (optionally with INITIALLY_SET)."""
        dirty_log.enable_manual_protect(self, initially_set)

    def enable_dirty_ring(self, size_bytes: int, acq_rel: bool | None = None) -> None:
        """Enable the per-vCPU dirty ring; must precede vCPU creation.

        ``acq_rel=None`` picks KVM_CAP_DIRTY_LOG_RING_ACQ_REL when offered.
        """
        from kvmpy.dirty_ring import enable

        enable(self, size_bytes, acq_rel)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect harvested entries; returns how many were reset."""
        return ioctl_int(self.fd, "KVM_RESET_DIRTY_RINGS", 0, self.name)

    # -- vCPUs and stats --------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        from kvmpy.vcpu import Vcpu

        if vcpu_id in self.vcpus:
            raise KvmError(f"{self.name}: vCPU {vcpu_id} already exists")
        fd = ioctl_int(self.fd, "KVM_CREATE_VCPU", vcpu_id, self.name, f"vcpu {vcpu_id}")
        vcpu = Vcpu(self, vcpu_id, fd)
        self.vcpus[vcpu_id] = vcpu
        return vcpu

    @property
    def stats(self) -> Stats:
        """The VM's binary stats (KVM_GET_STATS_FD), opened on first use."""
        if self._stats is None:
            self.require_extension(lib.KVM_CAP_BINARY_STATS_FD)
            fd = ioctl_int(self.fd, "KVM_GET_STATS_FD", 0, self.name)
            self._stats = Stats(fd, self.name)
        return self._stats

    def close(self) -> None:
        """Close vCPUs, the stats fd and the VM fd, then unmap all guest memory."""
        for vcpu in list(self.vcpus.values()):
            vcpu.close()
        self.vcpus.clear()
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        # Unmap only after the VM fd is gone, so KVM never sees a slot without memory.
        for ms in self.memslots.values():
            ms.mapping.close()
        self.memslots.clear()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
