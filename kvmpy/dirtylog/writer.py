"""guests/dirty_writer.c with test slots, driven round by round against a collector.

A :class:`DirtyWriterVm` is a :class:`~kvmpy.guest.vm.GuestVm` (the collector sets
up its mode before the vCPUs exist) plus test memslots mapped contiguously at
:data:`TEST_GVA`, driven by :class:`~kvmpy.guest.stepper.SteppedGuest`: every vCPU
parks at GUEST_SYNC(DIRTY_WRITER_PARKED) between rounds. The exit hook handles
KVM_EXIT_DIRTY_RING_FULL (the vCPU waits for a harvest). A round, as a
:class:`~kvmpy.dirtylog.rounds.RoundPlan` describes it:

1. set the stamp (guest global ``iteration``) and clear ``stop`` while every
   vCPU is parked, then release them;
2. collect while they write (concurrently), at least ``min_writes`` writes;
3. set ``stop`` (or kick them); keep collecting (a vCPU blocked on a full ring
   needs it) until every vCPU is parked again; collect once more, quiescent;
4. read every page's stamp and verify each logged slot page by page.
"""
from __future__ import annotations

import contextlib
import random
import struct
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from kvmpy import faults
from kvmpy.dirtylog.checker import DirtyLogChecker, RoundReport, read_stamps, record_all
from kvmpy.dirtylog.collectors import Collector
from kvmpy.dirtylog.rounds import RoundPlan, run_round
from kvmpy.errors import KvmError, RequirementError
from kvmpy.exits import DirtyRingFullExit, Exit
from kvmpy.guest import stages
from kvmpy.guest.stepper import SteppedGuest
from kvmpy.guest.vm import GuestVm
from kvmpy.memory import PAGE_4K, Backing

# Above 4 GiB: clear of memslot 0's identity map and the MMIO ucall page (0xF000_0000), so a
# 1 GiB test region fits under 2M guest pages.
TEST_GVA = 0x1_0000_0000
# Kicks to end a round with a vCPU caught between loading its stamp and storing it: a kick
# that lands in the guest's 5-instruction store loop (store_burst) catches it there 1 time in 5.
MID_STORE_KICKS = 200
MID_STORE_DELAY = 0.002
# KVM_EXIT_DIRTY_RING_FULL exits in a row answered by a harvest that found nothing: a vCPU KVM
# keeps from running. A correct KVM makes at most one per other vCPU (its ring was harvested for
# another vCPU's exit just before its own exit was seen); kvm_pvm makes tens of thousands a second.
FUTILE_RING_FULL_STALL = 100


@dataclass(frozen=True)
class RingFullStop:
    """Where a vCPU stood at a KVM_EXIT_DIRTY_RING_FULL: what stays the same while KVM refuses
    to run it. At such an exit the guest is at its (unretired) store (``rip``) to the page at
    ``rdi``; ``writes`` is its write counter (nr_writes[vcpu], bumped after each store) and
    ``published`` the entries of its ring KVM published and the host has not harvested.
    ``fetch_index``: the host's harvest position in that ring (a change means a harvest, and
    with it a reset, came in between: KVM may then run the guest)."""

    rip: int
    rdi: int
    writes: int
    published: int
    fetch_index: int

    def changes(self, later: "RingFullStop") -> list[str]:
        """What differs at ``later`` (the fetch index aside): evidence that the guest ran."""
        return [f"{name} {old:#x} -> {new:#x}" if name in ("rip", "rdi") else f"{name} {old} -> {new}"
                for name in ("rip", "rdi", "writes", "published")
                if (old := getattr(self, name)) != (new := getattr(later, name))]


@dataclass
class SlotSpec:
    """A test memslot: ``npages`` 4K pages at ``gpa``; ``logged`` turns on KVM_MEM_LOG_DIRTY_PAGES."""

    slot: int
    gpa: int
    npages: int
    logged: bool = True


class DirtyWriterVm:
    """A dirty_writer guest with test slots, run round by round against a collector.

    ``label`` prefixes every failure message (mode, backing, test).
    ``ring_full_resumes``: after a KVM_EXIT_DIRTY_RING_FULL, re-enter KVM_RUN that
    many times before waiting for the harvest (a misbehaving VMM's re-entry).
    Each re-entry is judged by the vCPU's :class:`RingFullStop` before it and at its
    next exit: ``refused_reentries`` counts those KVM answered with RING_FULL again
    and nothing of the guest moved (RIP, the store's target, its write counter, the
    ring's published entries); ``ran_reentries`` describes those where something did
    (KVM ran the guest into the full ring); ``unreset_reentries`` counts both;
    ``harvested_reentries`` those a harvest (and reset) overtook, which prove nothing.
    ``stride``/``burst``/``random_run``/``vcpu_ranges``: how the guest writes (see
    guests/dirty_writer.c); :meth:`set_ranges` changes the ranges between rounds.
    ``sync_every``: the guest reports its progress (an exit to this process) every that many
    writes, which paces a native writer to the host's reaction time.
    ``page_size``: the *guest's* page size for the test slots (PAGE_2M lets a 1 GiB
    slot fit the runtime's page-table pool, which caps 4K mappings at ~120k pages;
    dirty logging is per 4K gfn on the host side whatever the guest maps). Slots
    mapped with 2M pages must start and end 2M-aligned.
    ``user_mode``: the guest writes at CPL3 (on kvm_pvm the only level that runs natively,
    so its writes reach the log through KVM's MMU, not through the instruction emulator).
    ``populate``: back the test slots with host pages before the guest runs (where the
    kernel can), so a first sweep pays KVM's fault path but not the host's page allocation
    (in a test bed, most of a 1 GiB sweep's time).
    """

    def __init__(self, collector: Collector, slots: Sequence[SlotSpec], *, nr_vcpus: int = 1,
                 backing: Backing | None = None, stride: int = 0, seed: int = 1,
                 vcpu_ranges: Sequence[tuple[int, int]] | None = None, label: str = "",
                 ring_full_resumes: int = 0, page_size: int = PAGE_4K, burst: int = 0,
                 random_run: int = 0, sync_every: int = 0, user_mode: bool = False,
                 populate: bool = False) -> None:
        self.collector = collector
        self.ring_full_resumes = ring_full_resumes
        self.label = label or collector.name
        self.round_log: list[str] = []
        self.stamp = 0
        self.harvest_needed = threading.Event()   # a vCPU waits for a harvest (its ring is full)
        self._harvest_gen = 0
        self._harvest_cv = threading.Condition()
        self._ring_full = [0] * nr_vcpus
        self._unharvested_resumes = [0] * nr_vcpus   # KVM_RUNs since the last RING_FULL without a harvest
        self._reentry_stop: list[RingFullStop | None] = [None] * nr_vcpus
        self.refused_reentries = 0
        self.ran_reentries: list[str] = []
        self.harvested_reentries = 0
        self.pending_stores = 0   # kicked vCPUs stopped between loading a stamp and storing it
        self.futile_ring_full = 0  # RING_FULL exits in a row whose harvest found nothing
        self._started = False
        self.g = GuestVm("dirty_writer", nr_vcpus=nr_vcpus, mem_size=16 << 20, before_vcpus=collector.setup_vm,
                         user_mode=user_mode)
        try:
            self.vm = self.g.vm
            self.slots = []
            gva = TEST_GVA
            for spec in slots:
                ms = self.g.add_memory(spec.slot, spec.gpa, spec.npages * PAGE_4K, backing)
                if populate:
                    with contextlib.suppress(RequirementError):   # an old kernel: the sweep faults them in
                        ms.mapping.populate()
                self.g.map(gva, spec.gpa, spec.npages * PAGE_4K, page_size)
                if spec.logged:
                    self.vm.enable_dirty_logging(spec.slot, True)
                self.slots.append((spec, ms))
                gva += spec.npages * PAGE_4K
            self.npages = sum(s.npages for s in slots)
            self.logged = [ms for spec, ms in self.slots if spec.logged]
            self.checkers = {ms.slot: DirtyLogChecker(ms.npages, initially_set=collector.initially_set,
                                                      label=self.label, slot=ms.slot)
                             for ms in self.logged}
            for name, value in (("test_gva", TEST_GVA), ("test_npages", self.npages), ("stride", stride),
                                ("seed", seed), ("burst", burst), ("random_run", random_run), ("sync_every", sync_every),
                                ("iteration", 0),
                                ("stop", 0), ("quit", 0)):
                self.g.write_global(name, value)
            self.set_ranges(vcpu_ranges or [])
            # Polled all through a round: one unpack of a kept view, not a lookup per vCPU.
            self._nr_writes = self.g.global_view("nr_writes")
            self._nr_writes_fmt = struct.Struct(f"<{nr_vcpus}Q")
            self._stamp_store_rips = {self.g.elf.symbol(n).addr for n in ("stamp_store", "burst_store")}
            self.guest = SteppedGuest(self.g, stop={"quit": 1}, park_stage=stages.DIRTY_WRITER_PARKED,
                                      on_exit=self._on_exit, on_stop=self._wake_on_stop, name=self.label)
        except BaseException:
            self.g.close()
            raise

    # -- the vCPU side: exits that are not ucalls ------------------------------------------
    def _on_exit(self, i: int, ex: Exit) -> bool:
        ring_full = isinstance(ex, DirtyRingFullExit)
        before = self._reentry_stop[i]
        if before is not None:
            # The first exit after a KVM_RUN into a full, unreset ring.
            self._reentry_stop[i] = None
            self._judge_reentry(i, before, ex, ring_full)
        if not ring_full:
            return False
        # KVM stops a vCPU whose ring is (soft) full; it may only run on after a reset.
        self._ring_full[i] += 1
        if self._unharvested_resumes[i] < self.ring_full_resumes:
            # A VMM may re-enter by mistake (upstream's dirty_log_test does, after a
            # stray wakeup): KVM must refuse to run the guest into a full ring.
            self._unharvested_resumes[i] += 1
            self._reentry_stop[i] = self._ring_full_stop(i)
            return True
        self._unharvested_resumes[i] = 0
        with self._harvest_cv:
            gen = self._harvest_gen
            self.harvest_needed.set()
            # Woken by the harvest (collect) or by the run ending (_wake_on_stop).
            while self._harvest_gen == gen and not self.guest.stopping.is_set():
                self._harvest_cv.wait()
        return True

    def _ring_full_stop(self, i: int) -> RingFullStop:
        """vCPU ``i``'s RingFullStop (it is out of KVM_RUN: only a harvest can change it)."""
        vcpu = self.g.vcpus[i]
        regs = vcpu.get_regs()
        writes = self._nr_writes_fmt.unpack_from(self._nr_writes)[i]
        fetch_index, published = self.collector.ring_state(vcpu)
        return RingFullStop(regs.rip, regs.rdi, writes, published, fetch_index)

    def _judge_reentry(self, i: int, before: RingFullStop, ex: Exit, ring_full: bool) -> None:
        """Whether KVM ran vCPU ``i`` on its KVM_RUN into a full ring (``before``: its stop then)."""
        now = self._ring_full_stop(i)
        if now.fetch_index != before.fetch_index:
            self.harvested_reentries += 1   # harvested and reset meanwhile: KVM could run it
            return
        changed = before.changes(now)
        if ring_full and not changed:
            self.refused_reentries += 1
            return
        self.ran_reentries.append(f"vCPU {i}: KVM_RUN into its full, unreset ring ended in {type(ex).__name__}: "
                                  f"{', '.join(changed) or 'nothing of the guest changed'}")

    @property
    def unreset_reentries(self) -> int:
        """KVM_RUNs into a full ring no harvest overtook: refused, or run (``ran_reentries``)."""
        return self.refused_reentries + len(self.ran_reentries)

    def _wake_on_stop(self) -> None:
        with self._harvest_cv:
            self._harvest_cv.notify_all()

    # -- the host side: the steps of a round ---------------------------------------------------
    def collect(self) -> dict[int, list[int]]:
        """One collection of every logged slot, fed to the checkers; wakes ring-full vCPUs."""
        demanded = self.harvest_needed.is_set()
        got = self.collector.collect(self.vm, self.logged)
        if any(got.values()):
            self.futile_ring_full = 0
        elif demanded:
            self.futile_ring_full += 1
        if faults.active("collector-drops-page"):  # FAULT: collector-drops-page
            for pages in got.values():
                if pages:
                    lost = pages[len(pages) // 2]
                    pages[:] = [p for p in pages if p != lost]
        record_all(self.checkers, got)
        with self._harvest_cv:
            self.harvest_needed.clear()
            self._harvest_gen += 1
            self._harvest_cv.notify_all()
        return got

    def writes(self) -> int:
        """Writes done so far by all vCPUs (guest counters)."""
        return sum(self._nr_writes_fmt.unpack_from(self._nr_writes))

    def stalled_on_ring_full(self) -> bool:
        """Whether KVM keeps exiting RING_FULL with nothing to harvest (see FUTILE_RING_FULL_STALL)."""
        return self.futile_ring_full >= FUTILE_RING_FULL_STALL

    def progress(self) -> tuple[int, int]:
        """What changes while the guest makes progress: its write counters (bumped after each
        burst of stores) and the dirty pages KVM published and nobody collected yet."""
        return self.writes(), self.collector.pending(self.vm)

    def set_stamp(self, stamp: int, must_report: bool = True) -> None:
        """Start a new phase inside the running round: the guest now writes ``stamp``."""
        for c in self.checkers.values():
            c.add_phase(stamp, must_report)
        self.stamp = stamp
        self.g.write_global("iteration", stamp)

    def set_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """(first page, pages) each vCPU writes from the next round on ([]: every vCPU the
        whole test region); only while the vCPUs are parked between rounds."""
        if self._started and not self.guest.all_parked():
            raise KvmError(f"{self.label}: set_ranges() while vCPUs are running")
        if len(ranges) > len(self.g.vcpus) or any(f < 0 or n <= 0 or f + n > self.npages for f, n in ranges):
            raise ValueError(f"ranges {list(ranges)} do not fit {len(self.g.vcpus)} vCPUs and {self.npages} pages")
        for i in range(len(self.g.vcpus)):
            first, n = ranges[i] if i < len(ranges) else (0, 0)
            self.g.write_global("vcpu_first", first, offset=8 * i)
            self.g.write_global("vcpu_npages", n, offset=8 * i)

    def begin_round(self, must_report: bool = True) -> int:
        """Hand out a new stamp and release the parked vCPUs; returns the writes done before."""
        if not self._started:
            self.guest.start()
            self._started = True
        self.stamp += 1
        self.futile_ring_full = 0
        for c in self.checkers.values():
            c.begin_round(self.stamp, must_report)
        w0 = self.writes()
        self.guest.release({"iteration": self.stamp, "stop": 0})
        return w0

    def end_round(self, by_kick: bool, timeout: float, mid_store: bool = False) -> None:
        """Stop every vCPU (at its sync point, or wherever a kick finds it), collecting
        while they stop, then once more with the guest quiescent.

        ``mid_store``: kick again (up to :data:`MID_STORE_KICKS` times) until a vCPU is
        stopped between loading its stamp and storing it (see :meth:`_pending_stores`).
        """
        if not by_kick:
            self.g.write_global("stop", 1)
        for attempt in range(MID_STORE_KICKS if mid_store else 1):
            if attempt:
                # Not caught mid-store: let it run on and kick again after a random while (a
                # kick right after KVM_RUN lands where the last one did, e.g. on kvm_pvm).
                self.guest.release()
                time.sleep(random.uniform(0, MID_STORE_DELAY))
            if by_kick:
                self.guest.park_by_kick()
            # A vCPU stopped by a full ring reaches its sync point only after a harvest.
            self.guest.wait_parked(timeout, poll=self._collect_when_needed)
            pending = self._pending_stores() if by_kick else []
            if pending or not mid_store:
                break
        for gva, stamp in pending:
            self._note_pending(gva, stamp)
        self.pending_stores += len(pending)
        self.collect()

    def _collect_when_needed(self) -> None:
        self.harvest_needed.wait(0.005)
        self.collect()

    def kick_all(self) -> None:
        """Kick every vCPU out of KVM_RUN once (it re-enters at once), as upstream collects a ring."""
        # A vCPU waiting for a harvest after RING_FULL sees the kick when it re-enters.
        self.guest.kick_all(give_up=self.harvest_needed.is_set)

    def _pending_stores(self) -> list[tuple[int, int]]:
        """(GVA, stamp) of the stores kicked vCPUs left unfinished (loaded stamp, not stored)."""
        out = []
        for i, park in enumerate(self.guest.parks):
            if park is not None and park.stage is None:
                regs = self.g.vcpus[i].get_regs()
                if regs.rip in self._stamp_store_rips:
                    out.append((regs.rdi, regs.rax))
        return out

    def _note_pending(self, gva: int, stamp: int) -> None:
        first = TEST_GVA
        for spec, ms in self.slots:
            if first <= gva < first + spec.npages * PAGE_4K:
                if spec.logged:
                    self.checkers[ms.slot].note_pending_store((gva - first) // PAGE_4K, stamp)
                return
            first += spec.npages * PAGE_4K
        raise KvmError(f"{self.label}: a kicked vCPU was storing to GVA {gva:#x}, outside the test slots")

    def verify(self) -> dict[int, RoundReport]:
        """Check every logged slot page by page (vCPUs parked); {slot: RoundReport}."""
        return {ms.slot: self.checkers[ms.slot].verify(read_stamps(ms.view)) for ms in self.logged}

    def run_round(self, plan: RoundPlan | None = None) -> dict[int, RoundReport]:
        """Run one round as ``plan`` says (see :mod:`kvmpy.dirtylog.rounds`) and verify it."""
        return run_round(self, plan or RoundPlan())

    # -- diagnostics -----------------------------------------------------------------------
    @property
    def ring_full_exits(self) -> int:
        return sum(self._ring_full)

    @property
    def collections(self) -> int:
        """Collections made so far, for collectors that count them (0 otherwise)."""
        return getattr(self.collector, "collections", 0)

    def ring_summary(self, first_collection: int = 1, ring_full0: int = 0) -> str:
        """The dirty ring's fill levels since collection ``first_collection`` ('' without a ring)."""
        summary = getattr(self.collector, "summary", None)
        return "" if summary is None else summary(first_collection, self.ring_full_exits - ring_full0)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Let the guest quit at its sync point (else stop it) and release everything."""
        self.guest.close()

    def __enter__(self) -> "DirtyWriterVm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
