"""Unit tests of kvmpy.dirtylog's checker and collectors: the page-exact rules, without /dev/kvm."""
from __future__ import annotations

import struct

import pytest

from kvmpy.abi import ffi, lib
from kvmpy.bitmap import DirtyBitmap
from kvmpy.dirty_ring import GFN_SIZE, DirtyRing
from kvmpy.dirtylog.checker import DirtyLogChecker, DirtyLogMismatch, read_stamps
from kvmpy.memory import PAGE_4K
from kvmpy.dirtylog.collectors import (LOG_MODES, ClearDirtyLogCollector, DirtyRingCollector, GetDirtyLogCollector,
                                       collector_by_name)

N = 130  # not a multiple of 64 on purpose


class FakeGuest:
    """Page stamps plus a model 'KVM' that logs every write exactly."""

    def __init__(self, npages: int = N) -> None:
        self.stamps = [0] * npages
        self.logged: set[int] = set()

    def write(self, page: int, stamp: int, log: bool = True) -> None:
        self.stamps[page] = stamp
        if log:
            self.logged.add(page)

    def harvest(self) -> list[int]:
        out, self.logged = sorted(self.logged), set()
        return out


def run_round(chk: DirtyLogChecker, g: FakeGuest, stamp: int, pages, harvest=None):
    chk.begin_round(stamp)
    for p in pages:
        g.write(p, stamp)
    got = g.harvest()
    chk.record(harvest(got) if harvest else got)
    return chk.verify(g.stamps)


def test_exact_log_passes_several_rounds():
    chk, g = DirtyLogChecker(N, label="unit"), FakeGuest()
    for r, pages in enumerate([[0, 5, 129], [5, 64, 65], [], [1, 2, 3, 127]], start=1):
        rep = run_round(chk, g, r, pages)
        assert rep.changed == len(set(pages)) and rep.reported == len(set(pages))
    assert chk.total_changed == 10


def test_dropping_one_page_from_the_harvest_fails():
    """A deliberately broken harvest (one page dropped) must be caught and named."""
    chk, g = DirtyLogChecker(N, label="dirty-ring-anonymous", slot=1), FakeGuest()
    run_round(chk, g, 1, [3, 4, 5])
    with pytest.raises(DirtyLogMismatch) as ei:
        run_round(chk, g, 2, [10, 77, 128], harvest=lambda got: [p for p in got if p != 77])
    msg = str(ei.value)
    assert ei.value.problems == {"missing": [77]}
    assert "false negative" in msg and "[77]" in msg and "77: 0->2" in msg
    assert "dirty-ring-anonymous" in msg and "slot 1" in msg and "round 2" in msg


def test_dropping_a_page_split_over_collections_still_fails():
    chk, g = DirtyLogChecker(N), FakeGuest()
    chk.begin_round(1)
    g.write(1, 1)
    chk.record(g.harvest())          # concurrent collection
    g.write(2, 1)
    g.harvest()                      # lost collection
    with pytest.raises(DirtyLogMismatch, match=r"NOT reported.*\[2\]"):
        chk.verify(g.stamps)


def test_reported_but_unchanged_is_a_false_positive():
    chk, g = DirtyLogChecker(N), FakeGuest()
    with pytest.raises(DirtyLogMismatch) as ei:
        run_round(chk, g, 1, [7], harvest=lambda got: got + [100])
    assert ei.value.problems == {"spurious": [100]}
    assert "false positive" in str(ei.value)


def test_never_written_page_reported_later_fails():
    chk, g = DirtyLogChecker(N), FakeGuest()
    run_round(chk, g, 1, [1])
    run_round(chk, g, 2, [2])
    with pytest.raises(DirtyLogMismatch, match="spurious|false positive"):
        run_round(chk, g, 3, [3], harvest=lambda got: got + [99])


def test_page_reported_again_after_it_settled_fails():
    # Reported correctly in round 1, unchanged in round 2: reporting it again is wrong.
    chk, g = DirtyLogChecker(N), FakeGuest()
    run_round(chk, g, 1, [9])
    with pytest.raises(DirtyLogMismatch, match=r"\[9\]"):
        run_round(chk, g, 2, [], harvest=lambda got: [9])


def test_stamp_not_of_this_round_fails():
    chk, g = DirtyLogChecker(N), FakeGuest()
    run_round(chk, g, 1, [1])
    chk.begin_round(2)
    g.write(4, 7)  # a stamp the host never handed out
    chk.record(g.harvest())
    with pytest.raises(DirtyLogMismatch) as ei:
        chk.verify(g.stamps)
    assert ei.value.problems == {"bad_stamp": [4]}


def test_out_of_range_report_fails():
    chk = DirtyLogChecker(N)
    chk.begin_round(1)
    with pytest.raises(DirtyLogMismatch, match="outside the slot"):
        chk.record([N])


def test_initially_set_first_round_excuses_unchanged_but_requires_all():
    chk, g = DirtyLogChecker(N, initially_set=True), FakeGuest()
    chk.begin_round(1)
    g.write(3, 1)
    chk.record(range(N))  # KVM: every bit set at first
    rep = chk.verify(g.stamps)
    assert rep.changed == 1 and len(rep.allowed_unchanged) == N - 1
    # Round 2 is strict again.
    with pytest.raises(DirtyLogMismatch, match="false positive"):
        run_round(chk, g, 2, [5], harvest=lambda got: got + [6])


def test_initially_set_missing_a_bit_fails():
    chk = DirtyLogChecker(N, initially_set=True)
    chk.begin_round(1)
    chk.record(p for p in range(N) if p != 64)
    with pytest.raises(DirtyLogMismatch) as ei:
        chk.verify([0] * N)
    assert ei.value.problems == {"initially_set_not_reported": [64]}


def test_in_flight_race_is_excused_once_and_must_land():
    """The documented race: logged at the fault, store retires after the host read the page."""
    chk, g = DirtyLogChecker(N), FakeGuest()
    chk.begin_round(1)
    g.write(1, 1)
    g.logged.add(50)                 # logged, store not retired (RING_FULL exit)
    chk.note_in_flight(50)
    chk.record(g.harvest())
    assert chk.verify(g.stamps).allowed_unchanged == [50]
    # Round 2: the store lands with round 1's stamp; KVM logs it again.
    chk.begin_round(2)
    g.write(50, 1)
    chk.record(g.harvest())
    assert chk.verify(g.stamps).changed == 1


def test_in_flight_late_store_must_be_reported_again():
    chk, g = DirtyLogChecker(N), FakeGuest()
    chk.begin_round(1)
    g.logged.add(50)
    chk.note_in_flight(50)
    chk.record(g.harvest())
    chk.verify(g.stamps)
    chk.begin_round(2)
    g.write(50, 1, log=False)        # landed but never re-logged
    chk.record(g.harvest())
    with pytest.raises(DirtyLogMismatch) as ei:
        chk.verify(g.stamps)
    assert ei.value.problems == {"missing": [50]}


def test_in_flight_store_that_never_lands_fails():
    chk, g = DirtyLogChecker(N), FakeGuest()
    chk.begin_round(1)
    g.logged.add(50)
    chk.note_in_flight(50)
    chk.record(g.harvest())
    chk.verify(g.stamps)
    with pytest.raises(DirtyLogMismatch) as ei:
        run_round(chk, g, 2, [])
    assert ei.value.problems == {"in_flight_never_landed": [50]}


def test_unpromised_phase_may_go_unreported_but_promised_may_not():
    """Toggling logging: writes of a phase with logging off need not be reported."""
    chk, g = DirtyLogChecker(N), FakeGuest()
    chk.begin_round(1, must_report=False)
    g.write(1, 1, log=False)
    g.write(2, 1, log=True)          # reported anyway: it changed, that is fine
    chk.add_phase(2, must_report=True)
    g.write(3, 2, log=False)         # logging back on: must be reported
    chk.record(g.harvest())
    with pytest.raises(DirtyLogMismatch) as ei:
        chk.verify(g.stamps)
    assert ei.value.problems == {"missing": [3]}


def test_report_counts_unlogged_writes_of_unpromised_phases():
    """``unlogged``: writes of a phase KVM need not log that no later collection reported
    (the toggle test's proof that logging was off)."""
    chk, g = DirtyLogChecker(N), FakeGuest()
    chk.begin_round(1, must_report=False)
    g.write(1, 1, log=False)
    g.write(2, 1)
    chk.add_phase(2, must_report=False)
    g.write(3, 2, log=False)
    g.write(4, 2, log=False)
    chk.add_phase(3)
    g.write(5, 3)
    chk.record(g.harvest())
    assert chk.verify(g.stamps).unlogged == 3
    assert run_round(chk, g, 4, [6]).unlogged == 0


def test_report_counts_pages_reported_by_two_collections():
    chk, g = DirtyLogChecker(N), FakeGuest()
    chk.begin_round(1)
    for p in (1, 2, 3):
        g.write(p, 1)
    chk.record(g.harvest())
    chk.add_phase(2)
    g.write(2, 2)
    g.write(9, 2)
    chk.record(g.harvest())
    chk.record([])
    rep = chk.verify(g.stamps)
    assert (rep.reported, rep.rereported) == (4, 1)
    assert run_round(chk, g, 3, [2]).rereported == 0


def test_report_counts_late_stores_logged_in_the_next_round():
    chk, g = DirtyLogChecker(N), FakeGuest()
    run_round(chk, g, 1, [1])
    assert _kicked_round(chk, g, 2, [2], (7, 2, False)).late_stores == 0
    chk.begin_round(3)
    g.write(7, 2)                    # the pending store retires, logged
    chk.record(g.harvest())
    assert chk.verify(g.stamps).late_stores == 1


def test_stamps_must_be_fresh():
    chk = DirtyLogChecker(N)
    chk.begin_round(5)
    with pytest.raises(ValueError, match="fresh"):
        chk.add_phase(5)
    with pytest.raises(ValueError, match="fresh"):
        chk.begin_round(3)


def test_failed_verify_lists_counts_and_is_bounded():
    chk, g = DirtyLogChecker(1000), FakeGuest(1000)
    with pytest.raises(DirtyLogMismatch) as ei:
        run_round(chk, g, 1, range(100), harvest=lambda got: [])
    msg = str(ei.value)
    assert "100 pages changed but NOT reported" in msg and "(100 in all)" in msg
    assert len(msg) < 3000


def test_read_stamps_reads_first_u64_of_each_page():
    buf = bytearray(PAGE_4K * 3)
    struct.pack_into("<Q", buf, 0, 11)
    struct.pack_into("<Q", buf, PAGE_4K * 2, 1 << 63)
    struct.pack_into("<Q", buf, 8, 99)  # not the stamp
    assert read_stamps(memoryview(buf)) == [11, 0, 1 << 63]
    with pytest.raises(ValueError):
        read_stamps(memoryview(buf)[:100])


def test_record_bitmap():
    chk = DirtyLogChecker(N)
    chk.begin_round(1)
    chk.record_bitmap(DirtyBitmap.from_pages(N, [0, 129]))
    assert chk.reported == {0, 129}


def test_collector_names():
    assert isinstance(collector_by_name("dirty-log"), GetDirtyLogCollector)
    c = collector_by_name("clear-log-initially-set", chunk=64)
    assert isinstance(c, ClearDirtyLogCollector) and c.initially_set and c.chunk == 64
    assert isinstance(collector_by_name("dirty-ring"), DirtyRingCollector)
    # Every mode of the table makes a collector that calls itself by the mode's name.
    assert [collector_by_name(m.name).name for m in LOG_MODES] == [m.name for m in LOG_MODES]
    with pytest.raises(Exception, match="unknown dirty-log mode"):
        collector_by_name("nope")
    with pytest.raises(ValueError):
        ClearDirtyLogCollector(chunk=100)


def _kicked_round(chk, g, stamp, writes, pending, late=()):
    """A round ended by a kick, leaving ``pending`` = (page, stamp, logged?) unretired;
    ``late`` = (page, stamp) stores left pending by the previous round retire first."""
    chk.begin_round(stamp)
    for p, s in late:
        g.write(p, s)
    for p in writes:
        g.write(p, stamp)
    page, pstamp, logged = pending
    if logged:
        g.logged.add(page)           # faulted and logged before the kick, not stored
    chk.record(g.harvest())
    chk.note_pending_store(page, pstamp)
    return chk.verify(g.stamps)


def test_kicked_round_pending_store_is_excused_then_must_land_logged():
    chk, g = DirtyLogChecker(N), FakeGuest()
    run_round(chk, g, 1, [1])
    assert _kicked_round(chk, g, 2, [2], (7, 2, True)).allowed_unchanged == [7]
    chk.begin_round(3)
    g.write(7, 2)                    # the store that read stamp 2 before the kick retires now, logged
    chk.record(g.harvest())
    assert chk.verify(g.stamps).changed == 1


def test_late_store_rewriting_the_same_stamp_is_excused_but_must_be_logged():
    """The bed failure of test_rounds_ended_by_kick: the late store hit a page that already
    held its stamp, so the page is reported unchanged -- in the same round as a new pending
    store. Both are exact, so both are excused; nothing else would be."""
    chk, g = DirtyLogChecker(N), FakeGuest()
    run_round(chk, g, 1, [1])
    _kicked_round(chk, g, 2, [9], (9, 2, False))   # page 9 already holds 2; the store of 2 is pending
    chk.begin_round(3)
    g.write(9, 2)                    # retires: same value, but it faulted, so logged
    g.write(4, 3)
    g.logged.add(44)                 # this round's own pending store, logged before the kick
    chk.record(g.harvest())
    chk.note_pending_store(44, 3)
    assert chk.verify(g.stamps).allowed_unchanged == [9, 44]
    # Not logged this time: a false negative.
    _kicked_round(chk, g, 4, [], (10, 4, False), late=[(44, 3)])
    chk.begin_round(5)
    g.write(10, 4, log=False)
    chk.record(g.harvest())
    with pytest.raises(DirtyLogMismatch) as ei:
        chk.verify(g.stamps)
    assert ei.value.problems == {"missing": [10]}


def test_only_the_named_pending_store_is_excused():
    chk, g = DirtyLogChecker(N), FakeGuest()
    run_round(chk, g, 1, [1])
    chk.begin_round(2)
    g.write(2, 2)
    g.logged.update({7, 8})          # two unchanged pages reported, only 7 is pending
    chk.record(g.harvest())
    chk.note_pending_store(7, 2)
    with pytest.raises(DirtyLogMismatch) as ei:
        chk.verify(g.stamps)
    assert ei.value.problems == {"spurious": [8]}


def test_late_store_must_carry_the_stamp_it_loaded():
    chk, g = DirtyLogChecker(N), FakeGuest()
    run_round(chk, g, 1, [1])
    chk.begin_round(2)
    chk.add_phase(3)
    g.write(2, 3)
    chk.record(g.harvest())
    chk.note_pending_store(7, 3)
    chk.verify(g.stamps)
    chk.begin_round(4)
    g.write(7, 2)                    # an older stamp than the one it held: not that store
    g.write(8, 3)                    # a second late store: there was only one
    chk.record(g.harvest())
    with pytest.raises(DirtyLogMismatch) as ei:
        chk.verify(g.stamps)
    assert ei.value.problems == {"bad_stamp": [7, 8]}


def test_store_after_a_collection_must_be_logged_by_a_later_one():
    """A page reported early in the round, then written with a stamp handed out after
    that collection, must appear in a later collection (the union is not enough)."""
    chk, g = DirtyLogChecker(N), FakeGuest()
    chk.begin_round(1)
    g.write(5, 1)
    chk.record(g.harvest())          # collection 1 reports page 5
    chk.add_phase(2)
    g.write(5, 2, log=False)         # store after collection 1, never logged
    chk.record(g.harvest())          # collection 2: nothing
    with pytest.raises(DirtyLogMismatch) as ei:
        chk.verify(g.stamps)
    assert ei.value.problems == {"missing": [5]}
    assert "last reported by collection 1" in str(ei.value)


def test_overwritten_ring_entries_fail_and_the_message_stays_bounded():
    """A ring that wrapped over its oldest entries (the first pages pushed) loses them; with a
    stamp per collection over thousands of collections the message still names the loss briefly."""
    chk, g = DirtyLogChecker(N, label="ring"), FakeGuest()
    chk.begin_round(1)
    for stamp in range(2, 3000):  # thousands of (empty) collections, each handing out a stamp
        chk.record([])
        chk.add_phase(stamp)
    for p in range(N):
        g.write(p, 2999)
    got = g.harvest()
    chk.record(got[12:])  # a ring of N - 12 entries kept only the newest
    with pytest.raises(DirtyLogMismatch) as ei:
        chk.verify(g.stamps)
    msg = str(ei.value)
    assert ei.value.problems["missing"] == list(range(12))
    assert "(2999 stamps in all)" in msg and len(msg) < 4000, msg[:500]


class FakeRing(DirtyRing):
    """A DirtyRing over plain memory instead of a vCPU's mmap (the entries' flags set by hand)."""

    class Memory:
        closed = False

        def __init__(self, cdata, size: int) -> None:
            self.cdata, self.size = cdata, size

        def read(self, offset: int, length: int) -> bytes:
            return ffi.buffer(self.cdata, self.size)[offset:offset + length]

    def __init__(self, nentries: int) -> None:
        self.nentries, self.size_bytes, self.fetch_index, self.addr = nentries, nentries * GFN_SIZE, 0, 0
        self.gfns = ffi.new("struct kvm_dirty_gfn[]", nentries)
        self.mapping = self.Memory(self.gfns, self.size_bytes)
        self._attach(memoryview(ffi.buffer(self.gfns)))

    def publish(self, *indexes: int) -> None:
        for i in indexes:
            self.gfns[i].flags = lib.KVM_DIRTY_GFN_F_DIRTY
            self.gfns[i].offset = i


def test_ring_published_entries_and_reset_check_across_the_wrap():
    r = FakeRing(8)
    assert r.published() == 0
    r.publish(0, 1, 2)
    assert r.published() == 3
    assert r.harvest() == [(0, 0), (0, 1), (0, 2)] and r.published() == 0
    assert r.not_reset(0, 3) == 3          # harvested, flagged RESET, not reset by KVM yet
    for i in range(3):
        r.gfns[i].flags = 0                # KVM_RESET_DIRTY_RINGS re-arms them
    assert r.not_reset(0, 3) == 0
    r.fetch_index = 6
    r.publish(6, 7, 0, 1)
    assert r.published() == 4
    assert [off for _, off in r.harvest()] == [6, 7, 0, 1]
    r.gfns[6].flags = r.gfns[7].flags = 0  # KVM reset only the first two
    assert r.not_reset(6, 4) == 2
    r.publish(*range(8))
    assert r.published() == 8              # a full ring
