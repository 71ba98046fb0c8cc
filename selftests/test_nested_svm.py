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

from kvmpy.errors import RequirementError
from kvmpy.guest.runner import GuestVm
from kvmpy.guest.stepper import SteppedGuest
from kvmpy.hostinfo import module_params, require_nested
from kvmpy.memory import Thp
from kvmpy.x86 import cpu
from kvmpy.x86.paging import PAGE_2M

from .mmu_support import PAGE, PTES, param_on, counts, delta, eager_page_split, record, sized

# Exit codes and NPF EXITINFO1 bits (AMD APM vol. 2, appendix C and 15.25.6).
SVM_EXIT_HLT = 0x78
SVM_EXIT_VMMCALL = 0x81
SVM_EXIT_NPF = 0x400
NPF_WRITE, NPF_USER, NPF_FINAL_GPA = 1 << 1, 1 << 2, 1 << 32

# svm_l2_dirty.c's data region: L2 GPA DATA_L2 -> (L1's NPT, 2M pages) -> L1 GPA DATA_L1,
# which is memslot DATA_SLOT.  Different numbers, so a dirty bit or stat at the
# wrong level of translation cannot pass for the right one.
DATA_SLOT = 1
DATA_L2 = 0x4000_0000
DATA_L1 = 0xC000_0000
DATA_SIZE = 32 << 20
DATA_PAGES = DATA_SIZE // PAGE
DATA_HUGE = DATA_SIZE // PAGE_2M


@pytest.fixture
def nested_svm(kvm):
    """/dev/kvm whose guests can use SVM with NPT, or a skip naming what is missing."""
    try:
        require_nested("amd")
    except RequirementError as e:
        pytest.skip(str(e))
    # KVM offers NPT to L1 only when it uses NPT itself (kvm_amd npt=1).
    leaf = cpu.cpuid_lookup(kvm.supported_cpuid(), 0x8000000A)
    if leaf is None or not leaf.edx & 1:
        npt = (module_params("kvm_amd") or {}).get("npt")
        pytest.skip(f"KVM_GET_SUPPORTED_CPUID lacks NPT (leaf 0x8000000A EDX[0]), so L1 cannot use nested "
                    f"paging; kvm_amd npt={npt}: load kvm_amd with npt=1")
    return kvm


def thp_backed_bytes(addr: int, size: int) -> int | None:
    """AnonHugePages of the host mapping at ``addr`` (from /proc/self/smaps), None if not found."""
    found = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    start, end = (int(x, 16) for x in head.split("-"))
                    found = start <= addr < end
                elif found and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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
    hole = 0x3E00000 + 0x123000 + 8
    with GuestVm("svm_l2_smoke", kvm=nested_svm) as g:
        r = g.run(timeout=120)
    assert [(s[1], s[2]) for s in r.syncs] == [
        (1, (SVM_EXIT_VMMCALL, 0x1234, 0xABCDEF01, 0x42)),   # rax, rdi, rsi (L2's arg) as L1 saw them
        (100, (0x42,)),                                      # from L2 itself
        # EXITINFO1 of the NPF: a write (W), NPT walks are user accesses (U), not
        # present (P=0), faulted on the final GPA rather than an L2 page-table read.
        (2, (SVM_EXIT_NPF, NPF_FINAL_GPA | NPF_USER | NPF_WRITE, hole)),
        (3, (SVM_EXIT_HLT, 0x5EED5EED5EED5EED)),            # the retried write is in L1's page
        (4, (SVM_EXIT_VMMCALL, 4)),                          # 4 VMRUNs in all
    ]


# -- the dirty-logging guest, driven pass by pass -------------------------------------------

class NestedDirtyGuest:
    """guests/svm_l2_dirty.c with its data region in memslot DATA_SLOT (THP-backed).

    The guest runs on a thread; at each L2 pass boundary it is parked in a
    GUEST_SYNC forwarded by L1, so the VM is quiescent while the test reads
    stats and dirty logs.  Slot 0 (L1's runtime) is anonymous memory with THP
    off, so it never adds 2M SPTEs, and L1 never touches the data region, so
    every SPTE of DATA_SLOT is the nested MMU's.
    """

    def __init__(self, kvm, timeout: float = 600.0) -> None:
        self.g = GuestVm("svm_l2_dirty", kvm=kvm)
        self.runner = SteppedGuest(self.g, "svm_l2_dirty", {"cmd_stop": 1}, timeout)
        try:
            self.slot = self.g.add_memory(DATA_SLOT, DATA_L1, DATA_SIZE, Thp())
            # L2 uses L1's page tables: map L2 GVA == L2 GPA for the data region.
            self.g.map(DATA_L2, DATA_L2, DATA_SIZE, PAGE_2M)
            for name, value in (("data_l2_gpa", DATA_L2), ("data_l1_gpa", DATA_L1),
                                ("data_size", DATA_SIZE), ("l1_mem_size", self.g.mem_size)):
                self.g.write_global(name, value)
            self.vm = self.g.vm
            self.pass_no = self._pass(self.runner.start())[0]
        except BaseException:
            self.runner.close()
            raise

    @staticmethod
    def _pass(parked: tuple[int, tuple]) -> tuple[int, int]:
        """(pass number, pages written in the pass) from a park's (stage, args)."""
        stage, args = parked
        return stage, args[0] if args else 0

    def write(self, first: int = 0, stride: int = 1) -> list[int]:
        """One L2 pass writing pages first, first+stride, ... of the region; returns them."""
        self.pass_no, written = self._pass(self.runner.step({"cmd_first": first, "cmd_stride": stride}))
        pages = list(range(first, DATA_PAGES, stride))
        assert written == len(pages), f"L2 reports {written} pages written in pass {self.pass_no - 1}"
        return pages

    def check_data(self, pages: list[int], pass_no: int) -> None:
        """Each page's first u64 is what L2 wrote in ``pass_no``: the NPT offset mapping held."""
        view = self.slot.view
        bad = [p for p in pages
               if int.from_bytes(view[p * PAGE: p * PAGE + 8], "little") != (pass_no << 32 | p)]
        assert not bad, f"{len(bad)} pages lack pass {pass_no}'s stamp, first {bad[:8]}"

    def counts(self) -> dict[str, int]:
        return counts(self.vm)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "NestedDirtyGuest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _huge_mapped(guest: NestedDirtyGuest, before: dict[str, int]) -> dict[str, int]:
    """Write the whole region once (no dirty logging): the nested MMU maps it with 2M SPTEs."""
    guest.write()
    after = guest.counts()
    got = delta(after, before)
    if got["pages_2m"] < DATA_HUGE:
        thp = thp_backed_bytes(guest.slot.hva, DATA_SIZE)
        if thp is not None and thp < DATA_SIZE:
            pytest.skip(f"host THP backs only {thp >> 20} of the data slot's {DATA_SIZE >> 20} MiB "
                        "(see /sys/kernel/mm/transparent_hugepage/{enabled,defrag}); the nested MMU "
                        "maps 2M only where the host does")
    # One 2M SPTE per 2M of the slot (L1's NPT maps it with 2M pages, the host
    # with THPs); slot 0 adds nothing, L2 ran the same code before this pass.
    assert got == sized(pages_2m=DATA_HUGE), f"after L2 wrote the whole region: {got}"
    return after


# -- (2) eager vs lazy splitting of the nested MMU ---------------------------------------------

@pytest.mark.parametrize("eager", [True, False], ids=["eager", "lazy"])
def test_nested_mmu_split_on_dirty_logging(nested_svm, request, eager):
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
            assert at_enable == sized(pages_4k=DATA_HUGE * PTES, pages_2m=-DATA_HUGE), \
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
        assert final == sized(pages_4k=DATA_HUGE * PTES, pages_2m=-DATA_HUGE), \
            f"after L2 wrote every page under dirty logging: {final}"
        guest.check_data(pages, guest.pass_no - 1)

    if splits_eagerly:
        record(request, when="dirty logging enabled", pages_2m=-DATA_HUGE, pages_4k=DATA_HUGE * PTES)
    else:
        # Nothing at enable; this much once L2 wrote every third page.
        record(request, when="L2 wrote every 3rd page", pages_2m=-DATA_HUGE, pages_4k=sparse_pages)


# -- (3) the dirty bitmap sees L2's writes --------------------------------------------------------

def test_dirty_log_reports_l2_writes(nested_svm, request):
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
