"""Unsync shadow pages: a guest writing its own page tables under shadow paging.

With shadow paging (kvm_amd.npt=0 / kvm_intel.ept=0) KVM shadows every guest
page table it walks and write-protects it.  When the guest writes to a
last-level page table, KVM does not emulate the write: it marks the shadow
page *unsync* (the ``mmu_unsync`` VM stat counts them), lets the guest write
freely, and re-reads the guest PTEs when the guest flushes its TLB (INVLPG
syncs one entry, a CR3 load syncs every unsync page reachable from the root).

guests/unsync.c edits N of the test region's page tables; the test checks
that exactly N shadow pages go unsync, that the guest sees its new mappings
after INVLPG, and that a CR3 reload syncs them all again.  Under TDP KVM
never shadows guest page tables, so the test needs a shadow-paging host: in
the bed, ``kvmpy selftest --bed --param kvm_amd.npt=0`` (matrix row shadow); kvm_pvm
always shadows them (at CPL3: its ring 0 is emulated).  The steps whose guest
accesses KVM must see natively are checked to have run so (selftests/privilege.py):
emulated reads are a skip on kvm_pvm (its heuristic's choice), emulated PTE writes a failure
everywhere (KVM write-protecting and emulating them instead of unsyncing is the defect this
test is about; mmu_pte_write and mmu_flooded must not move either).
"""
from __future__ import annotations

from kvmpy.guest import stages
from kvmpy.guest.vm import GuestVm
from kvmpy.memory import PAGE_2M, PAGE_4K

from .drivers import TEST_GPA, TEST_SLOT
from .privilege import NativeSteps

NR_TABLES = 6      # page tables (2M of 4K mappings each) the guest walks
NR_UNSYNC = 4      # of which it edits the first NR_UNSYNC
SHADOW_STATS = ("mmu_unsync", "mmu_shadow_zapped", "mmu_pte_write", "mmu_flooded")
# The steps made of guest accesses only (no kernel call): KVM must not emulate them.
NATIVE = {stages.UNSYNC_SHADOWED: "reading pages of every table", stages.UNSYNC_EDITED: "writing PTEs",
          stages.UNSYNC_SWAPPED_BACK: "writing the PTEs back"}
# Of those, the PTE writes: KVM emulating them (write-protecting the shadowed table instead of
# unsyncing it) is the defect this test is about -- a failure at any level, never a skip.
PTE_WRITES = {stages.UNSYNC_EDITED, stages.UNSYNC_SWAPPED_BACK}
EMULATED_PTE_WRITES = "KVM emulated the guest's writes to its shadowed page tables instead of unsyncing them"


def test_guest_page_table_writes_unsync_shadow_pages(kvm, cpl, shadow_paging, kvmpy_stats):
    """Writes to N shadowed last-level guest page tables make exactly N shadow pages unsync;
    INVLPG exposes the new translations, a CR3 reload syncs every one of them."""
    seen: dict[int, dict[str, int]] = {}

    with GuestVm("unsync", kvm=kvm, user_mode=cpl == 3) as g:
        size = NR_TABLES * PAGE_2M
        g.add_memory(TEST_SLOT, TEST_GPA, size)
        g.map(TEST_GPA, TEST_GPA, size, PAGE_4K)   # one guest PT per 2M
        for t in range(NR_TABLES):
            for page in (0, 1):
                gpa = TEST_GPA + t * PAGE_2M + page * PAGE_4K
                g.vm.write_u64(gpa, gpa)
        g.write_global("test_gva", TEST_GPA)
        g.write_global("test_gpa", TEST_GPA)
        g.write_global("nr_tables", NR_TABLES)
        g.write_global("nr_unsync", NR_UNSYNC)

        native = NativeSteps(g.vcpus[0], cpl)

        def on_sync(vcpu_id: int, stage: int, args: tuple) -> None:
            # The only vCPU is parked here: the stats cannot move under us.
            if stage in NATIVE:
                native.check(f"{NATIVE[stage]} (stage {stage})", EMULATED_PTE_WRITES if stage in PTE_WRITES else None)
            else:
                native.mark()
            snap = g.vm.stats.snapshot()
            seen[stage] = {name: int(snap[name]) for name in SHADOW_STATS}

        r = g.run(timeout=300, on_sync=on_sync)
        after = int(g.vm.stats.snapshot()["mmu_unsync"])   # the guest finished, the VM still exists

    ready, shadowed, edited, invlpg, cr3, back, restored = (
        stages.UNSYNC_READY, stages.UNSYNC_SHADOWED, stages.UNSYNC_EDITED, stages.UNSYNC_INVLPG, stages.UNSYNC_CR3,
        stages.UNSYNC_SWAPPED_BACK, stages.UNSYNC_RESTORED)
    assert [s for _, s, _ in r.syncs] == [ready, shadowed, edited, invlpg, cr3, back, restored]
    base = seen[shadowed]["mmu_unsync"]
    assert base == 0, f"{base} shadow pages unsync before the guest wrote a PTE (stats per stage: {seen})"
    went_unsync = seen[edited]["mmu_unsync"] - base
    assert went_unsync == NR_UNSYNC, (
        f"{shadow_paging.name}: the guest wrote PTEs in {NR_UNSYNC} of its {NR_TABLES} shadowed page "
        f"tables, mmu_unsync rose by {went_unsync} (stats per stage: {seen})")
    # INVLPG syncs single SPTEs of an unsync page, the page itself stays unsync
    # (the guest already checked it sees the swapped frames).
    assert seen[invlpg]["mmu_unsync"] - base == NR_UNSYNC, f"after INVLPG: {seen}"
    # A CR3 load syncs every unsync page reachable from the root (and write-protects its PT again).
    assert seen[cr3]["mmu_unsync"] == base, f"after the CR3 reload: {seen}"
    # Edited again: the same pages go unsync again; flushed again: back in sync.
    assert seen[back]["mmu_unsync"] - base == NR_UNSYNC, f"after swapping back: {seen}"
    assert seen[restored]["mmu_unsync"] == base, f"after swapping back and reloading CR3: {seen}"
    assert after == 0, f"{after} shadow pages still unsync after the guest finished (stats per stage: {seen})"
    # Unsync, not emulate: the PTE writes never went through KVM's write tracking (each emulated
    # write to a shadowed table counts in mmu_pte_write, repeated ones in mmu_flooded). Only the
    # native steps: kernel calls (INVLPG, CR3) may be emulated, and with them their own writes.
    for stage, before in ((edited, shadowed), (back, cr3)):
        for name in ("mmu_pte_write", "mmu_flooded"):
            assert seen[stage][name] == seen[before][name], (
                f"the guest's PTE writes (stage {stage}) were emulated: {name} {seen[before][name]} -> "
                f"{seen[stage][name]} (stats per stage: {seen})")
    # Unsync, not zap: no shadow page was dropped on the way.
    assert seen[restored]["mmu_shadow_zapped"] == seen[shadowed]["mmu_shadow_zapped"], f"shadow pages were zapped: {seen}"
    print(f"shadow stats per stage: {seen}")
    kvmpy_stats(mmu_unsync=went_unsync)
