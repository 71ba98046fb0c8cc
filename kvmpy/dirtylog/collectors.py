"""Collectors: one per dirty-logging mode, and the table of modes (like dirty_log_test.c's log_mode).

A collector knows how to set a VM up for its mode (before vCPUs exist) and how
to fetch, and re-arm, the dirty pages of the logged slots: ``collect()`` returns
{slot: pages}, to be fed to the slots' :class:`~kvmpy.dirtylog.checker.DirtyLogChecker`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from kvmpy import faults
from kvmpy.dirty_ring import GFN_SIZE
from kvmpy.dirtylog.checker import DirtyLogMismatch
from kvmpy.errors import KvmError
from kvmpy.memory import Memslot
from kvmpy.vm import Vm


class Collector:
    """Fetches dirty pages of logged slots; ``collect()`` returns {slot: pages}."""

    name = "collector"
    initially_set = False

    def setup_vm(self, vm: Vm) -> None:
        """Prepare ``vm`` for this mode (before vCPUs are created)."""

    def collect(self, vm: Vm, slots: Sequence[Memslot]) -> dict[int, list[int]]:
        raise NotImplementedError

    def pending(self, vm: Vm) -> int:
        """Dirty pages KVM has published but no collection has fetched yet, where that can be
        seen without collecting (0 otherwise): a sign of guest progress."""
        return 0

    def __repr__(self) -> str:
        return self.name


class GetDirtyLogCollector(Collector):
    """KVM_GET_DIRTY_LOG alone: fetching the bitmap also resets it and re-protects."""

    name = "dirty-log"

    def collect(self, vm, slots):
        return {ms.slot: vm.get_dirty_log(ms.slot).pages() for ms in slots}


class ClearDirtyLogCollector(Collector):
    """KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG under KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.

    GET only copies the bitmap; CLEAR of exactly the reported pages re-protects them.
    ``chunk`` (a multiple of 64) clears in several calls, exercising first_page/num_pages.
    """

    def __init__(self, initially_set: bool = False, chunk: int | None = None) -> None:
        if chunk is not None and (chunk <= 0 or chunk % 64):
            raise ValueError("chunk must be a positive multiple of 64 pages")
        self.initially_set = initially_set
        self.chunk = chunk
        self.name = "clear-log-initially-set" if initially_set else "clear-log"

    def setup_vm(self, vm):
        vm.enable_manual_protect(initially_set=self.initially_set)

    def collect(self, vm, slots):
        out = {}
        for ms in slots:
            bm = vm.get_dirty_log(ms.slot)
            to_clear = bm
            if faults.active("clear-misses-last-word"):  # FAULT: clear-misses-last-word
                to_clear = bm.copy()
                for p in range((ms.npages - 1) // 64 * 64, ms.npages):
                    to_clear.clear(p)
            step = self.chunk or ms.npages
            for first in range(0, ms.npages, step):
                vm.clear_dirty_log(ms.slot, to_clear, first, min(step, ms.npages - first))
            out[ms.slot] = bm.pages()
        return out


class DirtyRingCollector(Collector):
    """Per-vCPU dirty rings: harvest every vCPU's ring, then KVM_RESET_DIRTY_RINGS.

    ``acq_rel=None`` uses KVM_CAP_DIRTY_LOG_RING_ACQ_REL when KVM offers it.
    ``last_entry[vcpu_id]`` keeps the last gfn harvested from each vCPU (for the
    in-flight race of a RING_FULL exit). Checks that the reset count equals the
    harvested count and that every entry names a logged slot and an in-range page.
    """

    def __init__(self, ring_bytes: int = 65536, acq_rel: bool | None = None) -> None:
        self.ring_bytes = ring_bytes
        self.acq_rel = acq_rel
        self.name = "dirty-ring" if acq_rel is None else ("dirty-ring-acq-rel" if acq_rel else "dirty-ring-plain")
        self.last_entry: dict[int, tuple[int, int]] = {}
        self.harvested = 0
        # One row per non-empty harvest of a vCPU's ring: (collection number, vCPU id, entries,
        # first entry (slot, offset)). A ring-full exit should be followed by a harvest of the
        # soft limit (ring size - 64) plus a few; exactly the ring size means KVM filled every slot.
        self.harvests: list[tuple[int, int, int, tuple[int, int]]] = []
        self.collections = 0
        self._lock = threading.Lock()

    def setup_vm(self, vm):
        vm.enable_dirty_ring(self.ring_bytes, self.acq_rel)

    def collect(self, vm, slots):
        by_slot = {ms.slot: ms for ms in slots}
        out: dict[int, list[int]] = {s: [] for s in by_slot}
        # One harvester at a time: a ring has a single consumer index.
        with self._lock:
            count = 0
            self.collections += 1
            harvested = []   # (vCPU, ring index of its first entry, entries)
            for vcpu in list(vm.vcpus.values()):
                first_index = vcpu.dirty_ring.fetch_index
                entries = vcpu.dirty_ring.harvest_arrays()
                n = len(entries)
                if not n:
                    continue
                # Checked and sorted per slot at C speed: a harvest holds up to 65,536 entries.
                self.harvests.append((self.collections, vcpu.id, n, (entries.slots[0], entries.offsets[0])))
                named = set(entries.slots)
                for slot in named:
                    offsets = entries.offsets if len(named) == 1 else [
                        o for s, o in zip(entries.slots, entries.offsets) if s == slot]
                    ms = by_slot.get(slot)
                    if ms is None:
                        raise DirtyLogMismatch(
                            f"{self.name}: vCPU {vcpu.id}'s ring names slot {slot} (offset {offsets[0]}), "
                            f"which is not a logged slot (logged: {sorted(by_slot)})", {"bad_slot": [slot]})
                    top = max(offsets)
                    if top >= ms.npages:
                        raise DirtyLogMismatch(
                            f"{self.name}: vCPU {vcpu.id}'s ring names page {top} of slot {slot}, "
                            f"which has only {ms.npages} pages", {"out_of_range": [top]})
                    out[slot].extend(offsets)
                self.last_entry[vcpu.id] = (entries.slots[-1], entries.offsets[-1])
                harvested.append((vcpu, first_index, n))
                count += n
            if faults.active("ring-never-reset"):  # FAULT: ring-never-reset
                reset = count
            else:
                reset = vm.reset_dirty_rings() if count else 0
            self.harvested += count
            # KVM re-arms an entry it resets by clearing its flags (harvested 1X -> invalid 00).
            unreset = [(v.id, n) for v, first, k in harvested if (n := v.dirty_ring.not_reset(first, k))]
        if reset != count:
            raise DirtyLogMismatch(
                f"{self.name}: KVM_RESET_DIRTY_RINGS reset {reset} entries, {count} were harvested",
                {"reset_mismatch": [reset, count]})
        if unreset:
            raise DirtyLogMismatch(
                f"{self.name}: after KVM_RESET_DIRTY_RINGS (which said it reset {reset} entries) "
                + ", ".join(f"{n} of vCPU {v}'s harvested entries" for v, n in unreset)
                + " still carry the RESET flag: KVM did not hand them back to the ring",
                {"not_reset": [n for _, n in unreset]})
        return out

    def pending(self, vm):
        return sum(v.dirty_ring.published() for v in list(vm.vcpus.values()))

    def ring_state(self, vcpu) -> tuple[int, int]:
        """(fetch index, entries published and not harvested) of ``vcpu``'s ring, between
        harvests (a harvest marks entries as it goes and moves the index at its end)."""
        with self._lock:
            return vcpu.dirty_ring.fetch_index, vcpu.dirty_ring.published()

    def summary(self, first_collection: int, ring_full_exits: int, limit: int = 24) -> str:
        """The ring's fill levels since collection ``first_collection``, for a failure message.

        A harvest after a KVM_EXIT_DIRTY_RING_FULL should hold the soft limit (ring
        entries - 64) plus the few entries pushed before the exit; a harvest of the
        whole ring means KVM pushed past its soft limit and may have overwritten
        entries the host had not harvested yet (the oldest, i.e. the first pushed).
        """
        size = self.ring_bytes // GFN_SIZE
        rows = [h for h in self.harvests if h[0] >= first_collection]
        full = [h for h in rows if h[2] >= size]
        # The WHOLE-ring words are the signature of KVM's overfill (known_issues.toml matches
        # them): they appear only when a harvest really held the whole ring.
        whole = (f", {len(full)} of them the WHOLE ring ({size} entries: pushed past the soft limit, "
                 f"oldest entries overwritten?)") if full else ""
        lines = [f"  dirty ring: {size} entries per vCPU (soft limit {size - 64}); this round "
                 f"{ring_full_exits} KVM_EXIT_DIRTY_RING_FULL exits, {len(rows)} non-empty harvests{whole}"]
        shown = rows if len(rows) <= limit else rows[:limit // 2] + rows[-limit // 2:]
        lines.append("  harvests (collection: vCPU, entries, first entry slot/page): " + "; ".join(
            f"{c}: vCPU {v}, {n}{' (WHOLE RING)' if n >= size else ''}, first {slot}/{off}"
            for c, v, n, (slot, off) in shown) + (f" ... ({len(rows)} in all)" if len(rows) > limit else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class LogMode:
    """A dirty-logging mode: its name (as in test ids), what it exercises, its collector."""

    name: str
    what: str
    make: Callable[[int, "int | None"], Collector]   # (ring bytes, CLEAR chunk) -> collector


LOG_MODES: tuple[LogMode, ...] = (
    LogMode("dirty-log", "KVM_GET_DIRTY_LOG, which also re-protects",
            lambda ring, chunk: GetDirtyLogCollector()),
    LogMode("clear-log", "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (manual protect)",
            lambda ring, chunk: ClearDirtyLogCollector(False, chunk)),
    LogMode("clear-log-initially-set", "clear-log with KVM_DIRTY_LOG_INITIALLY_SET",
            lambda ring, chunk: ClearDirtyLogCollector(True, chunk)),
    LogMode("dirty-ring", "per-vCPU dirty rings, ACQ_REL when KVM offers it",
            lambda ring, chunk: DirtyRingCollector(ring, None)),
    LogMode("dirty-ring-plain", "per-vCPU dirty rings without ACQ_REL",
            lambda ring, chunk: DirtyRingCollector(ring, False)),
)
MODE_NAMES = tuple(m.name for m in LOG_MODES)


def collector_by_name(name: str, ring_bytes: int = 65536, chunk: int | None = None) -> Collector:
    """A fresh collector for mode ``name`` (see LOG_MODES); ``chunk``: CLEAR in calls of that many pages."""
    for mode in LOG_MODES:
        if mode.name == name:
            return mode.make(ring_bytes, chunk)
    raise KvmError(f"unknown dirty-log mode {name!r}; choose from {', '.join(MODE_NAMES)}")
