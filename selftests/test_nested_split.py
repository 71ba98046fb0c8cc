"""The nested MMU's huge SPTEs split when dirty logging is enabled: eagerly, or on L2's writes.

L1 (guests/nested_dirty.c) maps a THP-backed data memslot to L2 with 2M NPT
(SVM) or EPT (VMX) pages and L2 writes it.  KVM (L0) backs L2 with the *nested
MMU*: shadow pages that combine L1's NPT/EPT with L0's own mapping of L1
memory, counted in the same pages_4k/2m/1g VM stats as the TDP MMU's.  With the
TDP MMU enabled, enabling dirty logging on a memslot eagerly splits the nested
MMU's huge SPTEs of that slot too (kvm_mmu_slot_try_split_huge_pages ->
kvm_shadow_mmu_try_split_huge_pages; since v6.0, kernel_changes.NESTED_EAGER_SPLIT),
unless kvm.eager_page_split=N; otherwise
each first L2 write into a 2M drops it and maps one 4K page (FNAME(fetch)).

Each test runs once per vendor (the `nested` fixture): SVM+NPT in the AMD bed
(QEMU), VMX+EPT in the Intel bed (Bochs); elsewhere it skips saying where.
"""
from __future__ import annotations

import pytest

from kvmpy.bitmap import DirtyBitmap
from kvmpy.hostinfo import mmu_flavour
from kvmpy.memory import PAGE_2M, PAGE_4K
from kvmpy.x86.paging import ENTRIES_PER_TABLE

from .bed_config import require, require_tdp_mmu
from .drivers import DATA_SIZE, DATA_SLOT, NestedDirtyGuest
from .host_state import eager_page_split
from .kernel_changes import NESTED_EAGER_SPLIT, NX_HUGE_PAGE_CHECK, expect, has
from .sptes import delta, scaled, sized


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "lazy"])
def test_nested_mmu_split_on_dirty_logging(kvm, nested, kvmpy_stats, scale, eager):
    """Enabling dirty logging splits the nested MMU's 2M SPTEs: all at once (eager) or on L2's writes.

    Pins kvm_mmu_slot_try_split_huge_pages() / shadow_mmu_try_split_huge_pages() (eager: each 2M
    SPTE becomes a direct shadow page of 512 4K SPTEs at enable) and FNAME(fetch) /
    __link_shadow_page() (lazy: the first write into a 2M drops it, each write maps one 4K SPTE, no
    prefetch into a dirty-logged slot).  Eager splitting needs the TDP MMU too:
    kvm_mmu_slot_try_split_huge_pages() returns early without it, and then even
    eager_page_split=Y splits lazily; and so does a kernel before v6.0 (NESTED_EAGER_SPLIT: the TDP
    MMU split only its own SPTEs eagerly), whose result the test expects there.
    """
    tdp_mmu = mmu_flavour().tdp_mmu
    eager_wanted = eager and tdp_mmu
    with eager_page_split(eager), NestedDirtyGuest(kvm, nested, DATA_SIZE * scale) as guest:
        huge = guest.map_huge()
        n = guest.huge

        guest.vm.enable_dirty_logging(DATA_SLOT)
        after = guest.counts()
        at_enable = delta(after, huge)
        if eager_wanted:
            # Each 2M SPTE is replaced by a shadow page of 512 4K SPTEs; the guest is
            # parked, so the whole change is the split.
            expect(f"enabling dirty logging (eager_page_split=Y, tdp_mmu=Y): before {huge}, after {after}",
                   at_enable, NESTED_EAGER_SPLIT, before=sized(), since=sized(pages_4k=n * ENTRIES_PER_TABLE,
                                                                            pages_2m=-n))
        else:
            # Only write-protected: the 2M SPTEs stay until L2 writes through them.
            assert at_enable == sized(), \
                f"enabling dirty logging (eager_page_split={'Y' if eager else 'N'}, " \
                f"tdp_mmu={'Y' if tdp_mmu else 'N'}): before {huge}, after {after}"
        splits_eagerly = eager_wanted and has(NESTED_EAGER_SPLIT)   # as the expectation just checked
        assert guest.vm.get_dirty_log(DATA_SLOT).count() == 0, "pages dirty before L2 wrote any"

        # Every third page.  Lazily, the first write fault in each 2M region drops the
        # write-protected 2M SPTE (dirty logging forbids huge mappings) and each write
        # fault installs one 4K SPTE; no prefetching happens into a dirty-logged slot.
        pages = guest.write(first=1, stride=3)
        sparse_pages = len(pages)
        now = guest.counts()
        sparse = delta(now, huge)
        if splits_eagerly:
            # Already split: the writes only make existing 4K SPTEs writable again.
            assert sparse == at_enable, \
                f"L2 writes after the eager split changed SPTE counts: after enable {after}, now {now}"
        else:
            assert sparse == sized(pages_4k=len(pages), pages_2m=-n), \
                f"lazy split after L2 wrote {len(pages)} pages: before {huge}, after {now}"

        # Every page: either way the slot ends up mapped by exactly 512 4K SPTEs per 2M.
        pages = guest.write()
        now = guest.counts()
        assert delta(now, huge) == sized(pages_4k=n * ENTRIES_PER_TABLE, pages_2m=-n), \
            f"after L2 wrote every page under dirty logging: before {huge}, after {now}"
        guest.check_data(pages, guest.pass_no - 1)

    if splits_eagerly:
        kvmpy_stats(when="dirty logging enabled", pages_2m=-n, pages_4k=n * ENTRIES_PER_TABLE)
    else:
        # Nothing at enable; this much once L2 wrote every third page.
        kvmpy_stats(when="L2 wrote every 3rd page", pages_2m=-n, pages_4k=sparse_pages)


def test_nested_huge_pages_recovered_after_dirty_logging(kvm, nested, kvmpy_stats):
    """Disabling dirty logging zaps the nested MMU's 4K SPTEs of each split 2M; L2's next access
    into a 2M maps it with one 2M SPTE again.

    The split 4K SPTEs sit in *direct* shadow pages (eager split: shadow_mmu_get_sp_for_split();
    lazy: FNAME(fetch) under a guest 2M mapping), which kvm_mmu_zap_collapsible_sptes() ->
    kvm_mmu_zap_collapsible_spte() zaps when their level is below the slot's mapping level (an
    indirect page, one that shadows an L1 table, it must keep). The 2M SPTE above each stays a
    link to the emptied shadow page; L2's refault installs a 2M leaf over that link
    (FNAME(fetch) -> mmu_set_spte() drops the child). No upstream selftest runs this for L2.
    With kvm.nx_huge_pages=Y, kernels before v6.2 (NX_HUGE_PAGE_CHECK) refuse a huge mapping over
    any linked table and map 4K (plus up to 8 prefetched pages) instead.
    """
    with NestedDirtyGuest(kvm, nested, DATA_SIZE) as guest:
        huge = guest.map_huge()
        n = guest.huge
        guest.vm.enable_dirty_logging(DATA_SLOT)
        guest.write()                   # every page: all 4K now, whether split eagerly or lazily
        dirty = guest.counts()
        split = sized(pages_4k=n * ENTRIES_PER_TABLE, pages_2m=-n)
        assert delta(dirty, huge) == split, f"L2 wrote every page under dirty logging: before {huge}, after {dirty}"

        guest.vm.enable_dirty_logging(DATA_SLOT, False)
        off = guest.counts()
        assert delta(off, huge) == sized(pages_2m=-n), (
            f"disabling dirty logging should zap the 4K SPTEs of all {n} collapsible 2M regions (direct "
            f"shadow pages): with 2M SPTEs {huge}, split {dirty}, after disabling {off}")

        pages = guest.write(stride=PAGE_2M // PAGE_4K)     # one write per 2M refaults it
        back = guest.counts()
        what = f"after L2 wrote one page per 2M: {back}, with 2M SPTEs: {huge}, after disabling: {off}"
        if mmu_flavour().nx_huge_pages:
            added_4k = back["pages_4k"] - off["pages_4k"]
            mapped_4k = back["pages_2m"] == off["pages_2m"] and n <= added_4k <= 8 * n
            refaulted = "huge again" if back == huge else "mapped 4K, not huge" if mapped_4k else back
            expect(what, refaulted, NX_HUGE_PAGE_CHECK, before="mapped 4K, not huge", since="huge again")
        else:
            assert back == huge, what
        # The 2M leaves map the right memory: this pass's stamps where L2 wrote, the full pass's elsewhere.
        guest.check_data(pages, guest.pass_no - 1)
        guest.check_data(sorted(set(range(guest.npages)) - set(pages)), guest.pass_no - 2)
    kvmpy_stats(when="dirty logging disabled, then L2 wrote one page per 2M",
                pages_4k=off["pages_4k"] - dirty["pages_4k"], pages_2m=back["pages_2m"] - off["pages_2m"])


def cache_misses(guest: NestedDirtyGuest) -> int:
    """mmu_cache_miss: shadow pages kvm_mmu_find_shadow_page() did not find (and so allocated)."""
    return int(guest.vm.stats.read("mmu_cache_miss"))


def test_nested_second_dirty_logging_split_reuses_orphaned_shadow_pages(kvm, nested, kvmpy_stats):
    """Dirty logging enabled a second time: the eager split finds the direct shadow pages the
    first one made, orphaned since, fills them again, and the log is exact.

    The first cycle leaves each split page in the shadow-page hash with no parent: disabling
    logging empties it (kvm_mmu_zap_collapsible_sptes()), and L2's refault puts a 2M leaf over
    its link (FNAME(fetch) -> mmu_set_spte() -> drop_parent_pte()). At the second enable,
    shadow_mmu_get_sp_for_split() asks kvm_mmu_find_shadow_page() -- with a NULL vCPU -- for a
    direct page of the same gfn and role: it finds the orphan and returns at the direct-page
    check, before the unsync branch that would need the vCPU (mmu_cache_miss +0, against +1 per
    2M at the first enable), and shadow_mmu_split_huge_page() refills its 512 SPTEs. No
    upstream selftest splits a slot twice. Needs the TDP MMU (no eager split without it), and
    before v6.2 kvm.nx_huge_pages=N (NX_HUGE_PAGE_CHECK: with it those kernels refault 4K over
    the link, and nothing is huge to split again).
    """
    require_tdp_mmu(mmu_flavour(), "without the TDP MMU enabling dirty logging never splits the nested MMU eagerly")
    require(not mmu_flavour().nx_huge_pages or has(NX_HUGE_PAGE_CHECK),
            f"with kvm.nx_huge_pages=Y, kernels before {NX_HUGE_PAGE_CHECK} refault the slot 4K after "
            "logging: nothing is huge to split a second time", {"kvm.nx_huge_pages": "N"})
    with eager_page_split(True), NestedDirtyGuest(kvm, nested, DATA_SIZE) as guest:
        huge = guest.map_huge()
        n = guest.huge
        split = sized(pages_4k=n * ENTRIES_PER_TABLE, pages_2m=-n)

        missed = cache_misses(guest)
        guest.vm.enable_dirty_logging(DATA_SLOT)
        first = cache_misses(guest) - missed
        assert delta(guest.counts(), huge) == split, f"first enable: {huge} -> {guest.counts()}"
        assert first == n, f"the first split made {first} shadow pages, expected one per 2M ({n})"
        guest.write()
        guest.vm.enable_dirty_logging(DATA_SLOT, False)
        guest.write(stride=PAGE_2M // PAGE_4K)      # huge again, over the emptied pages' links
        assert guest.counts() == huge, f"after the first cycle L2's refault: {guest.counts()}, expected {huge}"

        missed = cache_misses(guest)
        guest.vm.enable_dirty_logging(DATA_SLOT)
        again = guest.counts()
        second = cache_misses(guest) - missed
        assert second == 0, (f"the second split allocated {second} shadow pages: kvm_mmu_find_shadow_page() "
                             f"did not find the {n} direct pages the first split left")
        assert delta(again, huge) == split, f"second enable: {huge} -> {again}, expected {split}"

        pages = guest.write(first=1, stride=3)
        assert guest.counts() == again, f"L2's writes after the second split changed the SPTEs: {guest.counts()}"
        assert list(guest.vm.get_dirty_log(DATA_SLOT).pages()) == pages, "the dirty log is not exactly L2's writes"
        guest.check_data(pages, guest.pass_no - 1)
    kvmpy_stats(when="dirty logging enabled again", mmu_cache_miss=second, **delta(again, huge))


def test_nested_clear_dirty_log_splits_only_cleared_range(kvm, nested, kvmpy_stats):
    """Manual protect with INITIALLY_SET: enabling dirty logging splits nothing; each
    KVM_CLEAR_DIRTY_LOG splits exactly the nested MMU's 2M SPTEs that cover the cleared range.

    Pins kvm_arch_mmu_enable_log_dirty_pt_masked() -> kvm_mmu_try_split_huge_pages() ->
    kvm_shadow_mmu_try_split_huge_pages(): the split of a gfn range by its rmaps, with shadow
    pages from the split caches and no vCPU. A single cleared page at the start of a 2M splits
    that 2M on 6.1 and 6.12 alike, unlike in the TDP MMU: before v6.8 (CLEAR_SPLIT_OFF_BY_ONE) KVM
    passed the empty range [gfn, gfn) for it, which the TDP MMU splits nothing of, but the rmap
    walk of the shadow MMU visits the first rmap of its range before it compares with the end
    (slot_rmap_walk_okay() tests only that there is an rmap). Seen in the bed: 6.1.0-57 splits it.
    kvm_mmu_try_split_huge_pages() returns without the TDP MMU, so the test needs kvm.tdp_mmu=Y
    (and sets eager_page_split=Y).
    """
    require_tdp_mmu(mmu_flavour(), "without the TDP MMU KVM_CLEAR_DIRTY_LOG never splits the nested MMU")
    one = sized(pages_4k=ENTRIES_PER_TABLE, pages_2m=-1)
    with eager_page_split(True), NestedDirtyGuest(kvm, nested, 2 * DATA_SIZE) as guest:
        huge = guest.map_huge()
        n, per_2m = guest.huge, PAGE_2M // PAGE_4K
        guest.vm.enable_manual_protect(initially_set=True)
        guest.vm.enable_dirty_logging(DATA_SLOT)
        on = guest.counts()
        assert on == huge, f"INITIALLY_SET: enabling dirty logging changed the nested MMU's SPTEs: {huge} -> {on}"

        everything = DirtyBitmap.full(guest.npages)
        guest.vm.clear_dirty_log(DATA_SLOT, everything, 0, per_2m)
        part = guest.counts()
        assert delta(part, on) == one, f"clearing the log of the first 2M: expected {one}, got {delta(part, on)}"

        start = per_2m          # one page: the first of the next 2M
        guest.vm.clear_dirty_log(DATA_SLOT, DirtyBitmap.from_pages(guest.npages, [start]), start, 64)
        single = guest.counts()
        assert delta(single, part) == one, (
            f"clearing the log of the first page of a 2M: expected {one} (the nested MMU's rmap walk splits "
            f"the 2M of an empty range's start too), got {delta(single, part)}")

        guest.vm.clear_dirty_log(DATA_SLOT, everything, start, guest.npages - start)
        rest = n - 2
        final = guest.counts()
        assert delta(final, single) == scaled(one, rest), (
            f"clearing the rest: expected {scaled(one, rest)}, got {delta(final, single)}")
        assert delta(final, huge) == scaled(one, n), f"every 2M split once: {huge} -> {final}"

        # L2 writes every page: the split SPTEs only get writable again, and the log is exact.
        pages = guest.write()
        assert guest.counts() == final, f"L2's writes after the splits changed the SPTEs: {final} -> {guest.counts()}"
        assert list(guest.vm.get_dirty_log(DATA_SLOT).pages()) == pages, "the dirty log is not exactly L2's writes"
        guest.check_data(pages, guest.pass_no - 1)
    kvmpy_stats(when="KVM_CLEAR_DIRTY_LOG of the first 2M", **delta(part, on))
