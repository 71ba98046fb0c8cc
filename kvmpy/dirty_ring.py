"""One vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING / _ACQ_REL): the mmapped entries and their harvest.

The VM enables the ring (``Vm.enable_dirty_ring``) and re-protects harvested
entries (``Vm.reset_dirty_rings``); each vCPU maps its own ring at creation.
"""
from __future__ import annotations

import os
from array import array

from kvmpy.abi import ffi, lib
from kvmpy.errors import KvmError
from kvmpy.hostmem import read_sysfs
from kvmpy.memory import PAGE_4K, Mapping, map_memory
from kvmpy.mmu_params import param_on

GFN_SIZE = ffi.sizeof("struct kvm_dirty_gfn")
RSVD_ENTRIES = 64       # KVM_DIRTY_RING_RSVD_ENTRIES
PML_ENTRIES = 512       # a vCPU's PML log, which KVM also keeps free in the ring when PML is on


def min_entries(sysfs: str = "/sys/module") -> tuple[int, str]:
    """The smallest dirty ring KVM accepts here, in entries, and why (kvm_vm_ioctl_enable_dirty_log_ring:
    a page, and room for KVM's reserved entries, which include the PML log when PML is on)."""
    page = os.sysconf("SC_PAGE_SIZE") // GFN_SIZE
    pml = [m for m in ("kvm_intel", "kvm_amd") if param_on(read_sysfs(f"{sysfs}/{m}/parameters/pml"))]
    reserved = RSVD_ENTRIES + (PML_ENTRIES if pml else 0)
    need = 1 << (reserved - 1).bit_length()
    if need > page:
        return need, (f"{reserved} reserved entries with {pml[0]}.pml=Y, rounded up to a power of two")
    return page, f"one {page * GFN_SIZE}-byte page of {GFN_SIZE}-byte entries"


def size_problem(size_bytes: int, limit: int) -> str | None:
    """Why KVM would refuse a ring of ``size_bytes`` per vCPU (None: it would take it); ``limit``
    is its KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING{,_ACQ_REL}) value, the largest in bytes."""
    entries, rest = divmod(size_bytes, GFN_SIZE)
    if rest or entries <= 0 or entries & (entries - 1):
        return f"{size_bytes} bytes is not a power-of-two number of {GFN_SIZE}-byte entries"
    low, why = min_entries()
    if entries < low:
        return f"KVM needs a ring of at least {low} entries ({why})"
    if size_bytes > limit:
        return f"KVM's maximum is {limit // GFN_SIZE} entries ({limit} bytes, KVM_CHECK_EXTENSION)"
    return None


class Harvest:
    """What one harvest collected, in ring order: ``slots[i]`` (as_id << 16 | slot id) and
    ``offsets[i]`` (page offset in that slot) of entry i, as arrays ('I' and 'Q')."""

    __slots__ = ("slots", "offsets")

    def __init__(self, slots: array, offsets: array) -> None:
        self.slots = slots
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def pairs(self) -> list[tuple[int, int]]:
        """The entries as (slot, offset) pairs (what ``DirtyRing.harvest`` returns)."""
        return list(zip(self.slots, self.offsets))

    def __repr__(self) -> str:
        return f"Harvest({len(self)} entries)"


class DirtyRing:
    """One vCPU's mmapped ring of ``struct kvm_dirty_gfn``.

    ``harvest()`` collects the entries KVM published (flag DIRTY) in order and
    marks them RESET; the VM's ``reset_dirty_rings()`` then re-protects them.
    The loop runs in C (kvmpy_ring_harvest in _bulk.c): flags are loaded with
    acquire semantics before slot and offset, RESET is stored with release.
    """

    def __init__(self, vcpu_id: int, vcpu_fd: int, size_bytes: int) -> None:
        """Map the ring of the vCPU ``vcpu_id`` (its fd ``vcpu_fd``): ``size_bytes`` as the VM enabled it."""
        self.size_bytes = size_bytes
        self.nentries = size_bytes // GFN_SIZE
        self.what = f"vCPU {vcpu_id}'s dirty ring"
        self.mapping = Mapping(map_memory(size_bytes, vcpu_fd, lib.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_4K,
                                          what=self.what), what=self.what)
        self.addr = self.mapping.addr
        self._attach(self.mapping.view())

    def _attach(self, view: memoryview) -> None:
        """Harvest the entries in ``view`` (the mapping's: close() releases it) from index 0 on."""
        self._view = view
        self._slots = ffi.new("uint32_t[]", self.nentries)
        self._offsets = ffi.new("uint64_t[]", self.nentries)
        self.fetch_index = 0

    def _gfns(self):
        """The ring as ``struct kvm_dirty_gfn[]``, for a ``with`` block: it holds the mapping's
        buffer, so a close() on another thread cannot unmap the ring under it (see Mapping)."""
        try:
            return ffi.from_buffer("struct kvm_dirty_gfn[]", self._view)
        except ValueError:
            raise KvmError(f"{self.what} used after close") from None

    def harvest_arrays(self, limit: int | None = None) -> Harvest:
        """Collect the published entries (at most ``limit``) and mark them for reset; the bulk
        form of :meth:`harvest`, with no Python object per entry."""
        limit = self.nentries if limit is None else max(0, min(limit, self.nentries))
        with self._gfns() as gfns:
            n = lib.kvmpy_ring_harvest(gfns, self.nentries - 1, self.fetch_index & 0xFFFFFFFF, limit,
                                       self._slots, self._offsets)
        self.fetch_index += n
        slots, offsets = array("I"), array("Q")
        slots.frombytes(ffi.buffer(self._slots, 4 * n))
        offsets.frombytes(ffi.buffer(self._offsets, 8 * n))
        return Harvest(slots, offsets)

    def harvest(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Collect published entries as (slot, gfn offset) pairs and mark them for reset."""
        return self.harvest_arrays(limit).pairs()

    def published(self) -> int:
        """Entries KVM has published (flag DIRTY) that :meth:`harvest` has not collected yet.

        They are contiguous from the fetch index, so a binary search finds their end:
        a cheap way to watch a vCPU fill its ring without harvesting it.
        """
        mask, dirty = self.nentries - 1, lib.KVM_DIRTY_GFN_F_DIRTY
        lo, hi = 0, self.nentries          # entries [fetch, fetch + lo) are published
        with self._gfns() as gfns:
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if gfns[(self.fetch_index + mid - 1) & mask].flags & dirty:
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
