"""Eager page splitting of the nested MMU meets unsync shadow pages of the same gfn.

When dirty logging is enabled (kvm.tdp_mmu=Y, kvm.eager_page_split=Y), KVM
splits the nested MMU's huge SPTEs (kvm_shadow_mmu_try_split_huge_pages, 1G
then 2M).  For each huge SPTE shadow_mmu_get_sp_for_split() asks
__kvm_mmu_get_shadow_page() for a *direct* shadow page at the gfn where the huge
range starts, with vcpu == NULL: kvm_mmu_find_shadow_page() needs a vCPU only to
sync an unsync page of the same gfn *and role*, and a direct role never matches
an indirect (unsync-able) page.  It does meet indirect pages of that gfn when L1
keeps an NPT/EPT table there: guests/nested_split_unsync.c puts its last-level
tables at the start of an L1 range it maps to L2 with one 2M or 1G page, lets
KVM shadow them, makes them unsync, and then the host enables dirty logging.

Runs once per vendor and huge-page size: SVM+NPT in the AMD bed (QEMU, 2M and
1G), VMX+EPT in the Intel bed (Bochs, 2M; its 2 GiB leave no room for a 1G page).
"""
from __future__ import annotations

import pytest

from kvmpy.errors import require
from kvmpy.guest import stages
from kvmpy.hostinfo import mmu_flavour
from kvmpy.hostmem import hugetlb_pool
from kvmpy.memory import PAGE_1G, PAGE_2M, PAGE_4K, Hugetlb
from kvmpy.x86.paging import ENTRIES_PER_TABLE

from .bed_config import require_tdp_mmu
from .drivers import StageLog, nested_guest
from .kernel_changes import NESTED_EAGER_SPLIT, SPLIT_ON_FAULT, expect, has, running_release
from .host_state import eager_page_split, hugetlb_pages
from .sptes import SIZES, sized

HUGE_SLOT = 1
HUGE_L1 = 1 << 32          # 1G aligned: the slot, and L1's tables at its start (+ 2M)
HUGE_L2 = 1 << 30          # L2 GPAs mapped to it with one huge NPT/EPT page
Y_L2 = 2 << 30             # L2 GPAs behind L1's tables (4K pages to frames in slot 0)
STATS = SIZES + ("mmu_unsync", "mmu_shadow_zapped", "mmu_cache_miss")


def _delta(after: dict, before: dict, names=STATS) -> dict[str, int]:
    return {k: after[k] - before[k] for k in names}


@pytest.mark.parametrize("huge", [PAGE_2M, PAGE_1G], ids=["2M", "1G"])
def test_eager_split_meets_unsync_shadow_pages(kvm, nested, kvmpy_stats, huge):
    """Eager split of a nested huge SPTE whose gfn holds unsync shadow pages of L1's tables.

    Pins kvm_mmu_find_shadow_page() as called by shadow_mmu_get_sp_for_split() (6.1 and 6.12 are
    line for line the same here): an unsync page of the gfn whose role differs is zapped
    (kvm_mmu_prepare_zap_page) only when the requested child is above 4K, i.e. at the 1G->2M step
    of a 1G SPTE, and left alone at the 2M->4K step; the split itself (shadow_mmu_split_huge_page:
    one new direct shadow page, mmu_cache_miss +1, 512 children); and that no WARN/KVM_BUG_ON
    (KVM_BUG_ON(!vcpu) in kvm_mmu_find_shadow_page, WARN_ON_ONCE(sp->unsync) in
    shadow_mmu_try_split_huge_pages) fires: the splat watch fails the test.

    2M: one table at the 2M range's start D.  At enable: {4k:+512, 2m:-1}, mmu_cache_miss +1,
    the unsync page kept (mmu_unsync, mmu_shadow_zapped unchanged).
    1G: tables at E and E+2M.  At enable, 1G->2M: the unsync page at E is zapped (mmu_unsync -1,
    mmu_shadow_zapped +1, its 512 SPTEs dropped), {2m:+512, 1g:-1}, +1 miss; 2M->4K: 512 splits,
    {4k:+512*512, 2m:-512}, +512 misses, the unsync page at E+2M kept.  L1's own TDP MMU adds its
    leftover huge SPTEs of the slot: since v6.2 its write faults on the tables split its 1G in
    place (510 2M left to split eagerly: {4k:+510*512, 2m:-510}), before they zapped it (none).
    Afterwards, L1 flushes (SVM: the VMRUN syncs; VMX: INVEPT, the next entry syncs): L2 reads the
    swapped frames, mmu_unsync is back at its base, and the dirty log of the slot is exactly the
    pages L2 wrote (L1's frames are outside it, so 6.1's FNAME(sync_page) marking every synced
    writable gfn dirty cannot show here). Nested eager splitting came with v6.0
    (kernel_changes.NESTED_EAGER_SPLIT): before it, enabling logging changes none of these stats.
    """
    require_tdp_mmu(mmu_flavour(), "without the TDP MMU KVM never splits the nested MMU eagerly "
                                   "(kvm_mmu_slot_try_split_huge_pages returns early)")
    if huge == PAGE_1G:
        pool = hugetlb_pool(PAGE_1G) or {}
        # Only found at boot: growing the pool later means compacting all of memory, which the
        # emulated beds do for minutes and then most often fail.
        require(pool.get("free", 0) - pool.get("resv", 0) >= 1,
                f"needs a free 1 GiB hugetlb page, the pool has {pool or 'none'}: reserve one at boot "
                "(the QEMU bed of `kvmpy selftest --bed` does; the Bochs bed's 2 GiB cannot hold one)")
    nr_tables = 1 if huge == PAGE_2M else 2
    pages_per_huge = huge // PAGE_4K
    # Pages L2 writes at the end: spread over the range, none of them one of L1's tables.
    step = 5 if huge == PAGE_2M else 1031
    writes = [1 + j * step for j in range(16)]
    assert not {0, ENTRIES_PER_TABLE} & set(writes) and max(writes) < pages_per_huge
    at_enable: dict[str, dict] = {}

    def enable(rec) -> None:
        g.vm.enable_dirty_logging(HUGE_SLOT)
        at_enable["before"] = rec.stats
        at_enable["after"] = {k: int(v) for k, v in g.vm.stats.snapshot().items() if isinstance(v, int)}
        at_enable["dirty"] = g.vm.get_dirty_log(HUGE_SLOT).pages()

    with eager_page_split(True), hugetlb_pages(huge, 1), nested_guest(kvm, nested, "nested_split_unsync") as g:
        slot = g.add_memory(HUGE_SLOT, HUGE_L1, huge, Hugetlb(huge))
        g.map(HUGE_L1, HUGE_L1, nr_tables * PAGE_2M, PAGE_2M)      # L1 writes its tables there
        g.map(HUGE_L2, HUGE_L2, huge, PAGE_2M)
        g.map(Y_L2, Y_L2, nr_tables * PAGE_2M, PAGE_2M)
        for name, value in (("l1_mem_size", g.mem_size), ("huge_l2", HUGE_L2), ("huge_l1", HUGE_L1),
                            ("huge_size", huge), ("nr_tables", nr_tables), ("y_l2", Y_L2),
                            ("write_first", writes[0]), ("write_stride", step), ("write_count", len(writes))):
            g.write_global(name, value)
        log = StageLog(g.vm, {stages.SPLIT_UNSYNC_EDITED: enable,
                              stages.SPLIT_UNSYNC_WRITTEN: lambda rec: at_enable.setdefault(
                                  "written", g.vm.get_dirty_log(HUGE_SLOT).pages())})
        g.run(timeout=900, on_sync=log)
        data = {p: int.from_bytes(slot.view[p * PAGE_4K: p * PAGE_4K + 8], "little") for p in writes}

    start, populated = log.at(stages.SPLIT_UNSYNC_START).stats, log.at(stages.SPLIT_UNSYNC_HUGE).stats
    shadowed, edited = log.at(stages.SPLIT_UNSYNC_SHADOWED).stats, log.at(stages.SPLIT_UNSYNC_EDITED).stats
    written = log.at(stages.SPLIT_UNSYNC_WRITTEN).stats
    size = "pages_2m" if huge == PAGE_2M else "pages_1g"
    huge_only = ("pages_2m", "pages_1g")

    # The nested MMU mapped L2's huge range with one huge SPTE (slot 0 is 4K-backed).
    got = _delta(populated, start, huge_only)
    assert got == {**dict.fromkeys(huge_only, 0), size: 1}, \
        f"L2 read its huge range: {size} before {start[size]}, after {populated[size]}: {got}"
    assert _delta(shadowed, populated, huge_only) == dict.fromkeys(huge_only, 0), \
        f"shadowing L1's tables changed huge SPTE counts: before {populated}, after {shadowed}"

    # L1's writes unsync one shadow page per table; its own huge TDP SPTE goes (split or zapped).
    got = _delta(edited, shadowed, huge_only + ("mmu_unsync", "mmu_shadow_zapped"))
    split_in_place = has(SPLIT_ON_FAULT)     # L1's own TDP MMU splits its huge SPTE on the write fault
    tdp_left = (ENTRIES_PER_TABLE - nr_tables) if huge == PAGE_1G and split_in_place else 0
    want = {"pages_2m": -1 if huge == PAGE_2M else tdp_left, "pages_1g": -1 if huge == PAGE_1G else 0,
            "mmu_unsync": nr_tables, "mmu_shadow_zapped": 0}
    assert got == want, (f"L1 rewrote entries of its {nr_tables} shadowed table(s) (kernel {running_release()}, "
                         f"TDP MMU splits on fault ({SPLIT_ON_FAULT}): {split_in_place}): before {_pick(shadowed)}, "
                         f"after {_pick(edited)}: {got}, want {want}")

    # Enabling dirty logging: the nested split, and L1's own leftover huge TDP SPTEs.
    before, after = at_enable["before"], at_enable["after"]
    got = _delta(after, before)
    if huge == PAGE_2M:
        want = {**sized(pages_4k=ENTRIES_PER_TABLE, pages_2m=-1),
                "mmu_unsync": 0, "mmu_shadow_zapped": 0, "mmu_cache_miss": 1}
    else:
        zapped_sptes = ENTRIES_PER_TABLE      # L2 read every page behind the table at E
        want = {**sized(pages_4k=ENTRIES_PER_TABLE ** 2 - zapped_sptes + tdp_left * ENTRIES_PER_TABLE,
                        pages_2m=-tdp_left, pages_1g=-1),
                "mmu_unsync": -1, "mmu_shadow_zapped": 1, "mmu_cache_miss": 1 + ENTRIES_PER_TABLE}
    # Before v6.0 (NESTED_EAGER_SPLIT) no nested SPTE is split at enable, and L1's own huge TDP SPTE
    # was zapped by its write fault (before v6.2: tdp_left 0): nothing changes.
    expect(f"enabling dirty logging with unsync tables at the huge range's start (kernel {running_release()}): "
           f"before {_pick(before)}, after {_pick(after)}", got, NESTED_EAGER_SPLIT,
           before=dict.fromkeys(STATS, 0), since=want)
    assert at_enable["dirty"] == [], f"dirty pages right after enabling logging: {at_enable['dirty']}"

    # After L1's flush: back in sync, L2 saw the swapped frames (it asserts that), its writes
    # landed and are exactly the dirty log.
    assert written["mmu_unsync"] == shadowed["mmu_unsync"], \
        f"after L1's flush and L2's run: mmu_unsync {written['mmu_unsync']}, before L1's edit " \
        f"{shadowed['mmu_unsync']}"
    assert written["mmu_shadow_zapped"] == after["mmu_shadow_zapped"], \
        f"shadow pages zapped after the split: before {after['mmu_shadow_zapped']}, after " \
        f"{written['mmu_shadow_zapped']}"
    assert log.at(stages.SPLIT_UNSYNC_WRITTEN).args[0] == len(writes)
    assert data == {p: 0x77 << 32 | p for p in writes}, f"L2's writes in the huge range: {data}"
    assert at_enable["written"] == writes, \
        f"dirty log of the huge slot after L2 wrote pages {writes}: {at_enable['written']}"
    kvmpy_stats(when="dirty logging enabled", **{k: v for k, v in got.items() if v})


def _pick(stats: dict) -> dict:
    return {k: stats[k] for k in STATS}
