"""Guest drivers of the MMU selftests: a guest program with its test region, stepped pass by pass.

Each driver is a :class:`~kvmpy.guest.vm.GuestVm` plus a
:class:`~kvmpy.guest.stepper.SteppedGuest`: between passes the only vCPU is
parked in a GUEST_SYNC, so the VM is quiescent and its stats are stable.
Construction runs the guest to its first park; ``close()`` (or ``with``) lets it
finish and releases the VM.

    SteppedDriver     a program's GuestVm + SteppedGuest, its SPTE counts, close (the base)
    TouchGuest        guests/mmu_touch.c at CPL0 or CPL3: read/write passes over a test
                      memslot, each checked to have run natively (selftests/privilege.py)
    NestedDirtyGuest  guests/svm_l2_dirty.c: L2 writes a region L1 maps with NPT
"""
from __future__ import annotations

from typing import Callable

from kvmpy.guest import stages
from kvmpy.guest.stepper import Park, SteppedGuest
from kvmpy.guest.vm import GuestVm
from kvmpy.kvm import Kvm
from kvmpy.memory import PAGE_2M, PAGE_4K, Backing, Thp

from .privilege import NativeSteps
from .sptes import counts

TEST_SLOT = 1
TEST_GPA = 1 << 30              # 1 GiB aligned, so 1G mappings are possible


class SteppedDriver:
    """A guest program stepped pass by pass: ``g`` (the GuestVm), ``guest`` (its SteppedGuest)."""

    def __init__(self, kvm: Kvm, program: str, *, stop: dict[str, int], park_stage: int | None = None,
                 user_mode: bool = False) -> None:
        self.g = GuestVm(program, kvm=kvm, user_mode=user_mode)
        self.vm = self.g.vm
        self.guest = SteppedGuest(self.g, stop=stop, park_stage=park_stage)

    def _start(self, setup: Callable[[], None]) -> Park:
        """Run ``setup()`` (memslots, mappings, globals), then the guest to its first park."""
        try:
            setup()
            return self.guest.start()
        except BaseException:
            self.guest.close()
            raise

    def counts(self) -> dict[str, int]:
        """The VM's pages_4k/2m/1g now."""
        return counts(self.vm)

    def close(self) -> None:
        self.guest.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TouchGuest(SteppedDriver):
    """guests/mmu_touch.c at privilege level ``cpl`` with a test memslot at TEST_GPA, driven
    from the test thread.

    The test region is slot ``TEST_SLOT`` (``size`` bytes of ``backing``),
    identity-mapped in the guest with ``guest_page``-sized pages.  Slot 0 (the
    runtime) is anonymous memory with THP off, so it never contributes 2M/1G
    SPTEs.  Every pass is checked to have run natively (:class:`NativeSteps`).
    """

    def __init__(self, kvm: Kvm, backing: Backing, size: int, guest_page: int = PAGE_2M, cpl: int = 0) -> None:
        super().__init__(kvm, "mmu_touch", stop={"op": stages.MMU_TOUCH_OP_QUIT}, park_stage=stages.MMU_TOUCH_PARKED,
                         user_mode=cpl == 3)
        self.size = size

        def setup() -> None:
            self.slot = self.g.add_memory(TEST_SLOT, TEST_GPA, size, backing)
            self.g.map(TEST_GPA, TEST_GPA, size, guest_page)
            self.g.write_global("test_gva", TEST_GPA)
            self.g.write_global("test_size", size)

        self._start(setup)
        self.native = NativeSteps(self.g.vcpus[0], cpl)

    def touch(self, op: int, start: int = 0, length: int | None = None, stride: int = PAGE_4K,
              stamp: int = 0, timeout: float = 600.0) -> int:
        """One guest pass over [start, start+length) of the region; returns how many
        addresses it touched.  Returns with the guest parked again."""
        length = self.size - start if length is None else length
        self.guest.step({"op": op, "start": start, "length": length, "stride": stride, "stamp": stamp}, timeout)
        kind = "write" if op == stages.MMU_TOUCH_OP_WRITE else "read"
        self.native.check(f"{kind} pass over [{start:#x}, {start + length:#x}) of the region, stride {stride:#x}")
        return self.g.read_global("touched")

    def write(self, start: int = 0, length: int | None = None, stride: int = PAGE_4K, stamp: int = 1) -> int:
        return self.touch(stages.MMU_TOUCH_OP_WRITE, start, length, stride, stamp)

    def read(self, start: int = 0, length: int | None = None, stride: int = PAGE_4K) -> int:
        return self.touch(stages.MMU_TOUCH_OP_READ, start, length, stride)


# svm_l2_dirty.c's data region: L2 GPA DATA_L2 -> (L1's NPT, 2M pages) -> L1 GPA DATA_L1,
# which is memslot DATA_SLOT.  Different numbers, so a dirty bit or stat at the
# wrong level of translation cannot pass for the right one.
DATA_SLOT = 1
DATA_L2 = 0x4000_0000
DATA_L1 = 0xC000_0000
DATA_SIZE = 32 << 20
DATA_PAGES = DATA_SIZE // PAGE_4K
DATA_HUGE = DATA_SIZE // PAGE_2M


class NestedDirtyGuest(SteppedDriver):
    """guests/svm_l2_dirty.c with its data region in memslot DATA_SLOT (THP-backed).

    At each L2 pass boundary the guest is parked in a GUEST_SYNC(pass, pages
    written) forwarded by L1.  Slot 0 (L1's runtime) is anonymous memory with THP
    off, so it never adds 2M SPTEs, and L1 never touches the data region, so
    every SPTE of DATA_SLOT is the nested MMU's.
    """

    def __init__(self, kvm: Kvm) -> None:
        super().__init__(kvm, "svm_l2_dirty", stop={"cmd_stop": 1})

        def setup() -> None:
            self.slot = self.g.add_memory(DATA_SLOT, DATA_L1, DATA_SIZE, Thp())
            # L2 uses L1's page tables: map L2 GVA == L2 GPA for the data region.
            self.g.map(DATA_L2, DATA_L2, DATA_SIZE, PAGE_2M)
            for name, value in (("data_l2_gpa", DATA_L2), ("data_l1_gpa", DATA_L1),
                                ("data_size", DATA_SIZE), ("l1_mem_size", self.g.mem_size)):
                self.g.write_global(name, value)

        self.pass_no = self._pass(self._start(setup))[0]

    @staticmethod
    def _pass(park: Park) -> tuple[int, int]:
        """(pass number, pages written in the pass) from a park at GUEST_SYNC(pass, written)."""
        return park.stage, park.args[0] if park.args else 0

    def write(self, first: int = 0, stride: int = 1) -> list[int]:
        """One L2 pass writing pages first, first+stride, ... of the region; returns them."""
        self.pass_no, written = self._pass(self.guest.step({"cmd_first": first, "cmd_stride": stride}))
        pages = list(range(first, DATA_PAGES, stride))
        assert written == len(pages), f"L2 reports {written} pages written in pass {self.pass_no - 1}"
        return pages

    def check_data(self, pages: list[int], pass_no: int) -> None:
        """Each page's first u64 is what L2 wrote in ``pass_no``: the NPT offset mapping held."""
        view = self.slot.view
        bad = [p for p in pages
               if int.from_bytes(view[p * PAGE_4K: p * PAGE_4K + 8], "little") != (pass_no << 32 | p)]
        assert not bad, f"{len(bad)} pages lack pass {pass_no}'s stamp, first {bad[:8]}"
