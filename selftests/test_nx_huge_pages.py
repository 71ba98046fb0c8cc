"""kvm.nx_huge_pages for L1's own mappings: an instruction fetch splits a huge page, the recovery
worker puts it back, on the MMU the bed boot gives (the TDP MMU by default; the shadow MMU with
``--param kvm_amd.npt=0``).

With the iTLB-multihit workaround on, KVM maps huge pages non-executable; a fetch from one
faults and gets a 4K mapping under a new page table, counted in ``nx_lpage_splits``. The TDP
MMU splits the huge SPTE into 512 (kvm_tdp_mmu_map(), since SPLIT_ON_FAULT; before, it dropped
it and mapped the fetched page alone); the shadow MMU (direct_map() under TDP without the TDP
MMU, FNAME(fetch) under shadow paging) links a direct shadow page, maps the page and prefetches
the rest of its group of 8. The recovery worker (kvm_recover_nx_huge_pages():
kvm_tdp_mmu_zap_sp() or kvm_mmu_prepare_zap_page()) zaps the page tables, and the next access
maps huge again. test_nested_nx_huge_pages.py does the same for L2 through the nested MMU.
The test changes the parameters as it goes (host_state.nx_huge_pages): a bed boot that does
not fix them runs it.
"""
from __future__ import annotations

from kvmpy.x86.paging import ENTRIES_PER_TABLE

from .host_state import nx_huge_pages
from .huge_regions import populate, region, touch_guest
from .kernel_changes import SPLIT_ON_FAULT, expect
from .sptes import NX_RECOVERY_PERIOD_MS, PREFETCH, delta, nx_splits, sized, wait_nx_recovered


def test_fetch_splits_nx_huge_pages_and_recovery_restores_them(kvm, cpl, mmu, kvmpy_stats):
    """A fetch from the first page of each 2M the guest wrote: each 2M SPTE goes, a page table of
    4K SPTEs comes (nx_lpage_splits = 2M pages); the worker zaps exactly those 4K SPTEs, and the
    next write maps every 2M huge again."""
    with nx_huge_pages() as start_recovery, region("thp") as r, touch_guest(kvm, r, cpl) as t:
        pop, huge = populate(t, r)       # data writes: 2M SPTEs (KVM makes them non-executable)
        n = len(huge)
        splits = nx_splits(t.vm)
        assert splits == 0, f"NX huge page splits before the guest fetched from the region: {splits}"

        t.execute(stride=r.chunk)       # the chunks the kernel backs 4K are mapped 4K, executable
        split = t.counts()
        what = f"{mmu.name}: a fetch from each of {n} 2M pages: SPTE counts before {pop}, after {split}"
        if mmu.tdp_mmu:
            expect(what, delta(split, pop), SPLIT_ON_FAULT, before=sized(pages_4k=n, pages_2m=-n),
                   since=sized(pages_4k=n * ENTRIES_PER_TABLE, pages_2m=-n))
        else:
            assert delta(split, pop) == sized(pages_4k=PREFETCH * n, pages_2m=-n), what
        splits = nx_splits(t.vm)
        assert splits == n, f"{what}; nx_lpage_splits {splits}, expected {n}"

        start_recovery(NX_RECOVERY_PERIOD_MS)
        took = wait_nx_recovered(t.vm)
        after = t.counts()
        assert delta(after, pop) == sized(pages_2m=-n), (
            f"{mmu.name}: after NX recovery ({took:.1f} s) the split's 4K SPTEs should be gone and nothing "
            f"else: populated {pop}, NX-split {split}, recovered {after}")

        t.write(stride=r.chunk, stamp=2)
        back = t.counts()
        assert back == pop, f"{mmu.name}: a write into each 2M after recovery: {back}, after population: {pop}"
        assert nx_splits(t.vm) == 0
    kvmpy_stats(when="a fetch from each 2M", **delta(split, pop))
