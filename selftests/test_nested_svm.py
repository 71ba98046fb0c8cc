"""Nested SVM: an L1 guest runs an L2 guest with NPT, and KVM's nested MMU under dirty logging.

L1 (guests/svm_l2_*.c, built on guests/lib/svm.c) enables SVM, builds NPT
tables and a VMCB, and VMRUNs a 64-bit L2.  KVM (L0) backs L2 with the
*nested MMU*: shadow pages that combine L1's NPT with L0's own mapping of L1
memory.  These SPTEs are counted in the same pages_4k/2m/1g VM stats as the
TDP MMU's, and with the TDP MMU enabled, enabling dirty logging on a memslot
eagerly splits the nested MMU's huge SPTEs of that slot too
(kvm_mmu_slot_try_split_huge_pages -> kvm_shadow_mmu_try_split_huge_pages),
unless kvm.eager_page_split=N.

Needs a host whose KVM offers SVM to its guests (kvm_amd nested=1, npt=1);
elsewhere every test skips saying so.  `kvmpy bed run --mem 4G -- ...` runs
them on a 6.12 kernel under QEMU.
"""
from __future__ import annotations

import pytest

from kvmpy.errors import require
from kvmpy.guest import stages
from kvmpy.guest.vm import GuestVm
from kvmpy.hostinfo import module_params, param_on
from kvmpy.memory import thp_backed_chunks
from kvmpy.x86.paging import ENTRIES_PER_TABLE

from .drivers import DATA_HUGE, DATA_PAGES, DATA_SIZE, DATA_SLOT, NestedDirtyGuest
from .host_state import eager_page_split
from .sptes import delta, sized

# Exit codes and NPF EXITINFO1 bits (AMD APM vol. 2, appendix C and 15.25.6).
SVM_EXIT_HLT = 0x78
SVM_EXIT_VMMCALL = 0x81
SVM_EXIT_NPF = 0x400
NPF_WRITE, NPF_USER, NPF_FINAL_GPA = 1 << 1, 1 << 2, 1 << 32


# -- (1) smoke ---------------------------------------------------------------------------

def test_l2_vmmcall_npf_hlt(nested_svm):
    """VMRUN with NPT works and every kind of #VMEXIT L1 expects comes back to it.

    svm_l2_smoke.c: L2 VMMCALLs (exit 0x81, arguments in L2's registers, L1's
    answer in RAX), GUEST_SYNCs straight to the host (L1 does not intercept
    I/O), writes into an NPT hole (NPF 0x400 at exactly that L2 GPA; L1 maps
    the page to another L1 page and L2's write retries and lands there), HLTs
    (0x78), and finishes with a VMMCALL.  L1 checks each exit itself and
    reports it with GUEST_SYNC(stage, exit code, ...).
    """
    hole = stages.NESTED_SMOKE_HOLE_GPA + 8
    with GuestVm("svm_l2_smoke", kvm=nested_svm) as g:
        r = g.run(timeout=120)
    assert [(s[1], s[2]) for s in r.syncs] == [
        # rax, rdi, rsi (L2's arg) as L1 saw them
        (stages.NESTED_SMOKE_CALL, (SVM_EXIT_VMMCALL, stages.NESTED_SMOKE_CALL_MAGIC,
                                    stages.NESTED_SMOKE_ARG_MAGIC, stages.NESTED_SMOKE_L2_ARG)),
        (stages.NESTED_SMOKE_FROM_L2, (stages.NESTED_SMOKE_L2_ARG,)),
        # EXITINFO1 of the NPF: a write (W), NPT walks are user accesses (U), not
        # present (P=0), faulted on the final GPA rather than an L2 page-table read.
        (stages.NESTED_SMOKE_FAULT, (SVM_EXIT_NPF, NPF_FINAL_GPA | NPF_USER | NPF_WRITE, hole)),
        # The retried write is in L1's page.
        (stages.NESTED_SMOKE_HLT, (SVM_EXIT_HLT, stages.NESTED_SMOKE_WRITE_MAGIC)),
        (stages.NESTED_SMOKE_DONE, (SVM_EXIT_VMMCALL, 4)),   # 4 VMRUNs in all
    ]


def _huge_mapped(guest: NestedDirtyGuest, before: dict[str, int]) -> dict[str, int]:
    """Write the whole region once (no dirty logging): the nested MMU maps it with 2M SPTEs."""
    guest.write()
    after = guest.counts()
    got = delta(after, before)
    if got["pages_2m"] < DATA_HUGE:
        thp = thp_backed_chunks(guest.slot.hva, DATA_SIZE)
        require(thp is None or all(thp),
                f"host THP backs only {2 * sum(thp or [])} of the data slot's {DATA_SIZE >> 20} MiB "
                "(see /sys/kernel/mm/transparent_hugepage/{enabled,defrag}); the nested MMU "
                "maps 2M only where the host does")
    # One 2M SPTE per 2M of the slot (L1's NPT maps it with 2M pages, the host
    # with THPs); slot 0 adds nothing, L2 ran the same code before this pass.
    assert got == sized(pages_2m=DATA_HUGE), f"after L2 wrote the whole region: {got}"
    return after


# -- (2) eager vs lazy splitting of the nested MMU ---------------------------------------------

@pytest.mark.parametrize("eager", [True, False], ids=["eager", "lazy"])
def test_nested_mmu_split_on_dirty_logging(nested_svm, kvmpy_stats, eager):
    """Enabling dirty logging splits the nested MMU's 2M SPTEs: all at once (eager) or on L2's writes.

    Eager splitting needs the TDP MMU too: kvm_mmu_slot_try_split_huge_pages()
    returns early without it, and then even eager_page_split=Y splits lazily.
    """
    tdp_mmu = param_on((module_params("kvm") or {}).get("tdp_mmu"))
    splits_eagerly = eager and tdp_mmu
    with eager_page_split(eager), NestedDirtyGuest(nested_svm) as guest:
        guest.write(first=DATA_PAGES)                # an empty pass: L2's loop code is now mapped
        base = guest.counts()
        huge = _huge_mapped(guest, base)

        guest.vm.enable_dirty_logging(DATA_SLOT)
        at_enable = delta(guest.counts(), huge)
        if splits_eagerly:
            # Each 2M SPTE is replaced by a shadow page of 512 4K SPTEs; the guest is
            # parked, so the whole change is the split.
            assert at_enable == sized(pages_4k=DATA_HUGE * ENTRIES_PER_TABLE, pages_2m=-DATA_HUGE), \
                f"enabling dirty logging (eager_page_split=Y, tdp_mmu=Y): {at_enable}"
        else:
            # Only write-protected: the 2M SPTEs stay until L2 writes through them.
            assert at_enable == sized(), \
                f"enabling dirty logging (eager_page_split={'Y' if eager else 'N'}, " \
                f"tdp_mmu={'Y' if tdp_mmu else 'N'}): {at_enable}"
        assert guest.vm.get_dirty_log(DATA_SLOT).count() == 0, "pages dirty before L2 wrote any"

        # Every third page.  Lazily, the first write fault in each 2M region drops the
        # write-protected 2M SPTE (dirty logging forbids huge mappings) and each write
        # fault installs one 4K SPTE; no prefetching happens into a dirty-logged slot.
        pages = guest.write(first=1, stride=3)
        sparse_pages = len(pages)
        sparse = delta(guest.counts(), huge)
        if splits_eagerly:
            # Already split: the writes only make existing 4K SPTEs writable again.
            assert sparse == at_enable, f"L2 writes after the eager split changed SPTE counts: {sparse}"
        else:
            assert sparse == sized(pages_4k=len(pages), pages_2m=-DATA_HUGE), \
                f"lazy split after L2 wrote {len(pages)} pages: {sparse}"

        # Every page: either way the slot ends up mapped by exactly 512 4K SPTEs per 2M.
        pages = guest.write()
        final = delta(guest.counts(), huge)
        assert final == sized(pages_4k=DATA_HUGE * ENTRIES_PER_TABLE, pages_2m=-DATA_HUGE), \
            f"after L2 wrote every page under dirty logging: {final}"
        guest.check_data(pages, guest.pass_no - 1)

    if splits_eagerly:
        kvmpy_stats(when="dirty logging enabled", pages_2m=-DATA_HUGE, pages_4k=DATA_HUGE * ENTRIES_PER_TABLE)
    else:
        # Nothing at enable; this much once L2 wrote every third page.
        kvmpy_stats(when="L2 wrote every 3rd page", pages_2m=-DATA_HUGE, pages_4k=sparse_pages)


# -- (3) the dirty bitmap sees L2's writes --------------------------------------------------------

def test_dirty_log_reports_l2_writes(nested_svm):
    """KVM_GET_DIRTY_LOG reports exactly the L1 pages L2 wrote through L1's NPT, pass after pass.

    Each pass writes a different pattern, so a page reported without being
    written in that pass (stale, or KVM not write-protecting it again after
    GET_DIRTY_LOG) and a write not reported both fail.  The pages are L1 GPAs
    of the memslot; L2 wrote them at other L2 GPAs (DATA_L2 != DATA_L1).
    """
    with NestedDirtyGuest(nested_svm) as guest:
        _huge_mapped(guest, guest.counts())
        guest.vm.enable_dirty_logging(DATA_SLOT)
        assert guest.vm.get_dirty_log(DATA_SLOT).pages() == [], "dirty pages before L2 wrote under logging"
        seen = []
        for first, stride in ((1, 3), (2, 7), (0, 1), (5, 1000)):
            pages = guest.write(first, stride)
            guest.check_data(pages, guest.pass_no - 1)
            got = guest.vm.get_dirty_log(DATA_SLOT).pages()
            missing, extra = sorted(set(pages) - set(got)), sorted(set(got) - set(pages))
            assert not missing and not extra, (
                f"pass writing pages {first}::{stride} ({len(pages)} pages): dirty log has {len(got)}; "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"extra {extra[:8]}{'...' if len(extra) > 8 else ''}")
            seen.append(len(got))
        # Nothing written since the last harvest: nothing dirty.
        assert guest.vm.get_dirty_log(DATA_SLOT).pages() == []
    assert seen == [len(range(1, DATA_PAGES, 3)), len(range(2, DATA_PAGES, 7)), DATA_PAGES,
                    len(range(5, DATA_PAGES, 1000))]
