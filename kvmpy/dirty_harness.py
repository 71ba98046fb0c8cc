"""Drive guests/dirty_writer.c in rounds and verify each round with :mod:`kvmpy.dirty_check`.

One :class:`DirtyWriterVm` is a guest VM (built by :class:`kvmpy.guest.runner.GuestVm`)
plus test memslots mapped contiguously at :data:`TEST_GVA`, one thread per vCPU
running our own KVM_RUN loop (it must handle KVM_EXIT_DIRTY_RING_FULL, which the
generic runner treats as a crash), and a host side that runs rounds:

1. set the stamp (guest global ``iteration``) and clear ``stop`` while every
   vCPU is parked at its GUEST_SYNC, then release them;
2. collect while they write (concurrently), at least ``min_writes`` writes;
3. set ``stop``; keep collecting (a vCPU blocked on a full ring needs it) until
   every vCPU is parked again; collect once more with the guest quiescent;
4. read every page's stamp and verify each logged slot page by page.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kvmpy.dirty_check import Collector, DirtyLogChecker, DirtyLogMismatch, RoundReport, read_stamps, record_all
from kvmpy.errors import KvmError
from kvmpy.exits import DirtyRingFullExit, InterruptedExit, IoExit
from kvmpy.guest.runner import GuestAssertError, GuestExceptionError, GuestVm, format_regs
from kvmpy.guest.ucall import AssertCall, DoneCall, ExceptionCall, PrintfCall, SyncCall, decode, ucall_gpa
from kvmpy.memory import PAGE_SIZE, Backing

TEST_GVA = 0xC000_0000
STAGE_PARKED = 1
STAGE_PROGRESS = 2


@dataclass
class SlotSpec:
    """A test memslot: ``npages`` 4K pages at ``gpa``; ``logged`` turns on KVM_MEM_LOG_DIRTY_PAGES."""

    slot: int
    gpa: int
    npages: int
    logged: bool = True


class _HookedKvm:
    """Forwards to a Kvm, running ``hook(vm)`` right after create_vm (before any vCPU)."""

    def __init__(self, kvm, hook: Callable) -> None:
        self._kvm, self._hook = kvm, hook

    def create_vm(self, *a, **k):
        vm = self._kvm.create_vm(*a, **k)
        self._hook(vm)
        return vm

    def __getattr__(self, name):
        return getattr(self._kvm, name)


@dataclass
class _VcpuLoop:
    thread: threading.Thread | None = None
    parked: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)
    ring_full: int = 0
    pending: tuple[int, int] | None = None  # (gva, stamp) of a store the kick left unfinished
    unharvested_resumes: int = 0   # KVM_RUN calls since the last RING_FULL exit without a harvest
    interrupts: int = 0            # KVM_RUN returns with EINTR (kicks)
    done: bool = False


class DirtyWriterVm:
    """A dirty_writer guest with test slots, run round by round against a collector.

    ``label`` prefixes every failure message (mode, backing, test).
    ``ring_full_resumes``: after a KVM_EXIT_DIRTY_RING_FULL, re-enter KVM_RUN that
    many times before waiting for the harvest (a misbehaving VMM's re-entry).
    ``page_size``: the *guest's* page size for the test slots (PAGE_2M lets a 1 GiB
    slot fit the runtime's page-table pool, which caps 4K mappings at ~120k pages;
    dirty logging is per 4K gfn on the host side whatever the guest maps). Slots
    mapped with 2M pages must start and end 2M-aligned.
    """

    def __init__(self, collector: Collector, slots: Sequence[SlotSpec], *, nr_vcpus: int = 1,
                 backing: Backing | None = None, stride: int = 0, seed: int = 1,
                 vcpu_ranges: Sequence[tuple[int, int]] | None = None, label: str = "",
                 ring_full_resumes: int = 0, page_size: int = PAGE_SIZE, burst: int = 0) -> None:
        from kvmpy import Kvm

        self.collector = collector
        self.ring_full_resumes = ring_full_resumes
        self.label = label or collector.name
        self.kvm = Kvm()
        self.g: GuestVm | None = None
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._harvest_needed = threading.Event()
        self._harvest_gen = 0
        self._harvest_cv = threading.Condition()
        self.round_log: list[str] = []
        try:
            self.g = GuestVm("dirty_writer", nr_vcpus=nr_vcpus, mem_size=16 << 20,
                             kvm=_HookedKvm(self.kvm, collector.setup_vm))
            self.vm = self.g.vm
            self.slots = []
            gva = TEST_GVA
            for spec in slots:
                ms = self.g.add_memory(spec.slot, spec.gpa, spec.npages * PAGE_SIZE, backing)
                self.g.map(gva, spec.gpa, spec.npages * PAGE_SIZE, page_size)
                if spec.logged:
                    self.vm.enable_dirty_logging(spec.slot, True)
                self.slots.append((spec, ms))
                gva += spec.npages * PAGE_SIZE
            self.npages = sum(s.npages for s in slots)
            self.logged = [ms for spec, ms in self.slots if spec.logged]
            self.checkers = {ms.slot: DirtyLogChecker(ms.npages, initially_set=collector.initially_set,
                                                      label=self.label, slot=ms.slot)
                             for ms in self.logged}
            for name, value in (("test_gva", TEST_GVA), ("test_npages", self.npages), ("stride", stride),
                                ("seed", seed), ("burst", burst), ("iteration", 0), ("stop", 0), ("quit", 0)):
                self.g.write_global(name, value)
            for i, (first, n) in enumerate(vcpu_ranges or []):
                self.g.write_global("vcpu_first", first, offset=8 * i)
                self.g.write_global("vcpu_npages", n, offset=8 * i)
            self.loops = [_VcpuLoop() for _ in self.g.vcpus]
            self._stamp_store_rips = {self.g.elf.symbol(n).addr for n in ("stamp_store", "burst_store")}
        except BaseException:
            self.close()
            raise
        self._started = False
        self._kick_park = False
        self.stamp = 0

    # -- vCPU threads -------------------------------------------------------------------
    def _loop(self, i: int) -> None:
        vcpu, st = self.g.vcpus[i], self.loops[i]
        try:
            while not self._stop.is_set():
                ex = vcpu.run()
                if isinstance(ex, InterruptedExit):
                    st.interrupts += 1
                    if self._kick_park:
                        # Round ended by a kick: park here, wherever the guest was, noting
                        # the store it left unfinished (loaded stamp, not yet stored), if any.
                        regs = vcpu.get_regs()
                        st.pending = (regs.rdi, regs.rax) if regs.rip in self._stamp_store_rips else None
                        st.go.clear()
                        st.parked.set()
                        while not st.go.wait(0.05):
                            if self._stop.is_set():
                                return
                    continue
                if isinstance(ex, DirtyRingFullExit):
                    # KVM stops a vCPU whose ring is (soft) full; it may only run on after a reset.
                    st.ring_full += 1
                    if st.unharvested_resumes < self.ring_full_resumes:
                        # A VMM may re-enter by mistake (upstream's dirty_log_test does, after a
                        # stray wakeup): KVM must refuse to run the guest into a full ring.
                        st.unharvested_resumes += 1
                        continue
                    st.unharvested_resumes = 0
                    with self._harvest_cv:
                        gen = self._harvest_gen
                        self._harvest_needed.set()
                        while self._harvest_gen == gen and not self._stop.is_set():
                            self._harvest_cv.wait(0.05)
                    continue
                call = None
                if isinstance(ex, IoExit):
                    gpa = ucall_gpa(ex.port, ex.size, ex.direction, ex.data)
                    call = None if gpa is None else decode(self.vm, gpa)
                if call is None:
                    raise KvmError(f"{self.label}: vCPU {i}: unexpected exit {ex}\n{format_regs(vcpu)}")
                if isinstance(call, SyncCall) and call.stage == STAGE_PARKED:
                    st.go.clear()
                    st.parked.set()
                    while not st.go.wait(0.05):
                        if self._stop.is_set():
                            return
                elif isinstance(call, SyncCall) or isinstance(call, PrintfCall):
                    continue
                elif isinstance(call, DoneCall):
                    st.done = True
                    st.parked.set()
                    return
                elif isinstance(call, AssertCall):
                    raise GuestAssertError(i, call)
                elif isinstance(call, ExceptionCall):
                    raise GuestExceptionError(i, call, self.g.elf.symbolize(call.rip))
        except BaseException as e:  # noqa: BLE001 - re-raised on the host thread
            self._errors.append(e)
            self._stop.set()
            st.parked.set()

    def _check_errors(self) -> None:
        if self._errors:
            raise self._errors[0]

    def start(self, timeout: float = 10.0) -> None:
        """Start the vCPU threads and wait until every vCPU parks for the first time."""
        for i, st in enumerate(self.loops):
            st.thread = threading.Thread(target=self._loop, args=(i,), name=f"dirty-vcpu{i}", daemon=True)
            st.thread.start()
        self._started = True
        self._wait_parked(timeout, collect=False)

    def _wait_parked(self, timeout: float, collect: bool) -> None:
        deadline = time.monotonic() + timeout
        while not all(st.parked.is_set() for st in self.loops):
            self._check_errors()
            if time.monotonic() > deadline:
                where = ", ".join(f"vCPU {i}: {'parked' if st.parked.is_set() else 'running'}"
                                  f" at {self.g._rip(self.g.vcpus[i])}" for i, st in enumerate(self.loops))
                raise KvmError(f"{self.label}: vCPUs did not reach their sync point within {timeout:g} s ({where})")
            if collect:
                # A vCPU stopped by a full ring reaches its sync point only after a harvest.
                self._harvest_needed.wait(0.005)
                self.collect()
            else:
                time.sleep(0.002)
        self._check_errors()

    # -- host side ---------------------------------------------------------------------
    def collect(self) -> dict[int, list[int]]:
        """One collection of every logged slot, fed to the checkers; wakes ring-full vCPUs."""
        got = self.collector.collect(self.vm, self.logged)
        record_all(self.checkers, got)
        with self._harvest_cv:
            self._harvest_needed.clear()
            self._harvest_gen += 1
            self._harvest_cv.notify_all()
        return got

    def writes(self) -> int:
        """Writes done so far by all vCPUs (guest counters)."""
        return sum(self.g.read_global("nr_writes", offset=8 * i) for i in range(len(self.loops)))

    def set_stamp(self, stamp: int, must_report: bool = True) -> None:
        """Start a new phase inside the running round: the guest now writes ``stamp``."""
        for c in self.checkers.values():
            c.add_phase(stamp, must_report)
        self.stamp = stamp
        self.g.write_global("iteration", stamp)

    def run_round(self, *, min_writes: int = 200, min_time: float = 0.0, collect_every: float | None = 0.01,
                  max_time: float = 30.0, during: Callable[["DirtyWriterVm"], None] | None = None,
                  must_report: bool = True, end_by_kick: bool = False,
                  restamp: bool = True, kick_collect: bool = False,
                  stall_time: float | None = None) -> dict[int, RoundReport]:
        """Run one round (see the module doc) and verify it; returns {slot: RoundReport}.

        ``collect_every=None`` collects while the guest runs only when a ring is full.
        ``during(self)`` runs on the host thread once the guest is writing.
        ``restamp`` hands out a new stamp after every concurrent collection, so the
        checker knows which collection must have logged each store.
        ``end_by_kick`` stops the vCPUs with kicks wherever they are (like upstream's
        dirty_log_test) instead of at their sync point; a vCPU stopped between loading
        its stamp and storing it (its registers say so) leaves exactly that store
        pending: the checker excuses it this round and demands it next round.
        ``kick_collect`` kicks every vCPU out of KVM_RUN before each concurrent
        collection and waits for the exit (the vCPU re-enters at once): upstream's
        dirty_log_test collects the dirty ring this way, racing its kicks with
        KVM_EXIT_DIRTY_RING_FULL.
        ``stall_time``: if the guest makes no write for that long (a vCPU KVM keeps
        from running, e.g. RING_FULL exit after exit with nothing to harvest), end
        the round there instead of failing on ``max_time``: the page check then
        shows what the log lost. Needs ``end_by_kick`` (a wedged vCPU never reaches
        its sync point).
        """
        if stall_time is not None and not end_by_kick:
            raise ValueError("stall_time needs end_by_kick")
        if not self._started:
            self.start()
        self.stamp += 1
        for c in self.checkers.values():
            c.begin_round(self.stamp, must_report)
        self.g.write_global("iteration", self.stamp)
        self.g.write_global("stop", 0)
        w0 = self.writes()
        self._kick_park = False
        for st in self.loops:
            st.parked.clear()
            st.pending = None
            st.go.set()
        start = time.monotonic()
        first_collection = getattr(self.collector, "collections", 0) + 1
        ring_full0 = self.ring_full_exits
        ran_during = during is None
        last_n, last_progress, stalled = -1, start, False
        while True:
            self._check_errors()
            now = time.monotonic()
            n = self.writes() - w0
            if n != last_n:
                last_n, last_progress = n, now
            elif stall_time is not None and now - last_progress > stall_time:
                stalled = True
                break
            if not ran_during and n >= min_writes // 2:
                during(self)
                ran_during = True
                continue
            if ran_during and n >= min_writes and now - start >= min_time:
                break
            if now - start > max_time:
                raise KvmError(f"{self.label}: round {self.stamp}: only {n} guest writes in {max_time:g} s "
                               f"(wanted {min_writes}): is the guest making progress?")
            if collect_every is None:
                if self._harvest_needed.wait(0.005):
                    # A new stamp only after a collection that found something: one after an
                    # empty one would say nothing more (and a KVM that exits with RING_FULL
                    # over an empty ring would make thousands).
                    if any(self.collect().values()) and restamp:
                        self.set_stamp(self.stamp + 1, must_report)
            else:
                self._harvest_needed.wait(collect_every)
                if kick_collect:
                    self._kick_all()
                self.collect()
                if restamp:
                    self.set_stamp(self.stamp + 1, must_report)
        if end_by_kick:
            self._kick_park = True
            for v in self.g.vcpus:
                v.kick()
        else:
            self._kick_park = False
            self.g.write_global("stop", 1)
        self._wait_parked(max_time, collect=True)
        if end_by_kick:
            for st in self.loops:
                if st.pending is not None:
                    self._note_pending(*st.pending)
        self.collect()  # quiescent: every vCPU sits at its sync point
        nwrites = self.writes() - w0
        reports = {}
        try:
            for ms in self.logged:
                reports[ms.slot] = self.checkers[ms.slot].verify(read_stamps(ms.view))
        except DirtyLogMismatch as e:
            extra = self.ring_summary(first_collection, ring_full0)
            if stalled:
                extra = (f"  the guest STALLED: no write for {stall_time:g} s after {last_n} writes this round "
                         f"(ended by kick)" + ("\n" + extra if extra else ""))
            if not extra:
                raise
            raise DirtyLogMismatch(f"{e}\n{extra}", e.problems) from None
        ring_full = sum(st.ring_full for st in self.loops)
        self.round_log.append(f"{self.label}: round {self.stamp}: {nwrites} writes"
                              + (f" (STALLED: no write for {stall_time:g} s)" if stalled else "") + " in "
                              f"{time.monotonic() - start:.2f} s, ring-full exits so far {ring_full}; "
                              + "; ".join(f"slot {s}: {r}" for s, r in reports.items()))
        return reports

    def _kick_all(self, timeout: float = 1.0) -> None:
        """Kick every running vCPU and wait until each has left KVM_RUN once (it re-enters)."""
        before = [st.interrupts for st in self.loops]
        for v in self.g.vcpus:
            v.kick()
        deadline = time.monotonic() + timeout
        for st, n in zip(self.loops, before):
            # A vCPU waiting for a harvest after RING_FULL sees the kick when it re-enters.
            while st.interrupts == n and not self._harvest_needed.is_set() and time.monotonic() < deadline:
                time.sleep(0.0005)

    def _note_pending(self, gva: int, stamp: int) -> None:
        """Tell the checker of the logged slot holding ``gva`` about a pending store."""
        first = TEST_GVA
        for spec, ms in self.slots:
            if first <= gva < first + spec.npages * PAGE_SIZE:
                if spec.logged:
                    self.checkers[ms.slot].note_pending_store((gva - first) // PAGE_SIZE, stamp)
                return
            first += spec.npages * PAGE_SIZE
        raise KvmError(f"{self.label}: a kicked vCPU was storing to GVA {gva:#x}, outside the test slots")

    def ring_summary(self, first_collection: int = 1, ring_full0: int = 0, limit: int = 24) -> str:
        """The dirty ring's fill levels since collection ``first_collection`` ('' without a ring).

        A harvest after a KVM_EXIT_DIRTY_RING_FULL should hold the soft limit (ring
        entries - 64) plus the few entries pushed before the exit; a harvest of the
        whole ring means KVM pushed past its soft limit and may have overwritten
        entries the host had not harvested yet (the oldest, i.e. the first pushed).
        """
        harvests = getattr(self.collector, "harvests", None)
        if harvests is None:
            return ""
        size = self.collector.ring_bytes // 16
        rows = [h for h in harvests if h[0] >= first_collection]
        full = [h for h in rows if h[2] >= size]
        lines = [f"  dirty ring: {size} entries per vCPU (soft limit {size - 64}); this round "
                 f"{self.ring_full_exits - ring_full0} KVM_EXIT_DIRTY_RING_FULL exits, {len(rows)} non-empty "
                 f"harvests, {len(full)} of them the WHOLE ring ({size} entries: pushed past the soft limit, "
                 f"oldest entries overwritten?)"]
        shown = rows if len(rows) <= limit else rows[:limit // 2] + rows[-limit // 2:]
        lines.append("  harvests (collection: vCPU, entries, first entry slot/page): " + "; ".join(
            f"{c}: vCPU {v}, {n}{' (WHOLE RING)' if n >= size else ''}, first {slot}/{off}"
            for c, v, n, (slot, off) in shown) + (f" ... ({len(rows)} in all)" if len(rows) > limit else ""))
        return "\n".join(lines)

    @property
    def ring_full_exits(self) -> int:
        return sum(st.ring_full for st in self.loops)

    def close(self) -> None:
        """Stop the guest (quit at its sync point, else kick) and release everything."""
        if self.g is not None and getattr(self, "loops", None) and self._started:
            try:
                self.g.write_global("quit", 1)
            except KvmError:
                pass
            for st in self.loops:
                st.go.set()
            deadline = time.monotonic() + 2.0
            for st in self.loops:
                if st.thread is not None:
                    st.thread.join(max(0.0, deadline - time.monotonic()))
            self._stop.set()
            with self._harvest_cv:
                self._harvest_cv.notify_all()
            for _ in range(100):
                alive = [i for i, st in enumerate(self.loops) if st.thread and st.thread.is_alive()]
                if not alive:
                    break
                for i in alive:
                    self.g.vcpus[i].kick()
                    self.loops[i].thread.join(0.05)
        if self.g is not None:
            self.g.close()
            self.g = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None

    def __enter__(self) -> "DirtyWriterVm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
