"""Eager splitting of the nested MMU under memory pressure: a memory cgroup limit stops it part way.

The shadow pages an eager split of the nested MMU needs come from per-VM
caches (kvm->arch.split_shadow_page_cache, split_page_header_cache,
split_desc_cache) that topup_split_caches() refills with GFP_KERNEL_ACCOUNT
allocations, charged to the memory cgroup of the task that enables dirty
logging.  Runs once per vendor (the `nested` fixture), inside the bed only:
the test moves its own process into a memory cgroup (selftests/memcg.py).
"""
from __future__ import annotations

from kvmpy.hostinfo import mmu_flavour
from kvmpy.memory import PAGE_2M, PAGE_4K
from kvmpy.x86.paging import ENTRIES_PER_TABLE

from .bed_config import require_tdp_mmu
from .drivers import DATA_SLOT, NestedDirtyGuest
from .host_state import eager_page_split
from .kernel_changes import NESTED_EAGER_SPLIT, expect, has
from .memcg import memory_cgroup
from .sptes import SIZES, sized

SIZE = 512 << 20                 # 256 2M pages: 1 MiB of shadow pages to split them all
# memory.max above memory.current for the enable ioctl.  It pays for the new memslot and its
# two dirty bitmaps (32 KiB), the rmap descriptors topup_split_caches() wants before any split
# (513 + 40 of 128 bytes), shadow page headers, then 4 KiB per split.  Up to 128 pages the
# kernel charged ahead per CPU come on top (MemoryCgroup.limited): still far below 1 MiB.
MARGIN = 256 << 10
STATS = SIZES + ("mmu_unsync", "mmu_shadow_zapped", "mmu_cache_miss")


def _stats(vm) -> dict[str, int]:
    snap = vm.stats.snapshot()
    return {k: int(snap[k]) for k in STATS}


def test_nested_eager_split_stops_part_way_under_memory_limit(kvm, nested, kvmpy_stats):
    """A memory.max just above the VM's usage stops the eager split part way; L2's writes split the rest.

    Pins shadow_mmu_try_split_huge_page() / topup_split_caches(): each split takes one shadow
    page (and header) from the split caches, refilled by __kvm_mmu_topup_memory_cache() with
    GFP_KERNEL_ACCOUNT; when a refill cannot get even one page the split of that huge SPTE
    fails with -ENOMEM (shadow_mmu_try_split_huge_pages() leaves its rmap, the walk goes on and
    fails the same way), the ioctl still succeeds, and the unsplit 2M SPTEs stay, write-protected.
    With the test process at oom_score_adj -1000 the memcg OOM killer finds no victim: no OOM
    kill, the allocation fails.  Asserted: no splat, the enable succeeded, memory.events "max"
    rose and "oom_kill" did not, s splits with 0 < s < 256 and exactly {4k:+512*s, 2m:-s},
    mmu_cache_miss +s, nothing unsync or zapped.  Then, the limit lifted (before L2 runs: with
    it KVM_RUN's own top-up, mmu_topup_memory_caches(), could fail with ENOMEM), L2 writes one
    page in every 2M: FNAME(fetch) replaces each of the 256 - s huge SPTEs left by one 4K SPTE
    ({4k:+1, 2m:-1} each), the split ones only get writable; the dirty log is exactly those
    pages, and no 2M SPTE of the slot is left.
    """
    require_tdp_mmu(mmu_flavour(), "without the TDP MMU KVM never splits the nested MMU eagerly")
    with eager_page_split(True), memory_cgroup() as cg, NestedDirtyGuest(kvm, nested, size=SIZE) as guest:
        huge = guest.huge
        populated = guest.map_huge()
        before, events_before = _stats(guest.vm), cg.events()
        with cg.limited(MARGIN) as limit:
            guest.vm.enable_dirty_logging(DATA_SLOT)
        after, events_after = _stats(guest.vm), cg.events()
        split = before["pages_2m"] - after["pages_2m"]
        got = {k: after[k] - before[k] for k in STATS}
        where = (f"memory.max {limit} (usage + {MARGIN >> 10} KiB), memory.events before {events_before}, "
                 f"after {events_after}; stats before {before}, after {after}")
        assert not cg.lifted_by_timeout, f"the limit was lifted by the helper's timeout, not after the ioctl; {where}"
        # Before v6.0 the nested MMU is not split eagerly at all (NESTED_EAGER_SPLIT), limit or not.
        expect(f"eager split of {huge} 2M SPTEs under the limit split {split}; {where}",
               "none" if split == 0 else "part way" if split < huge else "all", NESTED_EAGER_SPLIT,
               before="none", since="part way")
        assert got == {**sized(pages_4k=split * ENTRIES_PER_TABLE, pages_2m=-split),
                       "mmu_unsync": 0, "mmu_shadow_zapped": 0, "mmu_cache_miss": split}, \
            f"counts after a split of {split}: {got}; {where}"
        if has(NESTED_EAGER_SPLIT):    # nothing to allocate before: the limit is never reached
            assert events_after["max"] > events_before["max"], f"the group never hit memory.max; {where}"
        assert events_after["oom_kill"] == events_before["oom_kill"], f"the OOM killer killed; {where}"

        # The limit is gone: L2 writes one page in every 2M of the region.
        pages = guest.write(first=1, stride=PAGE_2M // PAGE_4K)
        now = _stats(guest.vm)
        lazy = {k: now[k] - after[k] for k in SIZES}
        assert lazy == sized(pages_4k=huge - split, pages_2m=-(huge - split)), \
            f"L2 wrote one page per 2M after a partial split of {split}: before {after}, after {now}"
        dirty = guest.vm.get_dirty_log(DATA_SLOT).pages()
        assert dirty == pages, f"dirty log after L2 wrote pages {pages[:4]}...: {dirty[:8]}... ({len(dirty)})"
        guest.check_data(pages, guest.pass_no - 1)
        assert now["pages_2m"] == populated["pages_2m"] - huge, \
            f"2M SPTEs left in the slot: populated {populated}, now {now}"
    kvmpy_stats(when="dirty logging enabled under memory.max", pages_2m=-split,
                pages_4k=split * ENTRIES_PER_TABLE)
