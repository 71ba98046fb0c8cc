"""`kvmpy perf dirty-log`: the phases of the kernel's dirty_log_perf_test, timed the same way.

The memstress guest (kvmpy.perf.memstress) first populates its memory (100 %
writes, in order), then dirty logging is enabled on the test memslots and each
iteration lets every vCPU do one pass, then fetches the dirty log (and clears
it, under manual protect), before logging is disabled again. Each phase is
timed around exactly what dirty_log_perf_test times, and printed in its words;
``--json`` gives the same numbers (and the VM stats deltas of every phase) as
one JSON object.

Dirty-log modes: KVM_GET_DIRTY_LOG (with KVM_CLEAR_DIRTY_LOG under
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, with INITIALLY_SET when offered, unless
``manual_protect=False``), or per-vCPU dirty rings (harvested on
KVM_EXIT_DIRTY_RING_FULL by the vCPU's thread, and by the host each iteration).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

from kvmpy import dirty_ring, faults
from kvmpy.abi import lib
from kvmpy.bitmap import DirtyBitmap
from kvmpy.dirty_ring import GFN_SIZE
from kvmpy.errors import IoctlError, KvmError, RequirementError
from kvmpy.exits import DirtyRingFullExit, Exit
from kvmpy.kvm import Kvm
from kvmpy.perf.memstress import Memstress, MemstressConfig
from kvmpy.perf.params import module_param
from kvmpy.record import Factory, Record
from kvmpy.stats import Snapshot
from kvmpy.vm import Vm


class OptionConflict(KvmError):
    """Two options that cannot both apply (one of them would silently do nothing): a usage error."""


NOT_A_MEASUREMENT = "kvmpy is deliberately broken for this run; these results are not a measurement"


def faults_banner() -> str | None:
    """The loud line of a run with faults injected (None without): its times measure a broken kvmpy."""
    return faults.banner(NOT_A_MEASUREMENT)


class DirtyLogOptions(Record, frozen=True):
    """One run of the dirty-log performance test."""

    memstress: MemstressConfig = Factory(MemstressConfig)
    iterations: int = 2
    write_percent: int = 100
    random_access: bool = False
    manual_protect: bool = True        # C: on unless -g
    clear_chunk: int | None = None     # pages per KVM_CLEAR_DIRTY_LOG (default: the whole slot)
    dirty_ring: int = 0                # entries per vCPU ring; 0: the dirty bitmap
    eager_split: bool | None = None    # set kvm.eager_page_split for the run (restored after)
    timeout: float = 3600.0            # seconds per pass of the guest

    def check(self) -> None:
        """KvmError for a value out of range; OptionConflict for options of which one would not apply."""
        self.memstress.check()
        self.check_conflicts()
        if self.iterations < 2:
            raise KvmError("the test needs at least two iterations (as dirty_log_perf_test)")
        if not 0 <= self.write_percent <= 100:
            raise KvmError(f"write percentage {self.write_percent} is not 0..100")
        if self.clear_chunk is not None and (self.clear_chunk <= 0 or self.clear_chunk % 64):
            raise KvmError(f"clear chunk {self.clear_chunk} is not a positive multiple of 64 pages")
        if self.dirty_ring and (self.dirty_ring & (self.dirty_ring - 1) or self.dirty_ring < 64):
            raise KvmError(f"dirty ring of {self.dirty_ring} entries: a power of two, at least 64")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise KvmError(f"timeout {self.timeout}: a finite number of seconds, more than 0")

    def check_conflicts(self) -> None:
        """OptionConflict (naming both command-line options) where one option would do nothing."""
        if self.dirty_ring and self.clear_chunk is not None:
            raise OptionConflict("--clear-chunk and --dirty-ring: with the dirty ring no KVM_CLEAR_DIRTY_LOG is "
                                 "issued (the ring is reset with KVM_RESET_DIRTY_RINGS); drop one of them")
        if self.dirty_ring and not self.manual_protect:
            raise OptionConflict("-g and --dirty-ring: -g turns off manual protect of KVM_GET_DIRTY_LOG, which "
                                 "the dirty ring does not use; drop one of them")
        if not self.manual_protect and self.clear_chunk is not None:
            raise OptionConflict("--clear-chunk and -g: without manual protect (-g) no KVM_CLEAR_DIRTY_LOG is "
                                 "issued (KVM_GET_DIRTY_LOG re-protects); drop one of them")
        if not self.memstress.partition and self.memstress.vcpus == 1:
            raise OptionConflict("-o with -v 1: one vCPU covers all the memory either way (overlap needs "
                                 "-v 2 or more); drop -o, or add vCPUs")

    def check_host(self, kvm: Kvm) -> None:
        """What this host's KVM must offer for these options, checked before the VM is built:
        RequirementError (the host lacks it) or KvmError (a value KVM would refuse)."""
        if self.dirty_ring:
            limit = (kvm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
                     or kvm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING))
            if not limit:
                raise RequirementError("--dirty-ring: KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING is 0)")
            why = dirty_ring.size_problem(self.dirty_ring * GFN_SIZE, limit)
            if why:
                raise KvmError(f"--dirty-ring {self.dirty_ring}: {why}")
        elif self.clear_chunk is not None and not kvm.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
            raise RequirementError("--clear-chunk: KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, so no "
                                   "KVM_CLEAR_DIRTY_LOG would be issued")
        self.memstress.check_host()


class Iteration(Record):
    dirty: float = 0.0        # s: every vCPU's pass
    get_log: float = 0.0      # s: KVM_GET_DIRTY_LOG of every slot, or harvest + reset of every ring
    clear_log: float = 0.0    # s: KVM_CLEAR_DIRTY_LOG of every slot (manual protect)
    dirty_pages: int = 0      # pages the log reported (bits set, or ring entries of this fetch)


class DirtyLogReport(Record):
    """The times of every phase (seconds) and the VM stats deltas of each."""

    options: DirtyLogOptions
    gpa_range: tuple[int, int]
    mode: str
    populate: float = 0.0
    enable: float = 0.0
    iterations: list[Iteration] = Factory(list)
    disable: float = 0.0
    ring_full_harvested: int = 0
    stats: dict[str, dict] = Factory(dict)
    faults: list[str] = Factory(list)     # KVMPY_FAULTS of the run: not a measurement

    def to_dict(self) -> dict:
        o, m = self.options, self.options.memstress
        marks = {"faults": self.faults}
        if self.faults:
            marks["warning"] = faults.banner(NOT_A_MEASUREMENT, self.faults)
        return {
            **marks,
            "config": {"vcpus": m.vcpus, "vcpu_bytes": m.vcpu_bytes, "slots": m.slots,
                       "backing": str(m.backing or "anonymous"), "partition": m.partition,
                       "privilege": "CPL3" if m.user_mode else "ring 0", "nested": m.nested, "seed": m.seed,
                       "iterations": o.iterations, "write_percent": o.write_percent,
                       "random_access": o.random_access, "mode": self.mode, "clear_chunk": o.clear_chunk,
                       "dirty_ring": o.dirty_ring, "eager_split": o.eager_split},
            "guest_memory": list(self.gpa_range),
            "phases": {"populate": self.populate, "enable": self.enable, "disable": self.disable},
            "iterations": [vars(it) for it in self.iterations],
            "get_log_total": sum(it.get_log for it in self.iterations),
            "clear_log_total": sum(it.clear_log for it in self.iterations),
            "ring_full_harvested": self.ring_full_harvested,
            "stats": self.stats,
        }


def _secs(t: float) -> str:
    return f"{int(t)}.{int(round((t - int(t)) * 1e9)):09d}s"


class _DirtyLog:
    """Fetching (and clearing) the dirty log of the test slots, in one of the modes."""

    def __init__(self, opts: DirtyLogOptions) -> None:
        self.opts = opts
        self.ring_full_harvested = 0
        self.manual = False
        self.bitmaps: dict[int, DirtyBitmap] = {}
        self.vm: Vm | None = None

    @property
    def mode(self) -> str:
        if self.opts.dirty_ring:
            return f"dirty ring ({self.opts.dirty_ring} entries per vCPU)"
        return "dirty bitmap, manual protect" if self.manual else "dirty bitmap"

    def before_vcpus(self, vm: Vm) -> None:
        if self.opts.dirty_ring:
            try:
                vm.enable_dirty_ring(self.opts.dirty_ring * GFN_SIZE)
            except IoctlError as e:
                raise KvmError(f"--dirty-ring {self.opts.dirty_ring}: KVM refused a ring of "
                               f"{self.opts.dirty_ring * GFN_SIZE} bytes ({e})") from None

    def on_exit(self, i: int, ex: Exit) -> bool:
        """On vCPU ``i``'s thread: a full ring is harvested there and reset (KVM_RESET_DIRTY_RINGS)."""
        if not isinstance(ex, DirtyRingFullExit) or self.vm is None:
            return False
        self.ring_full_harvested += len(self.vm.vcpus[i].dirty_ring.harvest_arrays())
        self.vm.reset_dirty_rings()
        return True

    def setup(self, ms: Memstress) -> None:
        self.vm = ms.vm
        if not self.opts.dirty_ring and self.opts.manual_protect:
            offered = ms.vm.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            if offered:
                ms.vm.enable_manual_protect(initially_set=bool(offered & lib.KVM_DIRTY_LOG_INITIALLY_SET))
                self.manual = True
        self.bitmaps = {s.slot: DirtyBitmap(s.npages) for s in ms.slots}

    def get(self, ms: Memstress) -> int:
        """Fetch the log (timed by the caller); returns nothing to count in bitmap mode (-1)."""
        vm = ms.vm
        if self.opts.dirty_ring:
            n = sum(len(v.dirty_ring.harvest_arrays()) for v in vm.vcpus.values())
            vm.reset_dirty_rings()
            return n
        for slot, bm in self.bitmaps.items():
            vm.get_dirty_log(slot, bm)
        return -1

    def clear(self, ms: Memstress) -> None:
        for slot, bm in self.bitmaps.items():
            step = self.opts.clear_chunk or bm.npages
            for first in range(0, bm.npages, step):
                ms.vm.clear_dirty_log(slot, bm, first, min(step, bm.npages - first))


def run(opts: DirtyLogOptions, out: Callable[[str], None] = print) -> DirtyLogReport:
    """Run the test; ``out`` gets each line of the printout as its phase ends.

    Everything that can be checked before the VM exists is: the options, KVMPY_FAULTS,
    and what this host's KVM and memory offer. With faults injected the printout
    starts and ends with a line saying so, and the report lists them.
    """
    opts.check()
    banner = faults_banner()       # FaultError (a KvmError) for an unknown name, before anything runs
    log = _DirtyLog(opts)
    now = time.perf_counter
    with contextlib.ExitStack() as stack:
        kvm = stack.enter_context(Kvm())        # one /dev/kvm: the host checks, then the VM
        opts.check_host(kvm)
        if banner:
            out(banner)
        stack.enter_context(module_param("kvm", "eager_page_split", opts.eager_split, out))
        ms = stack.enter_context(Memstress(opts.memstress, kvm=kvm, before_vcpus=log.before_vcpus,
                                           on_exit=log.on_exit))
        log.setup(ms)
        rep = DirtyLogReport(opts, ms.gpa_range, log.mode, faults=sorted(faults.enabled()))
        m = opts.memstress
        out(f"Test iterations: {opts.iterations}")
        out(f"Guest: {m.vcpus} vCPU(s) at {'CPL3 (user mode)' if m.user_mode else 'ring 0'}"
            f"{', in L2 (nested)' if m.nested else ''}, 4K guest pages, {m.backing or 'anonymous'} backing, "
            f"{m.slots} memslot(s), {log.mode}")
        out(f"guest physical test memory: [{ms.gpa_range[0]:#x}, {ms.gpa_range[1]:#x})")
        stats = _StatsDeltas(ms.vm, rep.stats)

        t0 = now()
        ms.start(opts.timeout)
        rep.populate = now() - t0
        out(f"Populate memory time: {_secs(rep.populate)}")
        stats.take("populate")

        t0 = now()
        for s in ms.slots:
            ms.vm.enable_dirty_logging(s.slot)
        rep.enable = now() - t0
        out(f"Enabling dirty logging time: {_secs(rep.enable)}\n")
        stats.take("enable")

        ms.set_access(opts.write_percent, opts.random_access)
        for i in range(1, opts.iterations + 1):
            it = Iteration()
            t0 = now()
            ms.run_pass(opts.timeout)
            it.dirty = now() - t0
            out(f"Iteration {i} dirty memory time: {_secs(it.dirty)}")
            t0 = now()
            n = log.get(ms)
            it.get_log = now() - t0
            out(f"Iteration {i} get dirty log time: {_secs(it.get_log)}")
            it.dirty_pages = n if n >= 0 else sum(bm.count() for bm in log.bitmaps.values())
            if log.manual:
                t0 = now()
                log.clear(ms)
                it.clear_log = now() - t0
                out(f"Iteration {i} clear dirty log time: {_secs(it.clear_log)}")
            rep.iterations.append(it)
            stats.take(f"iteration {i}")

        t0 = now()
        for s in ms.slots:
            ms.vm.enable_dirty_logging(s.slot, False)
        rep.disable = now() - t0
        out(f"Disabling dirty logging time: {_secs(rep.disable)}")
        stats.take("disable")
        rep.ring_full_harvested = log.ring_full_harvested

    get_total = sum(it.get_log for it in rep.iterations)
    out(f"Get dirty log over {opts.iterations} iterations took {_secs(get_total)}. "
        f"(Avg {_secs(get_total / opts.iterations)}/iteration)")
    if log.manual:
        clear_total = sum(it.clear_log for it in rep.iterations)
        out(f"Clear dirty log over {opts.iterations} iterations took {_secs(clear_total)}. "
            f"(Avg {_secs(clear_total / opts.iterations)}/iteration)")
    for phase, deltas in rep.stats.items():
        if deltas:
            out(f"VM stats, {phase}: " + " ".join(f"{k}={v:+d}" for k, v in deltas.items()))
    if banner:
        out(banner)
    return rep


class _StatsDeltas:
    """The VM stats deltas of each phase (non-zero ones), taken outside the timed parts."""

    def __init__(self, vm: Vm, into: dict[str, dict]) -> None:
        self.vm = vm
        self.into = into
        self.last: Snapshot | None = vm.stats.snapshot() if vm.check_extension(lib.KVM_CAP_BINARY_STATS_FD) else None

    def take(self, phase: str) -> None:
        if self.last is None:
            return
        snap = self.vm.stats.snapshot()
        self.into[phase] = {k: v for k, v in (snap - self.last).items() if v and not isinstance(v, tuple)}
        self.last = snap
