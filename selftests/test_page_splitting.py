"""Huge-page splitting and recovery around dirty logging, asserted through pages_4k/2m/1g.

A guest (guests/mmu_touch.c) populates a test memslot backed by huge host
pages, so KVM maps it with 2M or 1G SPTEs.  Then:

* eager split: with the TDP MMU and kvm.eager_page_split=Y, enabling dirty
  logging splits every huge SPTE of the slot down to 4K at once (no guest
  access needed); with manual protect + INITIALLY_SET the split happens
  instead at KVM_CLEAR_DIRTY_LOG, for the cleared range only;
* lazy split: otherwise enabling dirty logging only write-protects, and the
  first guest *write* into a huge page breaks it -- the TDP MMU splits it into
  512 SPTEs of the next level (since v6.2; before, it dropped it and mapped the
  written 4K page alone, as the shadow MMU still does); reads keep using the huge SPTE;
* recovery: disabling dirty logging zaps the 4K SPTEs that could be huge
  again (the TDP MMU rebuilds the huge SPTE in place since v6.13), and the next
  guest access maps the region huge again: the counts return to what population gave.

What changed between kernel releases is keyed by release in selftests/kernel_changes.py.

Every count is read while the only vCPU is parked in a GUEST_SYNC, so
between two reads nothing but the operation under test touched the MMU.  Each
test runs once per privilege level (``cpl``) at which the host's KVM maps guest
accesses with SPTEs (CPL3 only on kvm_pvm), and every guest pass is checked to
have run natively (selftests/privilege.py).
Memslot 0 (the runtime) is anonymous memory with THP disabled: it only ever
adds 4K SPTEs, so every 2M/1G SPTE in the VM is the test region's.

Modelled on the kernel's tools/testing/selftests/kvm/x86/dirty_log_page_splitting_test.c.
"""
from __future__ import annotations

import contextlib

import pytest

from kvmpy.bitmap import DirtyBitmap
from kvmpy.errors import require
from kvmpy.memory import PAGE_1G, PAGE_2M, PAGE_4K
from kvmpy.x86.paging import ENTRIES_PER_TABLE

from .bed_config import require_tdp_mmu
from .drivers import TEST_SLOT
from .host_state import eager_page_split, reserved_in_bed
from .huge_regions import NR_CHUNKS_2M, Region, populate, region, touch_guest
from .kernel_changes import (CLEAR_SPLIT_OFF_BY_ONE, NX_HUGE_PAGE_CHECK, RECOVER_IN_PLACE, SPLIT_ON_FAULT, expect,
                             has)
from .sptes import delta, scaled, sized


@pytest.fixture(scope="module", autouse=True)
def bed_hugetlb_pools():
    """Inside the bed, reserve the hugetlb pages of the whole module up front: a 1G page
    needs 1 GiB of contiguous free memory, which the earlier tests' allocations break up.
    Restored when the module ends (also on failure or Ctrl-C).  Does nothing elsewhere."""
    with reserved_in_bed((PAGE_1G, 1), (PAGE_2M, NR_CHUNKS_2M)):
        yield


def expected_eager(r: Region, nr_huge: int) -> dict[str, int]:
    """A TDP MMU eager split of ``nr_huge`` chunks, all the way down to 4K."""
    return {"pages_4k": nr_huge * r.pages_per_chunk, r.key: -nr_huge,
            **({"pages_2m": 0} if r.key == "pages_1g" else {"pages_1g": 0})}


BACKINGS = ["thp", "hugetlb-2M", "hugetlb-1G"]


@pytest.mark.parametrize("backing", BACKINGS)
def test_eager_split_on_dirty_log_enable(kvm, cpl, mmu, backing, kvmpy_stats):
    """Enabling dirty logging splits every huge SPTE of the slot to 4K, before any guest access."""
    require_tdp_mmu(mmu, "eager page splitting is done by the TDP MMU only (test_lazy_split_on_first_write "
                         "covers the shadow MMU)")
    with eager_page_split(True), region(backing) as r, touch_guest(kvm, r, cpl) as t:
        pop, huge = populate(t, r)
        t.vm.enable_dirty_logging(TEST_SLOT)
        on = t.counts()
        want = expected_eager(r, len(huge))
        assert delta(on, pop) == want, (
            f"{r.name}: enabling dirty logging on a slot with {len(huge)} {r.key[6:]} SPTEs: "
            f"expected {want}, got {delta(on, pop)}")

        # Writes now only fault on write-protected 4K SPTEs: no mapping changes,
        # and the log holds exactly the pages written.
        n = t.write(stride=r.write_stride, stamp=2)
        assert delta(t.counts(), on) == sized(), f"a dirty pass after the eager split changed the SPTEs: {on} -> {t.counts()}"
        pages = t.vm.get_dirty_log(TEST_SLOT).pages()
        written = list(range(0, r.size // PAGE_4K, r.write_stride // PAGE_4K))
        assert len(written) == n and pages == written, (
            f"dirty log after writing {n} pages: {len(pages)} set, first differences "
            f"{sorted(set(pages) ^ set(written))[:8]}")
    kvmpy_stats(**delta(on, pop))


@pytest.mark.parametrize("backing", BACKINGS)
def test_lazy_split_on_first_write(kvm, cpl, mmu, backing, kvmpy_stats):
    """Without eager splitting, enabling dirty logging keeps huge SPTEs; the first write into
    one breaks just that one (TDP MMU since v6.2: into 512 next-level SPTEs; shadow MMU, and
    the TDP MMU before: drops it and maps the written 4K page), reads keep the huge SPTE."""
    # Only the TDP MMU splits eagerly; the shadow MMU is lazy whatever the parameter says.
    with (eager_page_split(False) if mmu.tdp_mmu else contextlib.nullcontext()), \
            region(backing) as r, touch_guest(kvm, r, cpl) as t:
        pop, huge = populate(t, r)
        t.vm.enable_dirty_logging(TEST_SLOT)
        on = t.counts()
        assert on == pop, f"{mmu.name}: enabling dirty logging changed the SPTEs without eager splitting: {pop} -> {on}"

        if r.chunk == PAGE_2M:
            require(len(huge) >= 3, f"only {len(huge)} of {r.nr} THP chunks are huge, the test needs 3")
            written, kept = [huge[0], huge[2]], huge[1]
            for c in written:
                t.write(c * r.chunk + 5 * PAGE_4K, PAGE_4K, PAGE_4K, stamp=3)
            after_write = t.counts()
            what = f"{mmu.name}: one 4K write into each of {len(written)} huge pages"
            dropped = scaled(sized(pages_4k=1, pages_2m=-1), len(written))
            if mmu.tdp_mmu:
                expect(what, delta(after_write, on), SPLIT_ON_FAULT, before=dropped,
                       since=scaled(sized(pages_4k=ENTRIES_PER_TABLE, pages_2m=-1), len(written)))
            else:
                assert delta(after_write, on) == dropped, f"{what}: expected {dropped}, got {delta(after_write, on)}"
            t.read(kept * r.chunk, r.chunk)
            assert t.counts() == after_write, (
                f"{mmu.name}: reading a whole 2M page under dirty logging changed the SPTEs: "
                f"{after_write} -> {t.counts()}")
            pages = t.vm.get_dirty_log(TEST_SLOT).pages()
            want = [c * r.pages_per_chunk + 5 for c in written]
            assert pages == want, f"dirty log after writing pages {want} (and reading chunk {kept}): {pages[:16]}"
        else:
            page = 3 * ENTRIES_PER_TABLE + 5     # the 4K page written: page 5 of the fourth 2M range
            t.write(page * PAGE_4K, PAGE_4K, PAGE_4K, stamp=3)
            after_write = t.counts()
            what = f"{mmu.name}: one 4K write into a 1G page"
            dropped = sized(pages_4k=1, pages_1g=-1)
            if mmu.tdp_mmu:
                # Since v6.2: 1G -> 512 x 2M, then the written 2M -> 512 x 4K.
                expect(what, delta(after_write, on), SPLIT_ON_FAULT, before=dropped,
                       since=sized(pages_4k=ENTRIES_PER_TABLE, pages_2m=ENTRIES_PER_TABLE - 1, pages_1g=-1))
                # Split, the other 2M ranges keep (write-protected) 2M SPTEs a read uses; dropped,
                # nothing maps them and each read maps a 4K page (dirty logging forbids huge ones),
                # writable as the host page is, so KVM logs it dirty too.
                t.read(7 * PAGE_2M, PAGE_2M)
                expect("TDP MMU: reading a 2M range of the written 1G page", delta(t.counts(), after_write),
                       SPLIT_ON_FAULT, before=sized(pages_4k=ENTRIES_PER_TABLE), since=sized())
                pages = t.vm.get_dirty_log(TEST_SLOT).pages()
                read = list(range(7 * ENTRIES_PER_TABLE, 8 * ENTRIES_PER_TABLE))
                logged = ("the written page" if pages == [page] else
                          "the written page and every page read" if pages == sorted([page] + read) else pages)
                expect(f"TDP MMU: dirty pages after writing page {page} of a 1G page and reading pages "
                       f"{read[0]}..{read[-1]}", logged, SPLIT_ON_FAULT,
                       before="the written page and every page read", since="the written page")
            else:
                assert delta(after_write, on) == dropped, f"{what}: expected {dropped}, got {delta(after_write, on)}"
                pages = t.vm.get_dirty_log(TEST_SLOT).pages()
                assert pages == [page], f"dirty log after writing page {page}: {pages[:16]}"
    kvmpy_stats(**delta(after_write, on))


@pytest.mark.parametrize("backing", BACKINGS)
def test_huge_pages_recovered_after_dirty_logging(kvm, cpl, mmu, backing, kvmpy_stats):
    """Disabling dirty logging drops the 4K SPTEs of collapsible ranges; the next guest
    access maps them huge again, and the counts equal those after population."""
    with region(backing) as r, touch_guest(kvm, r, cpl) as t:
        pop, huge = populate(t, r)
        t.vm.enable_dirty_logging(TEST_SLOT)
        t.write(stride=r.write_stride, stamp=2)
        dirty = t.counts()
        assert dirty["pages_2m"] == dirty["pages_1g"] == 0, (
            f"{mmu.name}: huge SPTEs left after writing every {r.write_stride // 1024}K of a dirty-logged "
            f"region: {dirty}")

        t.vm.enable_dirty_logging(TEST_SLOT, False)
        off = t.counts()
        assert off["pages_4k"] == pop["pages_4k"], (
            f"{mmu.name}: disabling dirty logging should drop the 4K SPTEs of the {len(huge)} collapsible "
            f"chunks: pages_4k {pop['pages_4k']} after population, {dirty['pages_4k']} while logging, "
            f"{off['pages_4k']} after disabling")
        zapped, in_place = sized(pages_4k=pop["pages_4k"]), dict(pop)
        recovered = "zapped" if off == zapped else "rebuilt in place" if off == in_place else off
        what = f"{mmu.name}: the huge SPTEs after disabling dirty logging"
        if mmu.tdp_mmu:
            expect(what, recovered, RECOVER_IN_PLACE, before="zapped", since="rebuilt in place")
        else:
            assert recovered == "zapped", f"{what}: expected zapped {zapped}, got {recovered}"

        t.read(stride=r.chunk)      # one access per chunk refaults it
        back = t.counts()
        what = f"{mmu.name}: after the guest touched the region again: {back}, after population: {pop}"
        if not mmu.tdp_mmu and mmu.nx_huge_pages:
            # The shadow MMU leaves the emptied tables linked; with the NX workaround on, before
            # v6.2 any table under the goal level forced a 4K mapping: each of the len(huge) reads
            # maps its 4K page, and the prefetch up to PTE_PREFETCH_NUM (8) pages around it.
            added_4k = back["pages_4k"] - off["pages_4k"]
            mapped_4k = back["pages_2m"] == back["pages_1g"] == 0 and len(huge) <= added_4k <= 8 * len(huge)
            refaulted = "huge again" if back == pop else "mapped 4K, not huge" if mapped_4k else back
            expect(what, refaulted, NX_HUGE_PAGE_CHECK, before="mapped 4K, not huge", since="huge again")
        else:
            assert back == pop, what
    kvmpy_stats(**{"pages_4k": off["pages_4k"] - dirty["pages_4k"], r.key: back[r.key] - dirty[r.key]})


def test_clear_dirty_log_splits_only_cleared_range(kvm, cpl, mmu, kvmpy_stats):
    """Manual protect with INITIALLY_SET: enabling dirty logging splits nothing; each
    KVM_CLEAR_DIRTY_LOG splits exactly the huge pages covering the cleared range -- a single
    cleared page at the start of a huge page too, since v6.8."""
    require_tdp_mmu(mmu, "splitting at KVM_CLEAR_DIRTY_LOG is done by the TDP MMU only")
    with eager_page_split(True), region("hugetlb-2M") as r, touch_guest(kvm, r, cpl) as t:
        t.vm.enable_manual_protect(initially_set=True)
        pop, huge = populate(t, r)
        t.vm.enable_dirty_logging(TEST_SLOT)
        on = t.counts()
        assert on == pop, f"INITIALLY_SET: enabling dirty logging changed the SPTEs: {pop} -> {on}"

        npages = r.size // PAGE_4K
        everything = DirtyBitmap.full(npages)
        first = 2
        t.vm.clear_dirty_log(TEST_SLOT, everything, 0, first * r.pages_per_chunk)
        part = t.counts()
        assert delta(part, on) == expected_eager(r, first), (
            f"clearing the log of the first {first} 2M ranges: expected {expected_eager(r, first)}, "
            f"got {delta(part, on)}")

        # One page, the first of the next 2M range: KVM splits [first set gfn, last set gfn + 1),
        # but before v6.8 passed the last gfn itself as the end, an empty range here.
        start = first * r.pages_per_chunk
        t.vm.clear_dirty_log(TEST_SLOT, DirtyBitmap.from_pages(npages, [start]), start, 64)
        single = t.counts()
        expect("clearing the log of the first page of a 2M range", delta(single, part), CLEAR_SPLIT_OFF_BY_ONE,
               before=sized(), since=expected_eager(r, 1))

        # The rest (the page just cleared is clean: its 64-page word now starts one page in).
        t.vm.clear_dirty_log(TEST_SLOT, everything, start, npages - start)
        rest = r.nr - first - (1 if has(CLEAR_SPLIT_OFF_BY_ONE) else 0)
        assert delta(t.counts(), single) == expected_eager(r, rest), (
            f"clearing the rest: expected {expected_eager(r, rest)}, got {delta(t.counts(), single)}")
    kvmpy_stats(**delta(part, on))
