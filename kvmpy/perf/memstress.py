"""The memstress VM: N vCPUs touching their part of the test memory, one pass per host step.

The host side of guests/memstress.c, laid out like the kernel selftests'
lib/memstress.c: the test memory (``vcpu_bytes`` per vCPU, in ``slots``
memslots of one backing) at TEST_GPA, mapped with 4K guest pages at GVA ==
GPA, each vCPU on its own part (or, with ``partition=False``, all on all of
it). The guest parks at every pass (``SteppedGuest``); :meth:`Memstress.run_pass`
releases the next one and waits for every vCPU to finish it.
"""
from __future__ import annotations

from typing import Callable

from kvmpy.errors import KvmError, RequirementError
from kvmpy.guest import stages
from kvmpy.guest.stepper import SteppedGuest
from kvmpy.guest.vcpu_loop import ExitHook
from kvmpy.guest.vm import IDENTITY_MAP_BITS, MAX_VCPUS, GuestVm
from kvmpy.hostmem import MEMINFO, mem_available
from kvmpy.kvm import Kvm
from kvmpy.memory import PAGE_1G, PAGE_2M, PAGE_4K, Backing, Hugetlb, Memslot
from kvmpy.record import Record
from kvmpy.vm import Vm
from kvmpy.x86 import cpu

TEST_GPA = 4 << 30           # 1 GiB aligned (1G hugetlb), above the runtime's memslot 0
FIRST_SLOT = 1
NESTED_RANGES = 4            # guests/memstress.c: nested_gpa/nested_size
MEM_SIZE = 64 << 20          # memslot 0: runtime, program, L1's nested tables
# The top 1 GiB of the guest's physical address space (GuestVm.gpa_limit), and room for the
# page-table memslot below it, are not test memory.
RESERVED_TOP = 2 * PAGE_1G
MAX_SLOT_PAGES = (1 << 31) - 1   # KVM_MEM_MAX_NR_PAGES: the most pages one memslot may have


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


class MemstressConfig(Record, frozen=True):
    """What the memstress VM looks like (the dirty_log_perf_test options that shape the VM)."""

    vcpus: int = 1
    vcpu_bytes: int = 1 << 30
    slots: int = 1
    backing: Backing | None = None      # anonymous 4K by default
    partition: bool = True              # each vCPU on its own part (C: without -o)
    user_mode: bool = False             # run the guest at CPL3 (natively on kvm_pvm)
    nested: bool = False                # run the loop in an L2 (SVM+NPT or VMX+EPT)
    seed: int = 1

    def check(self, gpa_limit: int = 1 << IDENTITY_MAP_BITS) -> None:
        """KvmError for a shape the guest cannot run (sizes, counts). ``gpa_limit`` is where the
        guest's physical address space ends (``GuestVm.gpa_limit``: MAXPHYADDR, which may be as
        low as 36 bits); without it, the most any x86-64 guest of kvmpy's can have."""
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise KvmError(f"vCPUs: {self.vcpus} is not 1..{MAX_VCPUS}")
        if self.vcpu_bytes <= 0 or self.vcpu_bytes % PAGE_4K:
            raise KvmError(f"per-vCPU memory {self.vcpu_bytes:#x} is not a positive multiple of 4 KiB")
        top, end = TEST_GPA + self.vcpus * self.vcpu_bytes, gpa_limit - RESERVED_TOP
        if top > end:
            raise KvmError(f"{self.vcpus} x {_size(self.vcpu_bytes)} of guest memory does not fit: the test memory "
                           f"starts at {TEST_GPA:#x} and must end by {end:#x} (at most "
                           f"{max(end - TEST_GPA, 0) >> 30} GiB in all, in a {gpa_limit.bit_length() - 1}-bit "
                           f"guest physical address space)")
        if self.slots < 1 or self.total_pages % self.slots:
            raise KvmError(f"{self.total_pages} guest pages cannot be divided evenly into {self.slots} memslots")
        page = self.backing.page_size if self.backing is not None else PAGE_4K
        if self.slot_bytes % page:
            raise KvmError(f"memslots of {self.slot_bytes:#x} bytes are not a multiple of the "
                           f"{self.backing} backing's {page:#x}-byte pages")
        if self.total_pages // self.slots > MAX_SLOT_PAGES:
            raise KvmError(f"memslots of {_size(self.slot_bytes)}: KVM takes at most {MAX_SLOT_PAGES} pages "
                           f"({_size(MAX_SLOT_PAGES * PAGE_4K)}) per memslot; split the memory with -x")
        if not 0 <= self.seed < 1 << 31:
            raise KvmError(f"random seed {self.seed} is not 0..2^31-1")
        if self.nested and self.user_mode:
            raise KvmError("a nested run needs the guest at ring 0 (L1 runs VMRUN/VMLAUNCH): drop --user-mode")

    def check_host(self, meminfo: str = MEMINFO) -> None:
        """RequirementError when this host's free memory cannot hold the test memory, which the
        guest writes in full (anonymous, THP and shared-memfd backings; the hugetlb backing checks
        its pool when it allocates)."""
        if isinstance(self.backing, Hugetlb):
            return
        available = mem_available(meminfo)
        if available is None:
            return
        tables = -(-self.total_pages // 512) * PAGE_4K * 2       # 4K page tables (and slack for the upper levels)
        need = self.total_pages * PAGE_4K + tables + MEM_SIZE
        if need > available:
            raise RequirementError(f"{self.vcpus} x {_size(self.vcpu_bytes)} of guest memory "
                                   f"({self.backing or 'anonymous'} backing, written in full) and its page tables "
                                   f"need {_size(need)}, but this host has {_size(available)} available "
                                   f"(MemAvailable in {meminfo})")

    @property
    def total_pages(self) -> int:
        return self.vcpus * self.vcpu_bytes // PAGE_4K

    @property
    def slot_bytes(self) -> int:
        return self.total_pages // self.slots * PAGE_4K


class Memstress:
    """The memstress guest in its VM, parked after each pass (use as a context manager).

    ``before_vcpus(vm)`` prepares the VM before its vCPUs exist (e.g. enables the dirty
    ring); ``on_exit`` sees the exits that are not ucalls (e.g. KVM_EXIT_DIRTY_RING_FULL).
    """

    def __init__(self, config: MemstressConfig, *, kvm: Kvm | None = None,
                 before_vcpus: Callable[[Vm], None] | None = None, on_exit: ExitHook | None = None) -> None:
        config.check()
        self.config = config
        self.g = GuestVm("memstress", nr_vcpus=config.vcpus, mem_size=MEM_SIZE, kvm=kvm,
                         user_mode=config.user_mode, before_vcpus=before_vcpus)
        try:
            config.check(self.g.gpa_limit)      # this CPU's MAXPHYADDR, before any test memory
            self.slots = self._add_test_memory()
            self._set_globals()
        except BaseException:
            self.g.close()
            raise
        self.stepped = SteppedGuest(self.g, stop={"quit": 1}, park_stage=stages.MEMSTRESS_PASS_DONE,
                                    on_exit=on_exit, name="memstress")
        self.passes = 0

    @property
    def vm(self) -> Vm:
        return self.g.vm

    @property
    def gpa_range(self) -> tuple[int, int]:
        """Guest physical test memory [start, end)."""
        return TEST_GPA, TEST_GPA + self.config.total_pages * PAGE_4K

    def _add_test_memory(self) -> list[Memslot]:
        c = self.config
        slots = [self.g.add_memory(FIRST_SLOT + i, TEST_GPA + i * c.slot_bytes, c.slot_bytes, c.backing)
                 for i in range(c.slots)]
        # 4K guest mappings, as the selftests' virt_map (the tables are built in C: _bulk.c).
        self.g.map(TEST_GPA, TEST_GPA, c.total_pages * PAGE_4K, PAGE_4K)
        return slots

    def _set_globals(self) -> None:
        c = self.config
        pages = c.vcpu_bytes // PAGE_4K if c.partition else c.total_pages
        for i in range(c.vcpus):
            self.g.write_global("vcpu_gva", TEST_GPA + (i * c.vcpu_bytes if c.partition else 0), 8 * i)
            self.g.write_global("vcpu_pages", pages, 8 * i)
        self.g.write_global("random_seed", c.seed)
        self.g.write_global("write_percent", 100)
        self.g.write_global("random_access", 0)
        if c.nested:
            self._set_nested_ranges()

    def _set_nested_ranges(self) -> None:
        """L2 sees memslot 0, the test memory and the page-table memslot, identity mapped (2M pages);
        L1 runs it under the vCPU's extension (nested.h's nested_vendor: SVM+NPT, else VMX+EPT)."""
        if cpu.cpuid_has(self.g.cpuid, cpu.FEATURE_NPT):
            vendor = stages.NESTED_VENDOR_SVM
        elif cpu.cpuid_has(self.g.cpuid, cpu.FEATURE_VMX):
            vendor = stages.NESTED_VENDOR_VMX
        else:
            raise RequirementError("nested memstress: the vCPU has neither SVM with NPT nor VMX "
                                   "(load kvm_amd or kvm_intel with nested=1, e.g. in `kvmpy bed`)")
        start, end = self.gpa_range
        ranges = [(0, MEM_SIZE), (start, -(-(end - start) // PAGE_2M) * PAGE_2M)]
        if self.g.pt_slot is not None:
            ranges.append((self.g.pt_slot.gpa, self.g.pt_slot.size))
        assert len(ranges) <= NESTED_RANGES
        for i, (gpa, size) in enumerate(ranges):
            self.g.write_global("nested_gpa", gpa, 8 * i)
            self.g.write_global("nested_size", size, 8 * i)
        self.g.write_global("nested_vendor", vendor)

    def start(self, timeout: float) -> None:
        """Start the vCPUs; returns once each has done its first pass (the population pass)."""
        self.stepped.start(timeout)
        self.passes = 1

    def set_access(self, write_percent: int, random_access: bool) -> None:
        """What the next passes do (only while the vCPUs are parked)."""
        if not 0 <= write_percent <= 100:
            raise KvmError(f"write percentage {write_percent} is not 0..100")
        self.g.write_global("write_percent", write_percent)
        self.g.write_global("random_access", int(random_access))

    def run_pass(self, timeout: float, poll: Callable[[], None] | None = None) -> None:
        """Release every vCPU for one more pass and wait until all have done it."""
        self.stepped.release()
        self.stepped.wait_parked(timeout, poll)
        self.passes += 1

    def close(self) -> None:
        """Let the guest finish (quit), stop the vCPUs and close the VM."""
        self.stepped.close()

    def __enter__(self) -> "Memstress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

