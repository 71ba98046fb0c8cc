"""Guest drivers of the MMU selftests: a guest program with its test region, stepped pass by pass.

Each driver is a :class:`~kvmpy.guest.vm.GuestVm` plus a
:class:`~kvmpy.guest.stepper.SteppedGuest`: between passes the only vCPU is
parked in a GUEST_SYNC, so the VM is quiescent and its stats are stable.
Construction runs the guest to its first park; ``close()`` (or ``with``) lets it
finish and releases the VM.

    SteppedDriver     a program's GuestVm + SteppedGuest, its SPTE counts, close (the base)
    TouchGuest        guests/mmu_touch.c at CPL0 or CPL3: read/write passes over a test
                      memslot, each checked to have run natively (selftests/privilege.py)
    NestedDirtyGuest  guests/nested_dirty.c: L2 writes (or executes) a region L1 maps with
                      NPT/EPT 2M pages

and, for nested programs (guests/lib/nested.h) run in one go, :func:`nested_guest` and
:class:`StageLog` (what the guest reported at each stage, with the VM's stats then).
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

from kvmpy.errors import require
from kvmpy.guest import stages
from kvmpy.guest.stepper import Park, SteppedGuest
from kvmpy.guest.vm import GuestVm
from kvmpy.kvm import Kvm
from kvmpy.memory import PAGE_2M, PAGE_4K, Backing, Thp, thp_backed_chunks
from kvmpy.vm import Vm

from .privilege import NativeSteps
from .sptes import counts, delta, sized

TEST_SLOT = 1
RET = 0xC3                      # the x86 near return, what the drivers' execute() passes call
EXEC_OFFSET = 2048              # where in each page the execute() passes put it (clear of the stamps)
TEST_GPA = 1 << 30              # 1 GiB aligned, so 1G mappings are possible


def plant_rets(g: GuestVm, view: memoryview, offsets: Iterable[int]) -> None:
    """For an execute() pass: a RET EXEC_OFFSET bytes past each of ``offsets`` in ``view`` (the
    test memslot), and the guest told where (its global exec_offset)."""
    g.write_global("exec_offset", EXEC_OFFSET)
    for off in offsets:
        view[off + EXEC_OFFSET] = RET


class SteppedDriver:
    """A guest program stepped pass by pass: ``g`` (the GuestVm), ``guest`` (its SteppedGuest)."""

    def __init__(self, kvm: Kvm, program: str, *, stop: dict[str, int], park_stage: int | None = None,
                 user_mode: bool = False, before_vcpus: Callable[[Vm], None] | None = None) -> None:
        self.g = GuestVm(program, kvm=kvm, user_mode=user_mode, before_vcpus=before_vcpus)
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
    identity-mapped in the guest with ``guest_page``-sized pages (``map_region=False``: by the
    caller, before the first pass, e.g. through a page table it placed).  Slot 0 (the
    runtime) is anonymous memory with THP off, so it never contributes 2M/1G
    SPTEs.  Every pass is checked to have run natively (:class:`NativeSteps`).
    """

    def __init__(self, kvm: Kvm, backing: Backing, size: int, guest_page: int = PAGE_2M, cpl: int = 0, *,
                 map_region: bool = True, before_vcpus: Callable[[Vm], None] | None = None) -> None:
        super().__init__(kvm, "mmu_touch", stop={"op": stages.MMU_TOUCH_OP_QUIT}, park_stage=stages.MMU_TOUCH_PARKED,
                         user_mode=cpl == 3, before_vcpus=before_vcpus)
        self.size = size

        def setup() -> None:
            self.slot = self.g.add_memory(TEST_SLOT, TEST_GPA, size, backing)
            if map_region:
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
        kind = {stages.MMU_TOUCH_OP_WRITE: "write", stages.MMU_TOUCH_OP_EXEC: "exec"}.get(op, "read")
        self.native.check(f"{kind} pass over [{start:#x}, {start + length:#x}) of the region, stride {stride:#x}")
        return self.g.read_global("touched")

    def write(self, start: int = 0, length: int | None = None, stride: int = PAGE_4K, stamp: int = 1) -> int:
        return self.touch(stages.MMU_TOUCH_OP_WRITE, start, length, stride, stamp)

    def read(self, start: int = 0, length: int | None = None, stride: int = PAGE_4K) -> int:
        return self.touch(stages.MMU_TOUCH_OP_READ, start, length, stride)

    def execute(self, start: int = 0, length: int | None = None, stride: int = PAGE_4K) -> int:
        """An instruction fetch at each address: a RET, written here EXEC_OFFSET bytes past it."""
        length = self.size - start if length is None else length
        plant_rets(self.g, self.slot.view, range(start, start + length, stride))
        return self.touch(stages.MMU_TOUCH_OP_EXEC, start, length, stride)

    def reload_cr3(self, timeout: float = 600.0) -> None:
        """The guest reloads CR3 (a kernel call at CPL3), as after a change of its page tables."""
        self.guest.step({"op": stages.MMU_TOUCH_OP_RELOAD_CR3}, timeout)
        self.native.mark()


# nested.h's vendors: the value of the program's global nested_vendor.
NESTED_VENDOR_IDS = {"svm": stages.NESTED_VENDOR_SVM, "vmx": stages.NESTED_VENDOR_VMX}


def nested_guest(kvm: Kvm, vendor: str, program: str, **kwargs) -> GuestVm:
    """A GuestVm of nested.h program ``program`` whose L1 runs its L2 under ``vendor`` ('svm'/'vmx')."""
    g = GuestVm(program, kvm=kvm, **kwargs)
    g.write_global("nested_vendor", NESTED_VENDOR_IDS[vendor])
    return g


class Stage(NamedTuple):
    """One GUEST_SYNC: its stage, values, and the VM's stats while the vCPU stood there."""

    stage: int
    args: tuple
    stats: dict


class StageLog:
    """An ``on_sync`` hook for GuestVm.run: records every GUEST_SYNC with the VM's stats at that
    moment, after running ``actions[stage](stage_record)`` if there is one (the vCPU is stopped
    in the sync: e.g. enable dirty logging)."""

    def __init__(self, vm: Vm, actions: dict[int, Callable[[Stage], None]] | None = None) -> None:
        self.vm = vm
        self.actions = actions or {}
        self.stages: list[Stage] = []

    def __call__(self, vcpu: int, stage: int, args: tuple) -> None:
        rec = Stage(stage, tuple(args), {k: int(v) for k, v in self.vm.stats.snapshot().items()
                                         if isinstance(v, int)})
        self.stages.append(rec)
        action = self.actions.get(stage)
        if action is not None:
            action(rec)

    def at(self, stage: int, nth: int = 0) -> Stage:
        """The ``nth`` record of ``stage``; AssertionError naming what was seen if there is none."""
        found = [s for s in self.stages if s.stage == stage]
        assert len(found) > nth, f"no GUEST_SYNC #{nth} of stage {stage}; seen {[s.stage for s in self.stages]}"
        return found[nth]


# nested_dirty.c's data region: L2 GPA DATA_L2 -> (L1's NPT/EPT, 2M pages) -> L1 GPA DATA_L1,
# which is memslot DATA_SLOT.  Different numbers, so a dirty bit or stat at the
# wrong level of translation cannot pass for the right one.
DATA_SLOT = 1
DATA_L2 = 0x4000_0000
DATA_L1 = 0xC000_0000
# Two 2M pages: every L2 write the tests make is a nested fault, which costs tens of
# milliseconds in the Bochs bed; --kvmpy-scale N multiplies it on real hardware.
DATA_SIZE = 4 << 20


class NestedDirtyGuest(SteppedDriver):
    """guests/nested_dirty.c under ``vendor`` ('svm'/'vmx') with its data region in memslot
    DATA_SLOT: ``size`` bytes of ``backing`` (default THP).

    At each L2 pass boundary the guest is parked in a GUEST_SYNC(pass, pages
    written) forwarded by L1.  Slot 0 (L1's runtime) is anonymous memory with THP
    off, so it never adds 2M SPTEs, and L1 never touches the data region, so
    every SPTE of DATA_SLOT is the nested MMU's.
    """

    def __init__(self, kvm: Kvm, vendor: str, size: int = DATA_SIZE, backing: Backing | None = None) -> None:
        super().__init__(kvm, "nested_dirty", stop={"cmd_stop": 1})
        self.size = size
        self.npages = size // PAGE_4K

        def setup() -> None:
            self.slot = self.g.add_memory(DATA_SLOT, DATA_L1, size, backing or Thp())
            # L2 uses L1's page tables: map L2 GVA == L2 GPA for the data region.
            self.g.map(DATA_L2, DATA_L2, size, PAGE_2M)
            for name, value in (("nested_vendor", NESTED_VENDOR_IDS[vendor]), ("data_l2_gpa", DATA_L2),
                                ("data_l1_gpa", DATA_L1), ("data_size", size),
                                ("l1_mem_size", self.g.mem_size)):
                self.g.write_global(name, value)

        self.pass_no = self._pass(self._start(setup))[0]

    @staticmethod
    def _pass(park: Park) -> tuple[int, int]:
        """(pass number, pages written in the pass) from a park at GUEST_SYNC(pass, written)."""
        return park.stage, park.args[0] if park.args else 0

    @property
    def huge(self) -> int:
        """How many 2M pages the region has."""
        return self.size // PAGE_2M

    def map_huge(self) -> dict[str, int]:
        """L2 writes one page of every 2M of the region (no dirty logging), so the nested MMU maps it
        with one 2M SPTE per 2M; returns the counts after.  Skips if the host's THP does not back it."""
        self.write(first=self.npages)                   # an empty pass: L2's loop code is mapped
        before = self.counts()
        self.write(stride=PAGE_2M // PAGE_4K)
        after = self.counts()
        got = delta(after, before)
        if got["pages_2m"] < self.huge:
            thp = thp_backed_chunks(self.slot.hva, self.size)
            require(thp is None or all(thp),
                    f"host THP backs only {2 * sum(thp or [])} of the data slot's {self.size >> 20} MiB "
                    "(see /sys/kernel/mm/transparent_hugepage/{enabled,defrag}); the nested MMU "
                    "maps 2M only where the host does")
        # L1's NPT/EPT maps the slot with 2M pages, the host with THPs; slot 0 adds nothing, L2
        # ran the same code before this pass.
        assert got == sized(pages_2m=self.huge), \
            f"L2 wrote one page per 2M: SPTE counts before {before}, after {after}: {got}"
        return after

    def write(self, first: int = 0, stride: int = 1) -> list[int]:
        """One L2 pass writing pages first, first+stride, ... of the region; returns them."""
        return self._pass_over(first, stride, execute=False)

    def execute(self, first: int = 0, stride: int = 1) -> list[int]:
        """One L2 pass calling a RET in pages first, first+stride, ... of the region (written here
        first, EXEC_OFFSET bytes in); returns them. Their stamps stay as they were."""
        return self._pass_over(first, stride, execute=True)

    def _pass_over(self, first: int, stride: int, execute: bool) -> list[int]:
        pages = list(range(first, self.npages, stride))
        if execute:
            plant_rets(self.g, self.slot.view, (page * PAGE_4K for page in pages))
        self.pass_no, done = self._pass(self.guest.step({"cmd_first": first, "cmd_stride": stride,
                                                         "cmd_exec": int(execute)}))
        assert done == len(pages), \
            f"L2 reports {done} pages {'executed' if execute else 'written'} in pass {self.pass_no - 1}"
        return pages

    def check_data(self, pages: list[int], pass_no: int) -> None:
        """Each page's first u64 is what L2 wrote in ``pass_no``: the NPT/EPT offset mapping held."""
        view = self.slot.view
        bad = [p for p in pages
               if int.from_bytes(view[p * PAGE_4K: p * PAGE_4K + 8], "little") != (pass_no << 32 | p)]
        assert not bad, f"{len(bad)} pages lack pass {pass_no}'s stamp, first {bad[:8]}"
