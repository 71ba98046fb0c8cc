"""kvm.nx_huge_pages under the nested MMU: L2's instruction fetch splits a huge page, the
recovery worker puts it back.

With the iTLB-multihit workaround on, KVM maps huge pages non-executable; an instruction
fetch from one is a fault that KVM answers with a 4K mapping under a new direct shadow page
(FNAME(fetch) -> disallowed_hugepage_adjust(), account_nx_huge_page(): ``nx_lpage_splits``
+1). The recovery worker (kvm_recover_nx_huge_pages(), every
``nx_huge_pages_recovery_period_ms``, 1/``ratio`` of the splits) zaps such pages so the next
access maps huge again; in a dirty-logged slot it only unaccounts them since
NX_RECOVERY_SKIPS_DIRTY_LOGGED (they would fault back 4K), and disabling dirty logging
collapses them. Upstream's nx_huge_pages_test runs this for L1's own mappings only; here L2
fetches through L1's 2M NPT/EPT pages (guests/nested_dirty.c), so the split shadow pages are
the nested MMU's. The test changes the parameters as it goes (host_state.nx_huge_pages):
the default bed boot runs it, once per vendor.
"""
from __future__ import annotations

import pytest

from kvmpy.memory import PAGE_2M, PAGE_4K

from .drivers import DATA_SIZE, DATA_SLOT, NestedDirtyGuest
from .host_state import nx_huge_pages
from .kernel_changes import NX_RECOVERY_SKIPS_DIRTY_LOGGED, expect
from .sptes import NX_RECOVERY_PERIOD_MS, PREFETCH, delta, nx_splits, sized, wait_nx_recovered


@pytest.mark.parametrize("logged", [False, True], ids=["recovered", "dirty-logged"])
def test_l2_fetch_splits_nx_huge_pages_and_recovery_restores_them(kvm, nested, kvmpy_stats, logged):
    """L2 fetches from one page per 2M: each 2M SPTE goes, one direct shadow page of 4K SPTEs per
    2M comes (nx_lpage_splits = 2M pages); the worker zaps exactly those 4K SPTEs, and L2's next
    write maps every 2M huge again. Dirty-logged: the worker leaves them mapped and only
    unaccounts them (6.2+; 6.1 zaps them as without logging), and disabling logging drops them.
    """
    with nx_huge_pages() as start_recovery, NestedDirtyGuest(kvm, nested, DATA_SIZE) as guest:
        huge = guest.map_huge()     # data writes: 2M SPTEs (KVM makes them non-executable)
        n = guest.huge
        assert nx_splits(guest.vm) == 0, "NX huge page splits before L2 fetched from the region"

        guest.execute(stride=PAGE_2M // PAGE_4K)
        split = guest.counts()
        mapped_4k = split["pages_4k"] - huge["pages_4k"]
        what = f"L2 fetched from one page per 2M: SPTE counts before {huge}, after {split}"
        # The fetched page and the 7 others of its aligned group of 8 (the prefetch of a direct
        # shadow page; the slot is not dirty-logged and its memory present).
        assert split["pages_2m"] - huge["pages_2m"] == -n and mapped_4k == PREFETCH * n, what
        assert split["pages_1g"] == huge["pages_1g"], what
        splits = nx_splits(guest.vm)
        assert splits == n, f"{what}; nx_lpage_splits {splits}, expected {n}"

        if logged:
            guest.vm.enable_dirty_logging(DATA_SLOT)
            # No 2M SPTE of the slot is left for the eager split: nothing changes.
            assert guest.counts() == split, f"enabling dirty logging after the NX splits: {split} -> {guest.counts()}"

        start_recovery(NX_RECOVERY_PERIOD_MS)
        took = wait_nx_recovered(guest.vm)
        after = guest.counts()
        zapped = sized(pages_2m=-n)             # the 4K SPTEs under each split went, the rest stayed
        what = (f"after NX recovery ({took:.1f} s): SPTE counts with 2M SPTEs {huge}, NX-split {split}, "
                f"recovered {after}")
        if logged:
            outcome = "kept" if after == split else "zapped" if delta(after, huge) == zapped else after
            expect(what, outcome, NX_RECOVERY_SKIPS_DIRTY_LOGGED, before="zapped", since="kept")
            guest.vm.enable_dirty_logging(DATA_SLOT, False)
            off = guest.counts()
            assert delta(off, huge) == zapped, \
                f"disabling dirty logging should zap the NX-split 4K SPTEs too: recovered {after}, then {off}"
        else:
            assert delta(after, huge) == zapped, what

        pages = guest.write(stride=PAGE_2M // PAGE_4K)
        back = guest.counts()
        assert back == huge, f"L2 wrote one page per 2M after recovery: {back}, with 2M SPTEs before: {huge}"
        assert nx_splits(guest.vm) == 0
        guest.check_data(pages, guest.pass_no - 1)      # the 2M leaves map the slot's memory
    kvmpy_stats(when="L2 fetched from one page per 2M", pages_2m=-n, pages_4k=mapped_4k)
