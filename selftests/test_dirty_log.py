"""Dirty logging on /dev/kvm, verified page by page (see kvmpy.dirtylog.checker for the rules).

The dirty_writer guest stores a fresh stamp into pseudo-random pages of the test
slot(s) while the host collects concurrently; at the end of every round the
vCPUs park at a GUEST_SYNC, the host collects once more and checks every page:
changed => reported (no false negatives, ever), reported => changed (except the
documented races), never written => never reported.

The writer runs at the lowest privilege level that runs natively (``writer_cpl``:
CPL3 on kvm_pvm, whose ring 0 is instruction-emulated), so its writes reach the
log through KVM's MMU; the dirty ring's limit tests run with emulated writes too
where there are any (selftests/privilege.py). Sizes suit an emulated test bed;
``--kvmpy-scale N`` (or KVMPY_SCALE=N) multiplies them for real hardware.
"""
from __future__ import annotations

import errno
import time

import pytest

from kvmpy import faults
from kvmpy.abi import lib
from kvmpy.dirty_ring import GFN_SIZE
from kvmpy.dirtylog import (MODE_NAMES, DirtyLogMismatch, DirtyWriterVm, RoundPlan, RoundReport, SlotSpec,
                            collector_by_name, read_stamps)
from kvmpy.memory import PAGE_2M, PAGE_4K, backing_by_name
from kvmpy.x86 import cpu

from .privilege import WritePath

BACKINGS = ("anonymous", "thp", "hugetlb-2M")
TEST_GPA = 1 << 30


def make_writer(mode: str, cpl: int, slots, *, backing: str = "anonymous", ring_bytes: int = 65536,
                chunk: int | None = None, **kw) -> DirtyWriterVm:
    """A DirtyWriterVm for ``mode`` writing at ``cpl`` (a missing capability or backing is a
    skip, like everywhere)."""
    return DirtyWriterVm(collector_by_name(mode, ring_bytes=ring_bytes, chunk=chunk), slots,
                         backing=backing_by_name(backing), label=f"{mode}-{backing}", user_mode=cpl == 3, **kw)


def run_rounds(d: DirtyWriterVm, rounds: int, plan: RoundPlan) -> list[dict[int, RoundReport]]:
    reports = [d.run_round(plan) for _ in range(rounds)]
    print("\n".join(d.round_log))
    return reports


# -- the mode x backing matrix ------------------------------------------------------------
@pytest.mark.parametrize("backing", BACKINGS)
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_dirty_log(mode, backing, writer_cpl, scale):
    """Random writes, concurrent collection every few ms, page-exact check per round."""
    npages = 2048 * scale  # 8 MiB: whole 2M pages for THP/hugetlb
    with make_writer(mode, writer_cpl, [SlotSpec(1, TEST_GPA, npages)], backing=backing) as d:
        reports = run_rounds(d, 6 * scale, RoundPlan(min_writes=3000 * scale, collect_every=0.005,
                                                     min_collections=4))
        # Collected while the guest wrote: in every round some page was reported, written
        # again (the log re-armed in between) and reported again by a later collection.
        rereported = [r[1].rereported for r in reports]
        assert all(rereported), f"pages reported by two collections, per round: {rereported}"


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_every_page_written(mode, writer_cpl, scale):
    """stride 1: each round every page is written first; all of them must be reported."""
    npages = 1024 * scale
    with make_writer(mode, writer_cpl, [SlotSpec(1, TEST_GPA, npages)], stride=1) as d:
        for _ in range(3 * scale):
            reports = d.run_round(RoundPlan(min_writes=npages + 100, collect_every=0.005))
            assert reports[1].changed == npages and reports[1].reported == npages, reports[1]
        print("\n".join(d.round_log))


# -- edge cases ------------------------------------------------------------------------------
def written_then_clean(d: DirtyWriterVm, rounds: int, clean_from: int, plan: RoundPlan) -> None:
    """Rounds in which the guest writes every page, alternating with rounds in which it writes
    only the pages below ``clean_from``: pages from ``clean_from`` on, logged and collected
    (cleared/re-armed) in the round before, must then be neither changed nor reported."""
    ms = d.slots[0][1]
    clean = range(clean_from, ms.npages)
    for r in range(rounds):
        all_pages = r % 2 == 0
        d.set_ranges([] if all_pages else [(0, clean_from)])
        before = read_stamps(ms.view)[clean_from:]
        d.run_round(plan)
        reported = sorted(p for p in d.checkers[1].reported if p in clean)
        if all_pages:
            assert reported == list(clean), f"round {r + 1} wrote pages {clean}; of them reported: {reported}"
        else:
            assert read_stamps(ms.view)[clean_from:] == before, f"round {r + 1} wrote pages {clean} after all"
            assert not reported, f"round {r + 1} left pages {clean} alone, yet the log reported {reported}"
    print("\n".join(d.round_log))


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_slot_not_multiple_of_64_pages(mode, writer_cpl, scale):
    """1027 pages: the last bitmap word is partial. The 3 tail pages must be logged when
    written, and cleared with the rest: in rounds that leave them alone, never reported."""
    npages = 1024 * scale + 3
    with make_writer(mode, writer_cpl, [SlotSpec(1, TEST_GPA, npages)], stride=1) as d:
        written_then_clean(d, 4, npages - 3, RoundPlan(min_writes=npages + 200, collect_every=0.005))


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_slot_at_high_gpa(kvm, mode, writer_cpl, scale):
    """The test slot ends at the top of the guest physical address space; its last page,
    the highest GPA there is, is written and must be logged every round."""
    bits = cpu.phys_bits(kvm.supported_cpuid())
    npages = 1024 * scale
    gpa = (1 << bits) - npages * PAGE_4K
    with make_writer(mode, writer_cpl, [SlotSpec(1, gpa, npages)], stride=1) as d:
        print(f"slot at GPA {gpa:#x} ({bits}-bit guest physical addresses)")
        for r in range(4):
            d.run_round(RoundPlan(min_writes=2000 * scale, collect_every=0.005))
            assert npages - 1 in d.checkers[1].reported, f"round {r + 1}: GPA {(1 << bits) - PAGE_4K:#x} not logged"
        print("\n".join(d.round_log))


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_several_slots_logging_on_some(mode, writer_cpl, scale):
    """Slots 1 and 3 logged, 2 and 4 not, contiguous in GPA and GVA; the guest writes all four.

    Logged slots are checked page by page; unlogged ones are written (their stamps
    change) but never appear in a ring, and KVM_GET_DIRTY_LOG on them fails.
    """
    n = 256 * scale
    specs = [SlotSpec(1, TEST_GPA, n), SlotSpec(2, TEST_GPA + n * PAGE_4K, n + 3, logged=False),
             SlotSpec(3, TEST_GPA + (2 * n + 3) * PAGE_4K, n + 61),
             SlotSpec(4, TEST_GPA + (3 * n + 64) * PAGE_4K, n, logged=False)]
    with make_writer(mode, writer_cpl, specs) as d:
        unlogged = {spec.slot: ms for spec, ms in d.slots if not spec.logged}
        before = {s: read_stamps(ms.view) for s, ms in unlogged.items()}
        run_rounds(d, 4, RoundPlan(min_writes=3000 * scale, collect_every=0.005))
        for s, ms in unlogged.items():
            changed = sum(a != b for a, b in zip(before[s], read_stamps(ms.view)))
            assert changed > 0, f"the guest never wrote unlogged slot {s}: the test would prove nothing"
            # No dirty bitmap for an unlogged slot: ENOENT; in dirty-ring mode the ioctl itself is refused.
            want = errno.ENXIO if mode.startswith("dirty-ring") else errno.ENOENT
            res = d.vm.get_dirty_log_unchecked(s)
            assert res.errno == want, f"slot {s}: KVM_GET_DIRTY_LOG returned {res}"
        for s in (1, 3):
            assert d.checkers[s].total_changed > 0, f"logged slot {s} was never written"


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_toggle_logging_while_guest_runs(mode, writer_cpl, scale):
    """Turn KVM_MEM_LOG_DIRTY_PAGES off and on again while the vCPU writes.

    Each round starts with a stamp whose writes may be lost (logging goes off
    during it); after logging is back on, the host hands out a new stamp, and
    every page carrying it must be reported. Under INITIALLY_SET re-enabling sets
    every bit again, which the checker is told and then demands. That logging really
    went off shows too: writes made meanwhile went unlogged (or, under INITIALLY_SET,
    re-enabling gave the slot a fresh, all-set bitmap).
    """
    npages = 1024 * scale

    def toggle(d: DirtyWriterVm) -> None:
        d.vm.enable_dirty_logging(1, False)
        d.set_stamp(d.stamp + 1, must_report=False)   # the stamp of the writes made with logging off
        w = d.writes()
        while d.writes() < w + 300:  # the guest writes with logging off
            time.sleep(0.001)
        d.vm.enable_dirty_logging(1, True)
        if d.collector.initially_set:
            d.checkers[1].expect_all_set()
        d.set_stamp(d.stamp + 1, must_report=True)
        w = d.writes()
        while d.writes() < w + 1000 * scale:  # and with logging back on, collected concurrently
            d.collect()
            time.sleep(0.002)

    # Paced by an exit per 32 writes: a native writer would rewrite every page between the host's
    # steps, leaving no write of the logging-off phase to show.
    with make_writer(mode, writer_cpl, [SlotSpec(1, TEST_GPA, npages)], sync_every=32) as d:
        for _ in range(4):
            r = d.run_round(RoundPlan(min_writes=1000, collect_every=0.005, during=toggle, must_report=False))[1]
            if d.collector.initially_set:
                # Re-enabling under INITIALLY_SET sets every bit again: only a slot whose logging
                # really went off (and its bitmap with it) gets a fresh, all-set one.
                assert r.reported == npages, f"logging re-enabled, yet only {r.reported} of {npages} pages reported"
            else:
                # Logging was really off: writes made then went unlogged.
                assert r.unlogged > 0, f"every write made with logging off was logged: {r}"
        d.run_round(RoundPlan(min_writes=1000, collect_every=0.005))  # and a plain round afterwards
        print("\n".join(d.round_log))


def test_clear_dirty_log_alignment_errnos(kvm):
    """KVM_CLEAR_DIRTY_LOG: first_page must be 64-aligned, num_pages too unless it reaches the slot end."""
    npages = 1024 + 3
    with kvm.create_vm() as vm:
        vm.enable_manual_protect()
        ms = vm.add_memory(1, TEST_GPA, npages * PAGE_4K, flags=lib.KVM_MEM_LOG_DIRTY_PAGES)
        bm = vm.get_dirty_log(1)
        bad = [(1, 64, "first_page not a multiple of 64"), (63, 1, "first_page not a multiple of 64"),
               (0, 63, "num_pages not a multiple of 64 and short of the slot end"),
               (64, 100, "num_pages not a multiple of 64 and short of the slot end"),
               (1024, 4, "range beyond the slot end"), (1088, 0, "first_page beyond the slot end")]
        for first, num, why in bad:
            res = vm.clear_dirty_log_unchecked(1, bm, first, num)
            assert res.errno == errno.EINVAL, f"first_page {first} num_pages {num} ({why}): {res}"
        # Accepted: aligned chunks, and an unaligned count that ends exactly at the slot end.
        for first, num in [(0, 64), (64, 960), (1024, 3), (0, npages), (1024, 0)]:
            res = vm.clear_dirty_log_unchecked(1, bm, first, num)
            assert res.ok, f"first_page {first} num_pages {num} (slot of {ms.npages} pages) refused: {res}"


@pytest.mark.parametrize("mode", ["clear-log", "clear-log-initially-set"])
def test_clear_dirty_log_in_64_page_chunks(mode, writer_cpl, scale):
    """CLEAR in 64-page calls, the last one (3 pages) unaligned but ending at the slot end:
    every call must clear its pages (rounds that write only the first half show the rest clean)."""
    npages = 1024 * scale + 3
    with make_writer(mode, writer_cpl, [SlotSpec(1, TEST_GPA, npages)], chunk=64, stride=1) as d:
        written_then_clean(d, 4, npages // 2 // 64 * 64, RoundPlan(min_writes=npages + 500, collect_every=0.005))


@pytest.mark.parametrize("resumes", [0, 1], ids=["reset-first", "reentered-unreset"])
@pytest.mark.parametrize("mode", ["dirty-ring", "dirty-ring-plain"])
def test_dirty_ring_full(mode, resumes, writer_cpl, scale):
    """A 4 KiB ring (256 entries) fills again and again: the vCPU exits with
    KVM_EXIT_DIRTY_RING_FULL, resumes only after harvest + reset, and nothing is lost.

    ``reentered-unreset``: the VMM calls KVM_RUN once more before the reset (as
    upstream's dirty_log_test can after a stray wakeup); KVM must exit again
    without running the guest into the full ring: the vCPU's RIP, the target of
    its pending store (rdi), its write counter and the ring's published entries
    must all be what they were at the RING_FULL exit before. (RIP alone proves
    nothing: every RING_FULL exit of this guest stops at its store.)"""
    npages = 2048 * scale
    with make_writer(mode, writer_cpl, [SlotSpec(1, TEST_GPA, npages)], ring_bytes=4096,
                     ring_full_resumes=resumes) as d:
        path = WritePath(d.g.vcpus, writer_cpl)
        ring_entries = d.collector.ring_bytes // GFN_SIZE
        run_rounds(d, 5, RoundPlan(min_writes=4000 * scale, collect_every=None))
        print(path.check(d.writes()))
        print(f"{d.ring_full_exits} KVM_EXIT_DIRTY_RING_FULL exits, {d.collector.harvested} entries harvested, "
              f"{d.unreset_reentries} re-entries before a reset, {d.refused_reentries} of them refused "
              f"({d.harvested_reentries} more overtaken by a harvest)")
        print(d.ring_summary())
        assert d.ring_full_exits >= 5, f"only {d.ring_full_exits} ring-full exits: the ring never filled"
        # KVM stops the vCPU at the soft limit (ring - 64 entries): no harvest holds the whole ring.
        whole = [h for h in d.collector.harvests if h[2] >= ring_entries]
        assert not whole, f"{len(whole)} harvests of the whole ring\n{d.ring_summary()}"
        if resumes:
            assert d.unreset_reentries >= 5, (
                f"only {d.unreset_reentries} KVM_RUNs into a full, unreset ring "
                f"({d.harvested_reentries} more overtaken by a harvest)")
            assert not d.ran_reentries, (
                f"KVM ran the guest on {len(d.ran_reentries)} of {d.unreset_reentries} KVM_RUNs into a full "
                f"ring that was not reset:\n  " + "\n  ".join(d.ran_reentries[:10]))
            assert d.refused_reentries == d.unreset_reentries


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_two_vcpus_overlapping_pages(mode, writer_cpl, scale):
    """Two vCPUs write random pages of the same small range (many pages hit by both)."""
    npages = 512 * scale
    with make_writer(mode, writer_cpl, [SlotSpec(1, TEST_GPA, npages)], nr_vcpus=2) as d:
        run_rounds(d, 5, RoundPlan(min_writes=2000 * scale, collect_every=0.005))
        per_vcpu = [d.g.read_global("nr_writes", offset=8 * i) for i in range(2)]
        assert all(n > 100 for n in per_vcpu), f"a vCPU barely ran: writes per vCPU {per_vcpu}"


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_rounds_ended_by_kick(mode, writer_cpl, scale):
    """Like upstream dirty_log_test: each round ends by kicking the vCPU out of
    KVM_RUN wherever it is -- kicked again until it stops between loading its stamp
    and storing it, so every round leaves a store in flight. That store retires after
    the host collected and re-armed the log, and must be logged in the next round."""
    npages = 2048 * scale
    rounds = 8 * scale
    # Runs of 8 pages by a 5-instruction store loop: kicks soon catch a store in flight.
    with make_writer(mode, writer_cpl, [SlotSpec(1, TEST_GPA, npages)], random_run=8) as d:
        reports = run_rounds(d, rounds, RoundPlan(min_writes=2000 * scale, collect_every=0.005, end_by_kick=True,
                                                  mid_store=True))
        assert d.pending_stores == rounds, f"{d.pending_stores} of {rounds} rounds ended with a store in flight"
        late = [r[1].late_stores for r in reports[1:]]
        assert late == [1] * (rounds - 1), f"stores left in flight, logged in the next round: {late}"


def test_checker_catches_a_dropped_page_on_real_kvm(writer_cpl, scale):
    """End to end: a collector that drops one reported page must make the check fail."""
    with (make_writer("dirty-log", writer_cpl, [SlotSpec(1, TEST_GPA, 512)]) as d,
          faults.injected("collector-drops-page")):
        with pytest.raises(DirtyLogMismatch, match="false negative"):
            d.run_round(RoundPlan(min_writes=500, collect_every=None))


@pytest.mark.every_write_path
@pytest.mark.parametrize("mode", ["dirty-ring", "dirty-ring-plain"])
def test_dirty_ring_full_1g_slot(mode, writer_cpl, scale):
    """Upstream dirty_log_test's sizes: a 1 GiB slot (262144 pages), a 1 MiB ring
    (65536 entries, soft limit 65472), harvested only after KVM_EXIT_DIRTY_RING_FULL.

    The guest maps the slot with 2M pages (its page size does not matter to dirty
    logging, which KVM does per 4K gfn; 4K guest mappings of 1 GiB would not fit the
    runtime's page-table pool) and sweeps it page by page in runs of 4096 stores by
    a 5-instruction loop -- as tight as upstream's writer, whose first pass also
    sweeps every page -- so each ring fill is 65536 fresh pages pushed in order.
    The host backs the slot before the guest runs (first touches would otherwise
    take most of the time in a test bed; logging does not depend on them).
    KVM must stop the vCPU at the soft limit; a harvest of the whole ring means it
    pushed past it, and the oldest entries (the first pages of the fill) are lost.
    Rounds end by kick, early if the guest stalls (a vCPU that KVM keeps exiting
    with RING_FULL although nothing is left to harvest): it still parks and its
    pages are checked."""
    npages = 262144
    ring_entries = 65536
    with make_writer(mode, writer_cpl, [SlotSpec(1, TEST_GPA, npages)], ring_bytes=ring_entries * GFN_SIZE, stride=1,
                     burst=4096, page_size=PAGE_2M, populate=True) as d:
        path = WritePath(d.g.vcpus, writer_cpl)
        # Four rounds: on kvm_pvm the overfill depends on timing (the ACQ_REL variant
        # passed ~1 run in 10 with two rounds); a KVM that loses nothing passes them all.
        for _ in range(4 * scale):
            # Two ring fills per round (the sweep goes on where the last round's kick stopped it).
            # A round ends early only if the guest stalls (no write, no ring entry for 3 s);
            # a guest that is merely slow (a test bed on a busy host) gets its time.
            d.run_round(RoundPlan(min_writes=2 * ring_entries + 8192, collect_every=None, end_by_kick=True,
                                  stall_time=3.0, max_time=600))
        print("\n".join(d.round_log))
        print(path.check(d.writes()))
        print(d.ring_summary())
        assert d.ring_full_exits >= 4, f"only {d.ring_full_exits} ring-full exits: the ring never filled"
        whole = [h for h in d.collector.harvests if h[2] >= ring_entries]
        assert not whole, f"{len(whole)} harvests of the whole ring with no page lost?\n{d.ring_summary()}"
        stalled = [line for line in d.round_log if "STALLED" in line]
        assert not stalled, "the guest stalled with nothing lost?\n" + "\n".join(stalled)
