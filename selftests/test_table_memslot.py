"""A memslot that holds a guest page table is replaced while KVM shadows that table.

Deleting a memslot must take with it every shadow page whose gfn is in it: the shadow of a
guest page table lives only as long as KVM write-protects (write-tracks) that table, and the
tracking is per memslot. Each test keeps a last-level page table in a memslot of its own.
After the guest has written its data through it (so KVM holds an indirect shadow page of the
table), the host replaces that memslot: deletes it (or moves it elsewhere, KVM_MR_MOVE) and
adds new memory at the table's GPA. The
table is then filled anew to map the data to other memory, the guest flushes, and writes
again. A shadow page of the old table that survived would still translate the data to the
old frames: the second writes would land in the old data memslot instead of the new one.

- L1's own page table under shadow paging (kvm_pvm at CPL3; the bed's shadow row): the host
  builds the table (PageTableBuilder.set_table); guests/mmu_touch.c writes and reloads CR3.
- L1's NPT/EPT table for its L2 under the nested MMU: guests/nested_memslot.c, in which L1
  keeps and refills the table itself.

With KVM_X86_QUIRK_SLOT_ZAP_ALL (the default) KVM zaps all shadow pages at a memslot deletion
(kvm_mmu_zap_all_fast). With the quirk disabled, which SLOT_ZAP_QUIRK made possible, it zaps
only the memslot's (kvm_mmu_zap_memslot); in v6.12-rc1 that zapped the slot's leaf SPTEs but
not the shadow pages of tables in it, fixed by SLOT_ZAP_SHADOW_FIX before v6.12 (without it the VM's
teardown also oopsed, which the splat watch would catch). Upstream's set_memory_region_test
deletes and moves memslots of guest data; kvm_util keeps guest page tables in memslot 0, which
no upstream selftest replaces.
"""
from __future__ import annotations

import pytest

from kvmpy.abi import lib
from kvmpy.errors import require
from kvmpy.guest import stages
from kvmpy.memory import PAGE_2M, PAGE_4K, Anonymous
from kvmpy.vm import Vm

from .drivers import TEST_GPA, StageLog, TouchGuest, nested_guest
from .kernel_changes import SLOT_ZAP_QUIRK, SLOT_ZAP_SHADOW_FIX, running_release
from .sptes import SIZES, counts, delta, sized

TABLE_SLOT, TABLE_L1 = 2, 0x8000_0000   # the last-level table for the data (one page)
MOVED_L1, SPARE_SLOT = 0x8020_0000, 5   # where "move" puts it; the new memory's memslot then
OLD_SLOT, OLD_L1 = 3, 0xC000_0000       # what the data maps to first (L1's own table: TouchGuest's slot) ...
NEW_SLOT, NEW_L1 = 4, 0xC020_0000       # ... and after the table's memslot was replaced
DATA_L2 = 0x4000_0000                   # L2 GPAs (and GVAs) of the nested test's data
PAGES = 64                              # nested faults are slow in the Bochs bed
# How the table's memslot goes: deleted, or moved away (KVM_MR_MOVE: the quirk covers both);
# with the quirk (zap-all) or without it (zap-slot).
REPLACEMENTS = pytest.mark.parametrize("how, zap", [(h, z) for h in ("delete", "move") for z in ("all", "slot")],
                                       ids=lambda v: v if v in ("delete", "move") else f"zap-{v}")


def disable_slot_zap_all(vm: Vm) -> None:
    """Disable KVM_X86_QUIRK_SLOT_ZAP_ALL (a skip naming the release where KVM has no such quirk)."""
    quirks = vm.check_extension(lib.KVM_CAP_DISABLE_QUIRKS2)
    require(quirks & lib.KVM_X86_QUIRK_SLOT_ZAP_ALL,
            f"KVM offers no KVM_X86_QUIRK_SLOT_ZAP_ALL to disable (KVM_CAP_DISABLE_QUIRKS2 = {quirks:#x}, "
            f"kernel {running_release()}): it came with {SLOT_ZAP_QUIRK}")
    vm.enable_cap(lib.KVM_CAP_DISABLE_QUIRKS2, lib.KVM_X86_QUIRK_SLOT_ZAP_ALL)


def _replace(g, how: str) -> None:
    """Take the table's memslot away from TABLE_L1 (``how``: "delete" it, or "move" it to
    MOVED_L1) and put new, zeroed memory there."""
    if how == "delete":
        g.vm.delete_memory(TABLE_SLOT)
        g.add_memory(TABLE_SLOT, TABLE_L1, PAGE_4K, Anonymous())
    else:
        g.vm.move_memory(TABLE_SLOT, MOVED_L1)
        g.add_memory(SPARE_SLOT, TABLE_L1, PAGE_4K, Anonymous())


def _check_writes(old: list[int], new: list[int], first, second, how: str, zap: str) -> None:
    """The first pass's stamps (``first(page)``) are all in the old data, the second's all in
    the new: one of them in the old data means a shadow page of the replaced table survived."""
    stale = [p for p in range(PAGES) if old[p] == second(p)]
    assert not stale, (
        f"{len(stale)} of the {PAGES} writes after the table's memslot was replaced landed in the OLD data "
        f"memslot (pages {stale[:8]}...): a shadow page of the old table survived ({how}, zap={zap}, kernel "
        f"{running_release()}; with the quirk disabled, see {SLOT_ZAP_SHADOW_FIX})")
    lost = [p for p in range(PAGES) if old[p] != first(p)]
    assert not lost, f"the old data lost the first pass's stamps: pages {lost[:8]}"
    wrong = [p for p in range(PAGES) if new[p] != second(p)]
    assert not wrong, f"{len(wrong)} pages of the new data lack the second pass's stamps, e.g. {wrong[:8]}"


def _check_zap(before: dict[str, int], after: dict[str, int], zap: str, own: int) -> None:
    """What the replacement dropped: with the quirk disabled exactly ``own`` 4K SPTEs (those
    below the table's shadow page, and any that maps the table's page itself), every other
    kept; with the quirk, every shadow page goes, so more than ``own``."""
    got = delta(after, before)
    if zap == "slot":
        assert got == sized(pages_4k=-own), (
            f"replacing the table's memslot with KVM_X86_QUIRK_SLOT_ZAP_ALL disabled: SPTE counts before "
            f"{before}, after {after}: {got}, want exactly the {own} 4K SPTEs of the slot's pages")
    else:
        assert got["pages_4k"] < -own, (
            f"replacing the table's memslot (zap all): SPTE counts before {before}, after {after}: {got}, "
            f"want every shadow page gone, more than the slot's {own} 4K SPTEs")


def _stamps(slot, pages: int = PAGES) -> list[int]:
    return [int.from_bytes(slot.view[p * PAGE_4K: p * PAGE_4K + 8], "little") for p in range(pages)]


@REPLACEMENTS
def test_replaced_table_memslot_drops_shadow_pages(kvm, cpl, shadow_paging, kvmpy_stats, how, zap):
    """The guest's writes after its page table's memslot was replaced go where the new table maps them.

    zap-slot: kvm_mmu_zap_memslot must zap the indirect shadow page of the table at TABLE_L1
    (its gfn is in the slot), not only the slot's leaf SPTEs (none: the data is elsewhere).
    """
    size = PAGES * PAGE_4K
    with TouchGuest(kvm, Anonymous(), size, cpl=cpl, map_region=False,
                    before_vcpus=disable_slot_zap_all if zap == "slot" else None) as t:
        g = t.g
        g.add_memory(TABLE_SLOT, TABLE_L1, PAGE_4K, Anonymous())
        new = g.add_memory(NEW_SLOT, NEW_L1, size, Anonymous())
        g.pt.set_table(TEST_GPA, 1, TABLE_L1)
        g.map(TEST_GPA, TEST_GPA, size, PAGE_4K)         # the data: TouchGuest's slot, first
        assert t.write(stamp=0x1111 << 32) == PAGES
        before = counts(g.vm)
        _replace(g, how)
        after = counts(g.vm)
        g.map(TEST_GPA, NEW_L1, size, PAGE_4K)           # into the new table: the new data
        t.reload_cr3()
        assert t.write(stamp=0x2222 << 32) == PAGES
        old_stamps, new_stamps = _stamps(t.slot), _stamps(new)
    _check_writes(old_stamps, new_stamps, lambda p: 0x1111 << 32 ^ p * PAGE_4K,
                  lambda p: 0x2222 << 32 ^ p * PAGE_4K, how, zap)
    _check_zap(before, after, zap, own=PAGES)       # the guest never reads its table as data


@REPLACEMENTS
def test_replaced_table_memslot_drops_nested_shadow_pages(kvm, nested, kvmpy_stats, how, zap):
    """L2's writes after its NPT/EPT table's memslot was replaced go where L1's new table maps them.

    Runs once per vendor: SVM+NPT in the AMD bed (QEMU), VMX+EPT in the Intel bed (Bochs).
    """
    replaced = {}

    def replace_table_slot(rec) -> None:
        if rec.args[0] == 1:
            replaced["before"] = rec.stats
            _replace(g, how)
            replaced["after"] = counts(g.vm)
            g.write_global("cmd_target", NEW_L1)
        else:
            g.write_global("cmd_stop", 1)

    with nested_guest(kvm, nested, "nested_memslot",
                      before_vcpus=disable_slot_zap_all if zap == "slot" else None) as g:
        g.add_memory(TABLE_SLOT, TABLE_L1, PAGE_4K, Anonymous())
        old = g.add_memory(OLD_SLOT, OLD_L1, PAGE_2M, Anonymous())
        new = g.add_memory(NEW_SLOT, NEW_L1, PAGE_2M, Anonymous())
        g.map(TABLE_L1, TABLE_L1, PAGE_4K, PAGE_4K)      # L1 writes its table there
        g.map(DATA_L2, DATA_L2, PAGE_2M, PAGE_2M)        # L2's GVAs, through L1's page tables
        for name, value in (("l1_mem_size", g.mem_size), ("data_l2_gpa", DATA_L2), ("data_size", PAGES * PAGE_4K),
                            ("table_gpa", TABLE_L1), ("cmd_target", OLD_L1)):
            g.write_global(name, value)
        log = StageLog(g.vm, {stages.NESTED_MEMSLOT_PASS: replace_table_slot})
        g.run(timeout=900, on_sync=log)
        old_stamps, new_stamps = _stamps(old), _stamps(new)

    first, second = log.at(stages.NESTED_MEMSLOT_PASS, 0), log.at(stages.NESTED_MEMSLOT_PASS, 1)
    assert first.args[:2] == (1, PAGES) and second.args[:2] == (2, PAGES), (first.args, second.args)
    # The first pass went through the table in its first memslot: the nested MMU shadowed it
    # and mapped every data page with a 4K SPTE (slot 0 adds 4K SPTEs of L2's code, too).
    start = log.at(stages.NESTED_MEMSLOT_START).stats
    grown = replaced["before"]["pages_4k"] - start["pages_4k"]
    assert grown >= PAGES, f"L2's first pass added {grown} 4K SPTEs, fewer than its {PAGES} data pages"
    _check_writes(old_stamps, new_stamps, lambda p: 1 << 32 | p, lambda p: 2 << 32 | p, how, zap)
    # L1 wrote its table: L1's own MMU maps that page too.
    _check_zap({k: replaced["before"][k] for k in SIZES}, replaced["after"], zap, own=PAGES + 1)
