"""A memslot that holds one of L1's NPT/EPT tables is replaced while the nested MMU shadows it.

Deleting a memslot must take with it every shadow page whose gfn is in it: the shadow of a
guest page table lives only as long as KVM write-protects (write-tracks) that table, and the
tracking is per memslot. guests/nested_memslot.c keeps L1's last-level NPT/EPT table for L2's
data in a memslot of its own. After L2 has written its data through it (so the nested MMU
holds an indirect shadow page of the table), the host replaces that memslot: deletes it and
adds new memory at the same GPA. L1 refills the new, zeroed table to map the data to other
L1 memory, flushes, and L2 writes again. A shadow page of the old table that survived would
still translate L2's data to the old frames: L2's second writes would land in the old data
memslot instead of the new one.

With KVM_X86_QUIRK_SLOT_ZAP_ALL (the default) KVM zaps all shadow pages at a memslot deletion
(kvm_mmu_zap_all_fast). With the quirk disabled, which SLOT_ZAP_QUIRK made possible, it zaps
only the memslot's (kvm_mmu_zap_memslot); as first released that missed the shadow pages of
tables in the slot, fixed by SLOT_ZAP_SHADOW_FIX in the same release (without it the VM's
teardown also oopsed, which the splat watch would catch). No upstream selftest replaces a
memslot under the nested MMU.

Runs once per vendor: SVM+NPT in the AMD bed (QEMU), VMX+EPT in the Intel bed (Bochs).
"""
from __future__ import annotations

import pytest

from kvmpy.abi import lib
from kvmpy.errors import require
from kvmpy.guest import stages
from kvmpy.memory import PAGE_2M, PAGE_4K, Anonymous

from .drivers import StageLog, nested_guest
from .kernel_changes import SLOT_ZAP_QUIRK, SLOT_ZAP_SHADOW_FIX, running_release

TABLE_SLOT, TABLE_L1 = 1, 0x8000_0000   # L1's last-level table for the data (one page)
OLD_SLOT, OLD_L1 = 2, 0xC000_0000       # what the data maps to first ...
NEW_SLOT, NEW_L1 = 3, 0xC020_0000       # ... and after the table's memslot was replaced
DATA_L2 = 0x4000_0000
PAGES = 64                              # nested faults are slow in the Bochs bed


def _stamps(slot, pages: int = PAGES) -> list[int]:
    return [int.from_bytes(slot.view[p * PAGE_4K: p * PAGE_4K + 8], "little") for p in range(pages)]


def _wrong(stamps: list[int], pass_no: int) -> list[int]:
    """The pages whose stamp is not (pass_no << 32 | page)."""
    return [p for p, v in enumerate(stamps) if v != (pass_no << 32 | p)]


@pytest.mark.parametrize("zap", ["all", "slot"], ids=["zap-all", "zap-slot"])
def test_replaced_table_memslot_drops_nested_shadow_pages(kvm, nested, kvmpy_stats, zap):
    """L2's writes after the table's memslot was replaced go where the new table maps them.

    zap-all: the default (KVM_X86_QUIRK_SLOT_ZAP_ALL), every kernel. zap-slot: the quirk
    disabled through KVM_CAP_DISABLE_QUIRKS2 before the vCPU exists: kvm_mmu_zap_memslot must
    zap the indirect shadow page of the table at TABLE_L1 (its gfn is in the slot), not only
    the slot's leaf SPTEs (none: L2's data is in other memslots).
    """
    def disable_slot_zap_all(vm) -> None:
        quirks = vm.check_extension(lib.KVM_CAP_DISABLE_QUIRKS2)
        require(quirks & lib.KVM_X86_QUIRK_SLOT_ZAP_ALL,
                f"KVM offers no KVM_X86_QUIRK_SLOT_ZAP_ALL to disable (KVM_CAP_DISABLE_QUIRKS2 = {quirks:#x}, "
                f"kernel {running_release()}): it came with {SLOT_ZAP_QUIRK}")
        vm.enable_cap(lib.KVM_CAP_DISABLE_QUIRKS2, lib.KVM_X86_QUIRK_SLOT_ZAP_ALL)

    replaced = {}

    def replace_table_slot(rec) -> None:
        if rec.args[0] == 1:
            replaced["before"] = rec.stats
            g.vm.delete_memory(TABLE_SLOT)
            g.add_memory(TABLE_SLOT, TABLE_L1, PAGE_4K, Anonymous())
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
    stale = [p for p in range(PAGES) if old_stamps[p] == (2 << 32 | p)]
    assert not stale, (
        f"{len(stale)} of L2's {PAGES} writes after the table's memslot was replaced landed in the OLD data "
        f"memslot (pages {stale[:8]}...): a shadow page of the deleted table survived (zap={zap}, kernel "
        f"{running_release()}; with the quirk disabled, see {SLOT_ZAP_SHADOW_FIX})")
    assert not _wrong(old_stamps, 1), f"the old data lost pass 1's stamps: pages {_wrong(old_stamps, 1)[:8]}"
    wrong = _wrong(new_stamps, 2)
    assert not wrong, f"{len(wrong)} pages of the new data lack pass 2's stamps, e.g. {wrong[:8]}"
