"""The dirty log of L1's memory while an L2 runs: L2's writes, and the writes KVM makes for L1.

A nested guest's memory is L1's memory, so KVM_GET_DIRTY_LOG of L1's memslots
must report every page that changed: pages L2 wrote through L1's NPT/EPT (the
nested MMU marks them), and pages KVM itself wrote on L1's behalf while
emulating SVM/VMX (VMCB12 at VMRUN/#VMEXIT, VMCS12 at VMCLEAR, the accessed
and dirty flags of L1's NPT/EPT entries).  Missing such a page loses it in a
live migration of L1 with its L2 running.

Each test runs once per vendor (the `nested` fixture): SVM+NPT in the AMD bed
(QEMU), VMX+EPT in the Intel bed (Bochs); elsewhere it skips saying where.
"""
from __future__ import annotations

from kvmpy.guest import stages
from kvmpy.memory import PAGE_4K, Anonymous

from .drivers import DATA_SIZE, DATA_SLOT, NestedDirtyGuest, StageLog, nested_guest

SVM_EXIT_VMMCALL = 0x81
VMX_EXIT_VMCALL = 18


def _pages_diff(got: list[int], want: list[int]) -> str:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    return (f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"extra {extra[:8]}{'...' if len(extra) > 8 else ''}")


def test_dirty_log_reports_l2_writes(kvm, nested, scale):
    """KVM_GET_DIRTY_LOG reports exactly the L1 pages L2 wrote through L1's NPT/EPT, pass after pass.

    Pins the nested MMU's write faults (FNAME(page_fault) -> make_spte ->
    mark_page_dirty_in_slot) and the write protection KVM_GET_DIRTY_LOG
    re-arms (kvm_arch_mmu_enable_log_dirty_pt_masked, on nested SPTEs through the
    rmaps).  Each pass writes a different pattern, so a page reported without
    being written in that pass (stale, or not write-protected again after
    GET_DIRTY_LOG) and a write not reported both fail.  The pages are L1 GPAs of
    the memslot; L2 wrote them at other L2 GPAs (DATA_L2 != DATA_L1).
    """
    with NestedDirtyGuest(kvm, nested, DATA_SIZE * scale) as guest:
        guest.map_huge()
        guest.vm.enable_dirty_logging(DATA_SLOT)
        assert guest.vm.get_dirty_log(DATA_SLOT).pages() == [], "dirty pages before L2 wrote under logging"
        last_pass: dict[int, int] = {}    # page -> the last pass that wrote it
        for first, stride in ((1, 3), (2, 7), (0, 1), (5, 1000)):
            pages = guest.write(first, stride)
            guest.check_data(pages, guest.pass_no - 1)
            last_pass.update(dict.fromkeys(pages, guest.pass_no - 1))
            got = guest.vm.get_dirty_log(DATA_SLOT).pages()
            assert got == pages, (f"pass writing pages {first}::{stride} ({len(pages)} pages): dirty log has "
                                  f"{len(got)}; {_pages_diff(got, pages)}")
        # Nothing written since the last harvest: nothing dirty.
        assert guest.vm.get_dirty_log(DATA_SLOT).pages() == []
        # And L2 wrote nothing but its passes' pages: every page holds the stamp of the last pass
        # that wrote it (a stray write of a later pass, unlogged, would show here).
        for pass_no in sorted(set(last_pass.values())):
            guest.check_data([p for p, n in last_pass.items() if n == pass_no], pass_no)


STATE_SLOT = 2
STATE_GPA = 0x1_0000_0000


def test_dirty_log_reports_kvm_writes_for_l1(kvm, nested):
    """KVM's own writes into L1's nested state are in L1's dirty log, and nothing else is.

    guests/nested_kvm_writes.c keeps its VMCB (+ host save area, I/O and MSR
    permission maps) or VMXON region and VMCS, its NPT/EPT tables and two data
    pages in a memslot of their own, which it writes only where the stages say;
    both that slot and slot 0 are dirty-logged, and each window between two
    harvests must report exactly:

    * SVM, VMRUN + L2's accesses + #VMEXIT: the VMCB12 page (nested_svm_vmrun()
      and nested_svm_vmexit() unmap it with dirty=true), the NPT pages whose
      accessed/dirty flags KVM's walker set for L2's first accesses
      (FNAME(update_accessed_dirty_bits) -> kvm_vcpu_mark_page_dirty: the PDPT,
      the PD and the PT of the test pages, whose entries L1 created with A clear),
      and the page L2 wrote.  A second round trip without new accesses: VMCB12
      only.  The host save area and the permission maps are never written.
    * VMX, VMRESUME + L2's accesses + VM exit: the EPT pages as for SVM when KVM
      offers EPT A/D to L1 (the PT of the leaf, PDPT and PD: A set by the walker)
      and the page L2 wrote, but not the VMCS12 page: KVM keeps vmcs12 cached and
      neither nested_vmx_run() nor nested_vmx_vmexit() writes it back.  L1's
      VMWRITEs (stepping L2 over its VMCALL) change only the cached copy.
      VMCLEAR writes it (nested_release_vmcs12() and the launch state):
      {VMCS12}.

    On SVM the READY window after L1 stepped L2 over its VMMCALL is {VMCB12}
    too: that one is L1's own write.  Slot 0 is dirty-logged and harvested too,
    as a VMM migrating L1 would, but its pages are not checked: L1 and L2 write
    it themselves all the time (their stacks, L1's context, the reports), so a
    write KVM made there could not be told from theirs.
    """
    log_slots = (0, STATE_SLOT)
    windows: list[tuple[int, dict[int, list[int]]]] = []

    def harvest(rec) -> None:
        windows.append((rec.stage, {slot: g.vm.get_dirty_log(slot).pages() for slot in log_slots}))

    def setup(rec) -> None:
        for slot in log_slots:
            g.vm.enable_dirty_logging(slot)
        harvest(rec)

    with nested_guest(kvm, nested, "nested_kvm_writes") as g:
        g.add_memory(STATE_SLOT, STATE_GPA, stages.KVM_WRITES_PAGES * PAGE_4K, Anonymous())
        g.map(STATE_GPA, STATE_GPA, stages.KVM_WRITES_PAGES * PAGE_4K)
        g.map(stages.KVM_WRITES_L2_GPA, stages.KVM_WRITES_L2_GPA, 2 * PAGE_4K)
        g.write_global("state_gpa", STATE_GPA)
        g.write_global("l1_mem_size", g.mem_size)
        log = StageLog(g.vm, {stages.KVM_WRITES_SETUP: setup, stages.KVM_WRITES_READY: harvest,
                              stages.KVM_WRITES_EXITED: harvest, stages.KVM_WRITES_CLEARED: harvest})
        g.run(timeout=600, on_sync=log)

    vmcb, pdpt, pd, pt, ad = log.at(stages.KVM_WRITES_SETUP).args
    page = lambda gpa: (gpa - STATE_GPA) // PAGE_4K    # noqa: E731 - a page number of the state slot
    tables = [page(pdpt), page(pd), page(pt)] if ad else []
    written = [stages.KVM_WRITES_WRITE]
    svm = nested == "svm"
    exit_code = SVM_EXIT_VMMCALL if svm else VMX_EXIT_VMCALL
    vmcb12 = [page(vmcb)] if svm else []
    want = [
        (stages.KVM_WRITES_READY, []),                              # since SETUP's harvest
        (stages.KVM_WRITES_EXITED, sorted(vmcb12 + tables + written)),
        (stages.KVM_WRITES_READY, vmcb12),                          # L1 stepped L2 over the call
        (stages.KVM_WRITES_EXITED, vmcb12),
    ]
    if not svm:
        want += [(stages.KVM_WRITES_READY, []), (stages.KVM_WRITES_CLEARED, [page(vmcb)])]
    got = [(stage, pages[STATE_SLOT]) for stage, pages in windows[1:]]
    assert [s.args for s in log.stages if s.stage == stages.KVM_WRITES_EXITED] == [(exit_code,)] * 2
    names = {page(vmcb): "VMCB12" if svm else "VMCS12", page(pdpt): "PDPT", page(pd): "PD", page(pt): "PT",
             stages.KVM_WRITES_WRITE: "data written by L2", stages.KVM_WRITES_READ: "data read by L2"}
    named = lambda pages: [names.get(p, f"page {p}") for p in pages]    # noqa: E731
    assert got == want, ("dirty pages of L1's nested-state slot per window:\n"
                         + "\n".join(f"  stage {gs}: got {named(gp)}, want {named(wp)}"
                                     for (gs, gp), (_, wp) in zip(got, want))
                         + f"\n  (NPT/EPT accessed/dirty flags in use: {bool(ad)})")
