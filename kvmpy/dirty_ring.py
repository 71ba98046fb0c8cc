"""The per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING / _ACQ_REL): enable, harvest, reset."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kvmpy.abi import ffi, lib
from kvmpy.errors import KvmError, RequirementError
from kvmpy.memory import mmap

if TYPE_CHECKING:
    from kvmpy.vcpu import Vcpu
    from kvmpy.vm import Vm

GFN_SIZE = ffi.sizeof("struct kvm_dirty_gfn")


def enable(vm: "Vm", size_bytes: int, acq_rel: bool | None = None) -> None:
    """Enable the dirty ring of ``size_bytes`` per vCPU on ``vm`` (before any vCPU exists)."""
    if vm.vcpus:
        raise KvmError(f"{vm.name}: the dirty ring must be enabled before creating vCPUs")
    max_plain = vm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING)
    max_acq = vm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
    if acq_rel is None:
        acq_rel = bool(max_acq)
    cap = lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else lib.KVM_CAP_DIRTY_LOG_RING
    limit = max_acq if acq_rel else max_plain
    name = "KVM_CAP_DIRTY_LOG_RING" + ("_ACQ_REL" if acq_rel else "")
    if not limit:
        raise RequirementError(f"KVM lacks {name}")
    if size_bytes > limit:
        raise RequirementError(f"{name}: ring of {size_bytes} bytes exceeds KVM's maximum {limit}")
    vm.enable_cap(cap, size_bytes)
    vm.dirty_ring_size = size_bytes
    vm.dirty_ring_acq_rel = acq_rel


class DirtyRing:
    """One vCPU's mmapped ring of ``struct kvm_dirty_gfn``.

    ``harvest()`` collects the entries KVM published (flag DIRTY) in order and
    marks them RESET; the VM's ``reset_dirty_rings()`` then re-protects them.
    """

    def __init__(self, vcpu: "Vcpu", size_bytes: int) -> None:
        self.vcpu = vcpu
        self.size_bytes = size_bytes
        self.nentries = size_bytes // GFN_SIZE
        page = os.sysconf("SC_PAGE_SIZE")
        offset = lib.KVM_DIRTY_LOG_PAGE_OFFSET * page

        self.addr = mmap(size_bytes, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, vcpu.fd, offset,
                         f"vCPU {vcpu.id}'s dirty ring")
        self.gfns = ffi.cast("struct kvm_dirty_gfn *", self.addr)
        self.fetch_index = 0

    def harvest(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Collect published entries as (slot, gfn offset) pairs and mark them for reset."""
        out = []
        mask = self.nentries - 1
        dirty, reset = lib.KVM_DIRTY_GFN_F_DIRTY, lib.KVM_DIRTY_GFN_F_RESET
        while limit is None or len(out) < limit:
            e = self.gfns[self.fetch_index & mask]
            # x86 is TSO: the flags load is ordered before the slot/offset loads.
            if not e.flags & dirty:
                break
            out.append((e.slot, e.offset))
            e.flags = reset
            self.fetch_index += 1
        return out

    def close(self) -> None:
        if self.addr:
            lib.kvmpy_munmap(ffi.cast("void *", self.addr), self.size_bytes)
            self.addr = 0
            self.gfns = None

