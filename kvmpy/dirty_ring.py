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

    def _check_open(self) -> None:
        if self.mapping.closed:
            raise KvmError(f"vCPU {self.vcpu.id}'s dirty ring used after close")

    def harvest(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Collect published entries as (slot, gfn offset) pairs and mark them for reset."""
        self._check_open()
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

    def published(self) -> int:
        """Entries KVM has published (flag DIRTY) that :meth:`harvest` has not collected yet.

        They are contiguous from the fetch index, so a binary search finds their end:
        a cheap way to watch a vCPU fill its ring without harvesting it.
        """
        self._check_open()
        mask, dirty = self.nentries - 1, lib.KVM_DIRTY_GFN_F_DIRTY
        lo, hi = 0, self.nentries          # entries [fetch, fetch + lo) are published
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.gfns[(self.fetch_index + mid - 1) & mask].flags & dirty:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def not_reset(self, first_index: int, n: int) -> int:
        """How many of the ``n`` entries from ring index ``first_index`` on still carry the
        RESET flag that :meth:`harvest` set: after KVM_RESET_DIRTY_RINGS, none should
        (KVM resets an entry to flags 0, which re-arms it)."""
        # The flags are every fourth u32 of the ring (struct kvm_dirty_gfn: flags, slot, offset),
        # read from a copy (no view of the mapping outlives this call).
        flags = memoryview(self.mapping.read(0, self.size_bytes)).cast("I")[::GFN_SIZE // 4]
        first = first_index & (self.nentries - 1)
        spans = [flags[first:first + n]]
        if first + n > self.nentries:
            spans.append(flags[:first + n - self.nentries])
        reset = lib.KVM_DIRTY_GFN_F_RESET
        return sum(1 for span in spans for f in span.tolist() if f & reset)

    def close(self) -> None:
        self.mapping.close()

