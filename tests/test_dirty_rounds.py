"""No fixed waits in the round driver and the vCPU loop, without KVM: fakes for the writer and the vCPUs."""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmpy.dirtylog.checker import DirtyLogMismatch
from kvmpy.dirtylog.rounds import RoundPlan, run_round
from kvmpy.dirtylog.writer import FUTILE_RING_FULL_STALL, DirtyWriterVm
from kvmpy.exits import InterruptedExit
from kvmpy.guest.stepper import SteppedGuest
from kvmpy.guest.vcpu_loop import VcpuThreads


class EmptyCollector:
    """A dirty ring with nothing in it, however often a vCPU says it is full."""

    name = "dirty-ring"

    def collect(self, vm, slots):
        return {1: []}


def bare_writer(collector) -> DirtyWriterVm:
    """The collection side of a DirtyWriterVm (no VM, no vCPU)."""
    d = DirtyWriterVm.__new__(DirtyWriterVm)
    d.collector, d.vm, d.logged = collector, None, []
    d.checkers = {1: SimpleNamespace(record=lambda pages: None)}
    d.harvest_needed, d._harvest_cv, d._harvest_gen, d.futile_ring_full = threading.Event(), threading.Condition(), 0, 0
    return d


def test_ring_full_exits_answered_by_empty_harvests_are_a_stall():
    d = bare_writer(EmptyCollector())
    for _ in range(FUTILE_RING_FULL_STALL - 1):
        d.harvest_needed.set()          # the vCPU exits RING_FULL again...
        d.collect()                     # ...and there is nothing to harvest
    assert not d.stalled_on_ring_full()
    d.collect()                         # a collection nobody asked for says nothing
    assert d.futile_ring_full == FUTILE_RING_FULL_STALL - 1
    d.harvest_needed.set()
    d.collect()
    assert d.stalled_on_ring_full()
    d.collector = SimpleNamespace(collect=lambda vm, slots: {1: [7]})
    d.collect()                         # a harvest with something in it: progress
    assert d.futile_ring_full == 0


class StormWriter:
    """What run_round sees of a guest KVM keeps exiting RING_FULL with nothing to harvest."""

    label, stamp, collections, ring_full_exits, futile_ring_full = "storm", 1, 0, 0, FUTILE_RING_FULL_STALL

    def __init__(self):
        self.guest = SimpleNamespace(check=lambda: None)
        self.harvest_needed = threading.Event()
        self.ended = []

    def begin_round(self, must_report):
        return 0

    def writes(self):
        return 4096

    def progress(self):
        return 4096, 0

    def stalled_on_ring_full(self):
        return True

    def end_round(self, by_kick, timeout, mid_store):
        self.ended.append(by_kick)

    def verify(self):
        raise DirtyLogMismatch("dirty log mismatch: 12 pages changed but NOT reported (false negative)", {})

    def ring_summary(self, first, ring_full0):
        return "dirty ring: 65536 entries per vCPU"


def test_a_ring_full_storm_ends_the_round_at_once_not_after_stall_time():
    d = StormWriter()
    # stall_time is an hour: the round ends on the exits alone (or this test would not end).
    with pytest.raises(DirtyLogMismatch) as e:
        run_round(d, RoundPlan(min_writes=10 ** 9, collect_every=None, end_by_kick=True, stall_time=3600.0))
    assert d.ended == [True]
    assert (f"the guest STALLED: {FUTILE_RING_FULL_STALL} KVM_EXIT_DIRTY_RING_FULL exits in a row with nothing "
            f"to harvest after 4096 writes this round (ended by kick)") in str(e.value)
    assert str(e.value).endswith("dirty ring: 65536 entries per vCPU")


class KickedVcpu:
    """A vCPU whose KVM_RUN returns only when kicked (EINTR)."""

    def __init__(self):
        self.kicked = threading.Event()

    def run(self):
        self.kicked.wait()
        self.kicked.clear()
        return InterruptedExit(4)

    def kick(self):
        self.kicked.set()


class FakeGuestVm:
    """What SteppedGuest uses of a GuestVm: vCPUs, the one vCPU loop, close."""

    def __init__(self, n):
        self.vcpus = [KickedVcpu() for _ in range(n)]
        self.elf = SimpleNamespace(path=Path("fake.elf"))
        self.threads = None

    def start(self, **hooks):
        self.threads = VcpuThreads(self.vcpus, None, None, str, **hooks)
        self.threads.start()
        return self.threads

    def close(self):
        self.threads.stop()


def test_closing_a_guest_parked_by_kicks_wakes_its_vcpus_instead_of_waiting_out_a_poll():
    """Parked vCPUs wait on their go event alone (no timeout): close() must wake them, or it hangs."""
    g = FakeGuestVm(2)
    stopped = []
    guest = SteppedGuest(g, stop={"quit": 1}, on_stop=lambda: stopped.append(True))
    guest._threads = g.start(on_sync=guest._on_sync, on_exit=guest._on_exit, on_stop=guest._on_stop)
    guest.park_by_kick()
    guest.wait_parked(10)
    closer = threading.Thread(target=guest.close, daemon=True)
    closer.start()
    closer.join(30)   # a deadline for a hang only: a passing close returns at once
    assert not closer.is_alive(), "close() left the parked vCPUs waiting"
    assert not g.threads.running and stopped == [True] and guest.stopping.is_set()


def test_on_stop_runs_once_when_a_vcpu_fails_and_stop_follows():
    calls = []
    vcpu = KickedVcpu()
    t = VcpuThreads([vcpu], None, None, str, on_exit=lambda i, ex: 1 / 0, on_stop=lambda: calls.append(1))
    t.start()
    vcpu.kick()
    assert t.wait(30)
    t.stop()
    assert calls == [1] and isinstance(t.errors[0], ZeroDivisionError)


def test_the_writer_wakes_a_vcpu_waiting_for_a_harvest_when_the_run_ends():
    d = bare_writer(EmptyCollector())
    d.guest = SimpleNamespace(stopping=threading.Event())
    d.ring_full_resumes, d._ring_full, d._unharvested_resumes, d._reentry_stop = 0, [0], [0], [None]
    from kvmpy.exits import DirtyRingFullExit

    waiter = threading.Thread(target=d._on_exit, args=(0, DirtyRingFullExit(31)), daemon=True)
    waiter.start()
    assert d.harvest_needed.wait(30)
    d.guest.stopping.set()
    d._wake_on_stop()
    waiter.join(30)
    assert not waiter.is_alive(), "the vCPU kept waiting for a harvest after the run ended"



class FakeRingVcpu:
    """A vCPU stopped at the writer's store: what _on_exit reads at a RING_FULL exit."""

    def __init__(self):
        self.rip, self.rdi = 0x401000, 0x1_0000_5000

    def get_regs(self):
        return SimpleNamespace(rip=self.rip, rdi=self.rdi)


class FakeRing:
    """A dirty ring's state as the collector reports it between harvests."""

    def __init__(self):
        self.fetch_index, self.published = 192, 193

    def ring_state(self, vcpu):
        return self.fetch_index, self.published


def reentering_writer():
    """A DirtyWriterVm that re-enters KVM_RUN once after each RING_FULL exit, over fakes."""
    import struct

    d = bare_writer(EmptyCollector())
    d.guest = SimpleNamespace(stopping=threading.Event())
    d.ring_full_resumes, d._ring_full, d._unharvested_resumes, d._reentry_stop = 1, [0], [0], [None]
    d.refused_reentries = d.harvested_reentries = 0
    d.ran_reentries = []
    d.collector = FakeRing()
    vcpu = FakeRingVcpu()
    d.g = SimpleNamespace(vcpus=[vcpu])
    d._nr_writes, d._nr_writes_fmt = bytearray(8), struct.Struct("<1Q")
    return d, vcpu


def set_writes(d, n):
    d._nr_writes_fmt.pack_into(d._nr_writes, 0, n)


@pytest.mark.parametrize("ran", ["none", "store-retired", "entry-pushed", "other-page", "other-exit"])
def test_a_reentry_into_a_full_ring_is_refused_only_if_nothing_of_the_guest_moved(ran):
    """At every RING_FULL exit the guest stops at its store, so the RIP alone would pass a KVM
    that ran it on: its write counter, the store's target and the ring's entries must not move."""
    from kvmpy.exits import DirtyRingFullExit, MmioExit

    d, vcpu = reentering_writer()
    set_writes(d, 4000)
    assert d._on_exit(0, DirtyRingFullExit(31)) is True      # re-entered, unreset
    assert d._reentry_stop[0] is not None
    if ran == "store-retired":       # the store retired, the next one stopped at the same RIP
        set_writes(d, 4001)
        vcpu.rdi += 0x3000
    elif ran == "entry-pushed":
        d.collector.published += 1
    elif ran == "other-page":
        vcpu.rdi += 0x1000
    if ran == "other-exit":          # the guest ran up to a ucall: the hook sees that exit too
        set_writes(d, 4001)
        assert d._on_exit(0, MmioExit(6, 0xF000_0000, 8, True)) is False
    else:
        waiter = threading.Thread(target=d._on_exit, args=(0, DirtyRingFullExit(31)), daemon=True)
        waiter.start()
        assert d.harvest_needed.wait(30)  # the second exit waits for the harvest
        d.guest.stopping.set()
        d._wake_on_stop()
        waiter.join(30)
    assert d.unreset_reentries == 1
    if ran == "none":
        assert d.refused_reentries == 1 and not d.ran_reentries
    else:
        assert d.refused_reentries == 0 and len(d.ran_reentries) == 1, d.ran_reentries
        assert "KVM_RUN into its full, unreset ring" in d.ran_reentries[0]


def test_a_reentry_overtaken_by_a_harvest_proves_nothing():
    from kvmpy.exits import DirtyRingFullExit

    d, vcpu = reentering_writer()
    assert d._on_exit(0, DirtyRingFullExit(31)) is True
    d.collector.fetch_index += 193     # harvested and reset before KVM_RUN: KVM may run the guest
    d.collector.published = 3
    set_writes(d, 57)
    d.guest.stopping.set()
    d._on_exit(0, DirtyRingFullExit(31))
    assert (d.unreset_reentries, d.refused_reentries, d.harvested_reentries, d.ran_reentries) == (0, 0, 1, [])
