"""One vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING / _ACQ_REL): the mmapped entries and their harvest.

The VM enables the ring (``Vm.enable_dirty_ring``) and re-protects harvested
entries (``Vm.reset_dirty_rings``); each vCPU maps its own ring at creation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvmpy.abi import ffi, lib
from kvmpy.errors import KvmError
from kvmpy.memory import PAGE_4K, Mapping, map_memory

if TYPE_CHECKING:
    from kvmpy.vcpu import Vcpu

GFN_SIZE = ffi.sizeof("struct kvm_dirty_gfn")


class DirtyRing:
    """One vCPU's mmapped ring of ``struct kvm_dirty_gfn``.

    ``harvest()`` collects the entries KVM published (flag DIRTY) in order and
    marks them RESET; the VM's ``reset_dirty_rings()`` then re-protects them.
    """

    def __init__(self, vcpu: "Vcpu", size_bytes: int) -> None:
        self.vcpu = vcpu
        self.size_bytes = size_bytes
        self.nentries = size_bytes // GFN_SIZE
        what = f"vCPU {vcpu.id}'s dirty ring"
        self.mapping = Mapping(map_memory(size_bytes, vcpu.fd, lib.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_4K, what=what),
                               what=what)
        self.addr = self.mapping.addr
        self.gfns = ffi.cast("struct kvm_dirty_gfn *", self.addr)
        self.fetch_index = 0

    def harvest(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Collect published entries as (slot, gfn offset) pairs and mark them for reset."""
        if self.mapping.closed:
            raise KvmError(f"vCPU {self.vcpu.id}'s dirty ring used after close")
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
        self.mapping.close()

