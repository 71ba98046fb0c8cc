"""A VM running a guest program in long mode: memory, tables, vCPUs, and the run lifecycle.

Guest physical layout of memslot 0 (identity mapped, GVA == GPA):

    0x000000  page 0: not mapped, so NULL dereferences fault
    0x001000  GDT
    0x002000  IDT (256 gates)
    0x003000  TSSs, TSS_STRIDE bytes per vCPU
    0x010000  page-table pool (PT_POOL_SIZE)
    0x100000  per-vCPU stack blocks of STACK_BLOCK bytes (guards unmapped):
              [guard][#DF IST stack][guard][kernel stack (TSS.RSP0)][guard][stack ......]
    0x400000  the guest ELF (guests/lib/guest.ld), then free memory

PT_POOL_SIZE holds the tables of about 480 MiB of 4K mappings. A :meth:`GuestVm.map`
that needs more adds a page-table memslot (the highest memslot id) of PT_SLOT_SIZE
bytes (or more, as needed) ending 1 GiB below ``gpa_limit``, the top of the guest physical
address space (MAXPHYADDR, 47 bits at most so that it can be identity mapped too), and takes
table pages from it; a KvmError if the test already uses that range (a fixed place a test
can avoid, rather than one searched for that it cannot predict).

A user-mode guest (``user_mode=True``) runs guest_main at CPL3: every mapping is
user-accessible with the accessed/dirty bits preset, the vCPU starts with the user
selectors, exceptions switch to the kernel stack, ucalls are stores to an
unbacked GPA (KVM_EXIT_MMIO), and privileged steps are kernel calls (guest.h).
On kvm_pvm this is what makes a guest run natively, through KVM's shadow MMU.

Lifecycle, with a hook at each step for the driver (like QEMUMachine's
_pre_launch/_post_launch): construction creates the VM, runs ``before_vcpus(vm)``
(e.g. enable the dirty ring), builds memory and tables, creates the vCPUs; the
test then adds memslots, maps them and sets globals; :meth:`GuestVm.run` (or
:meth:`GuestVm.start` for a driver such as :class:`~kvmpy.guest.stepper.SteppedGuest`)
runs the vCPUs through the one vCPU loop, with ``on_exit`` for exits that are
not ucalls.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

from kvmpy.abi import lib
from kvmpy.errors import KvmError
from kvmpy.guest import programs
from kvmpy.guest.elf import GuestElf
from kvmpy.guest.errors import GuestTimeoutError
from kvmpy.guest.ucall import MMIO, PORT_IO, UcallTransport
from kvmpy.guest.vcpu_loop import ExitHook, PrintHook, RunResult, StopHook, SyncHook, VcpuThreads
from kvmpy.kvm import Kvm
from kvmpy.memory import PAGE_1G, PAGE_2M, PAGE_4K, Backing, Memslot
from kvmpy.vcpu import Vcpu
from kvmpy.vm import Vm
from kvmpy.x86 import cpu, descriptors
from kvmpy.x86.paging import PageTableBuilder

GDT_GPA = 0x1000
IDT_GPA = 0x2000
TSS_GPA = 0x3000
TSS_STRIDE = 128
PT_POOL_GPA = 0x10000
PT_POOL_SIZE = 0xF0000
STACKS_GPA = 0x100000
STACK_BLOCK = 0x10000
IST_OFFSET = 0x1000      # #DF stack page inside a block
KSTACK_OFFSET = 0x3000   # kernel stack (exceptions from CPL3) up to KSTACK_TOP
KSTACK_TOP = 0x7000
STACK_OFFSET = 0x8000    # main stack from here to the end of the block
GUARD_OFFSETS = (0, IST_OFFSET + PAGE_4K, KSTACK_TOP)
MAX_VCPUS = 16
IDENTITY_MAP_BITS = 47       # GVA == GPA through 4-level tables: the canonical lower half
PT_SLOT_SIZE = 64 << 20      # NORESERVE: only the table pages used take memory; 32 GiB of 4K mappings
ELF_MIN_GPA = 0x200000
DF_VECTOR = 8


class GuestVm:
    """A VM running guest program ``program`` (a name from guests/ or a path to an ELF).

    Construction creates the VM (then calls ``before_vcpus(vm)``), memslot 0
    (``mem_size`` bytes at GPA 0), loads the program, builds GDT/TSS/IDT and
    identity-mapping page tables, and creates ``nr_vcpus`` vCPUs in 64-bit mode at
    the ELF entry with their own stacks; vCPU i gets ``vcpu_args[i]`` as
    guest_main's second argument. ``user_mode`` runs guest_main at CPL3 (see the
    module docstring). ``ucall`` is how the guest hands over its ucalls: port I/O
    by default, MMIO (:data:`~kvmpy.guest.ucall.MMIO`) in user mode. Before the
    run a test can add memslots, map more memory and set globals.
    """

    def __init__(self, program: str | Path, *, nr_vcpus: int = 1, mem_size: int = 64 << 20,
                 vcpu_args: Sequence[int] | None = None, kvm: Kvm | None = None, backing: Backing | None = None,
                 user_mode: bool = False, ucall: UcallTransport | None = None,
                 before_vcpus: Callable[[Vm], None] | None = None) -> None:
        if not 1 <= nr_vcpus <= MAX_VCPUS:
            raise KvmError(f"nr_vcpus must be 1..{MAX_VCPUS}, got {nr_vcpus}")
        if vcpu_args is not None and len(vcpu_args) != nr_vcpus:
            raise KvmError(f"{len(vcpu_args)} vcpu_args for {nr_vcpus} vCPUs")
        ucall = ucall or (MMIO if user_mode else PORT_IO)
        if user_mode and ucall.mmio_gpa is None:
            raise KvmError("a user-mode (CPL3) guest hands over ucalls by MMIO (an OUT at CPL3 faults): "
                           "pass a UcallTransport with mmio_gpa, or leave ucall unset")
        if ucall.mmio_gpa is not None and (ucall.mmio_gpa % 8 or ucall.mmio_gpa < mem_size):
            raise KvmError(f"ucall MMIO address {ucall.mmio_gpa:#x} must be 8-byte aligned and above "
                           f"memslot 0 (mem_size {mem_size:#x})")
        path = Path(program) if "/" in str(program) or str(program).endswith(".elf") else programs.find(str(program))
        self.elf = GuestElf(path)
        if min(s.paddr for s in self.elf.segments) < ELF_MIN_GPA:
            raise KvmError(f"{path}: loads below {ELF_MIN_GPA:#x}, into the runtime's reserved area")
        if mem_size % PAGE_4K or self.elf.end > mem_size:
            raise KvmError(f"mem_size {mem_size:#x} must be page aligned and hold the program (ends {self.elf.end:#x})")

        self.ucall = ucall
        self.user_mode = user_mode
        self._own_kvm = kvm is None
        self.kvm = Kvm() if kvm is None else kvm
        self.vm: Vm | None = None
        self.vcpus: list[Vcpu] = []
        self.threads: VcpuThreads | None = None
        self.pt_slot: Memslot | None = None     # the page-table memslot, once 4K mappings need it
        try:
            self.vm = self.kvm.create_vm()
            if before_vcpus is not None:
                before_vcpus(self.vm)
            self.mem_size = mem_size
            self.vm.add_memory(slot=0, gpa=0, size=mem_size, backing=backing)
            self.elf.load(self.vm)
            self.cpuid = cpu.vcpu_cpuid(self.kvm, 0)
            self.has_nx = cpu.cpuid_has(self.cpuid, cpu.FEATURE_NX)
            self.pt = PageTableBuilder(self.vm, PT_POOL_GPA, PT_POOL_SIZE, cpu.phys_bits(self.cpuid),
                                       preset_ad=user_mode)
            self._identity_map(nr_vcpus)
            if ucall.mmio_gpa is not None:
                # The page stays without a memslot: the guest's store to it exits as MMIO.
                self.pt.map_page(ucall.mmio_gpa & ~(PAGE_4K - 1), ucall.mmio_gpa & ~(PAGE_4K - 1), user=user_mode)
                self.write_global("ucall_mmio_gpa", ucall.mmio_gpa)
            self._build_tables(nr_vcpus)
            args = list(vcpu_args) if vcpu_args is not None else [0] * nr_vcpus
            for i in range(nr_vcpus):
                self._create_vcpu(i, args[i])
        except BaseException:
            self.close()
            raise

    # -- setup ----------------------------------------------------------------------
    def _identity_map(self, nr_vcpus: int) -> None:
        guards = {STACKS_GPA + i * STACK_BLOCK + off for i in range(nr_vcpus) for off in GUARD_OFFSETS}
        low_end = min(ELF_MIN_GPA, self.mem_size)
        # 4K pages up to the program, but for page 0 and the stack guards; then 2M pages where
        # they fit. In runs, so that the page-table builder maps each run in one C call.
        start = PAGE_4K
        for guard in sorted(g for g in guards if g < low_end) + [low_end]:
            if guard > start:
                self.pt.map(start, start, guard - start, PAGE_4K, user=self.user_mode)
            start = guard + PAGE_4K
        huge_start = min(-(-low_end // PAGE_2M) * PAGE_2M, self.mem_size)
        huge_end = max(huge_start, self.mem_size // PAGE_2M * PAGE_2M)
        for begin, end, size in ((low_end, huge_start, PAGE_4K), (huge_start, huge_end, PAGE_2M),
                                 (huge_end, self.mem_size, PAGE_4K)):
            if end > begin:
                self.pt.map(begin, begin, end - begin, size, user=self.user_mode)

    def _build_tables(self, nr_vcpus: int) -> None:
        tss_bases = [TSS_GPA + i * TSS_STRIDE for i in range(nr_vcpus)]
        self._gdt = descriptors.build_gdt(tss_bases)
        self.vm.write(GDT_GPA, self._gdt)
        for i, base in enumerate(tss_bases):
            block = STACKS_GPA + i * STACK_BLOCK
            self.vm.write(base, descriptors.build_tss(rsp0=block + KSTACK_TOP, ist={1: block + IST_OFFSET + PAGE_4K}))
        table = self.elf.symbol("exc_stub_table")
        handlers = [self.vm.read_u64(table.addr + 8 * v) for v in range(table.size // 8)]
        self._idt = descriptors.build_idt(handlers, ist={DF_VECTOR: 1})
        self.vm.write(IDT_GPA, self._idt)

    def _create_vcpu(self, i: int, arg: int) -> None:
        vcpu = self.vm.create_vcpu(i)
        self.vcpus.append(vcpu)
        vcpu.set_cpuid(cpu.vcpu_cpuid(self.kvm, i))
        cpu.setup_long_mode(vcpu, cr3=self.pt.cr3, gdt_base=GDT_GPA, gdt_limit=len(self._gdt) - 1,
                            idt_base=IDT_GPA, idt_limit=len(self._idt) - 1,
                            tss=descriptors.tss_segment(i, TSS_GPA + i * TSS_STRIDE), nx=self.has_nx,
                            user=self.user_mode)
        r = vcpu.get_regs()
        r.rip = self.elf.entry
        r.rsp = STACKS_GPA + (i + 1) * STACK_BLOCK
        r.rdi, r.rsi = i, arg
        # A user process runs with interrupts enabled (nothing here raises one).
        r.rflags = cpu.RFLAGS_FIXED | (cpu.RFLAGS_IF if self.user_mode else 0)
        vcpu.set_regs(r)

    # -- test-facing helpers ------------------------------------------------------------
    def _live_vm(self) -> Vm:
        """The VM; KvmError once :meth:`close` (or the end of the ``with`` block) has closed it."""
        if self.vm is None:
            raise KvmError(f"GuestVm({self.elf.path.name}) is closed: use it (e.g. read results) "
                           "before close() or inside its with block")
        return self.vm

    def add_memory(self, slot: int, gpa: int, size: int, backing: Backing | None = None) -> Memslot:
        """Add a memslot (see ``Vm.add_memory``); map it with :meth:`map` to use it.

        KvmError if it would cover the ucall MMIO address, which must stay unbacked.
        """
        vm = self._live_vm()
        if isinstance(gpa, int) and isinstance(size, int) and self._covers_ucall(gpa, size):
            # Backed, the guest's ucall stores would become memory writes the host never sees.
            raise KvmError(f"memslot {slot} at {gpa:#x}+{size:#x} would cover the ucall MMIO address "
                           f"{self.ucall.mmio_gpa:#x}, which no memslot may back")
        return vm.add_memory(slot=slot, gpa=gpa, size=size, backing=backing)

    def _covers_ucall(self, gpa: int, size: int) -> bool:
        """Whether ``[gpa, gpa+size)`` holds the ucall MMIO address (user mode's ucall port)."""
        mmio = self.ucall.mmio_gpa
        return mmio is not None and gpa < mmio + 8 and mmio < gpa + size

    def map(self, gva: int, gpa: int, size: int, page_size: int = PAGE_4K, *, writable: bool = True,
            user: bool | None = None, nx: bool = False) -> None:
        """Map ``[gva, gva+size)`` to ``[gpa, gpa+size)`` (user-accessible if ``user``, by default
        in user mode); RequirementError if the vCPU's CPUID lacks 1G pages (pdpe1gb) or NX when
        they are asked for; PagingError for arguments the builder refuses, checked before a
        page-table memslot is added for them."""
        user = self.user_mode if user is None else user
        self._live_vm()
        self.pt.validate(gva, gpa, size, page_size)     # before a page-table memslot is added for it
        if page_size == PAGE_1G:
            cpu.require_feature(self.cpuid, cpu.FEATURE_GBPAGES, "1 GiB guest pages")
        if nx:
            cpu.require_feature(self.cpuid, cpu.FEATURE_NX, "non-executable mappings")
        need = self.pt.tables_needed(gva, size, page_size)
        if need > self.pt.pages_free:
            self._add_page_table_slot(need)
        self.pt.map(gva, gpa, size, page_size, writable=writable, user=user, nx=nx)

    @property
    def gpa_limit(self) -> int:
        """End of the guest physical addresses this VM can use and identity map: MAXPHYADDR of
        its vCPUs' CPUID, at most IDENTITY_MAP_BITS (the page-table memslot's place is below it)."""
        return min(1 << cpu.phys_bits(self.cpuid), 1 << IDENTITY_MAP_BITS)

    def _add_page_table_slot(self, pages: int) -> None:
        """Give the page-table builder a memslot of its own (once), identity mapped like memslot 0.

        The place is fixed (see the module docstring), not searched for, so that a test knows it;
        KvmError, before anything changes, if the test already uses it (memory or mappings).
        """
        if self.pt_slot is not None:
            return      # the builder says when it is full
        size = max(PT_SLOT_SIZE, -(-2 * pages * PAGE_4K // PAGE_2M) * PAGE_2M)
        gpa = self.gpa_limit - PAGE_1G - size
        what = f"the page-table memslot ({gpa:#x}+{size:#x}, for {pages} table pages)"
        if gpa < self.mem_size:
            raise KvmError(f"{what} does not fit in the guest physical address space")
        for ms in self.vm.memslots.values():
            if gpa < ms.gpa + ms.size and ms.gpa < gpa + size:
                raise KvmError(f"{what} would overlap memslot {ms.slot} ({ms.gpa:#x}+{ms.size:#x})")
        if self._covers_ucall(gpa, size):
            raise KvmError(f"{what} would cover the ucall MMIO address {self.ucall.mmio_gpa:#x}")
        used = self.pt.first_in_use(gpa, size, PAGE_2M)
        if used is not None:
            # Its identity map would silently replace the test's own mapping there.
            raise KvmError(f"{what} cannot be identity mapped: GVA {used:#x} is already mapped")
        slot = self.vm.check_extension(lib.KVM_CAP_NR_MEMSLOTS) - 1
        self.pt_slot = self.vm.add_memory(slot=slot, gpa=gpa, size=size)
        self.pt.add_pool(gpa, size)
        self.pt.map(gpa, gpa, size, PAGE_2M, user=self.user_mode)

    def write_global(self, name: str, value: int | bytes, offset: int = 0) -> None:
        """Set a guest global before the run (see ``GuestElf.write_global``)."""
        self.elf.write_global(self._live_vm(), name, value, offset)

    def read_global(self, name: str, offset: int = 0, size: int | None = None) -> int:
        """Read a guest global (int) after or during a run."""
        return self.elf.read_global(self._live_vm(), name, offset, size)

    def read_global_bytes(self, name: str) -> bytes:
        """The whole of guest global ``name`` as bytes."""
        return self.elf.read_global_bytes(self._live_vm(), name)

    def global_view(self, name: str) -> memoryview:
        """A live view of guest global ``name`` (see ``GuestElf.global_view``)."""
        return self.elf.global_view(self._live_vm(), name)

    # -- running ----------------------------------------------------------------------
    def start(self, *, on_sync: SyncHook | None = None, on_print: PrintHook | None = None,
              on_exit: ExitHook | None = None, on_stop: StopHook | None = None) -> VcpuThreads:
        """Start every vCPU on its own thread (the one vCPU loop, see :mod:`kvmpy.guest.vcpu_loop`).

        For drivers that watch the run themselves; a guest runs once.
        """
        if self.threads is not None:
            raise KvmError("a GuestVm runs once: start()/run() was already called")
        self._live_vm()
        self.threads = VcpuThreads(self.vcpus, self.vm, self.ucall, self.elf.symbolize,
                                   on_sync=on_sync, on_print=on_print, on_exit=on_exit, on_stop=on_stop)
        self.threads.start()
        return self.threads

    def run(self, timeout: float = 30.0, on_sync: SyncHook | None = None, on_print: PrintHook | None = None,
            on_exit: ExitHook | None = None) -> RunResult:
        """Run every vCPU until all reach GUEST_DONE.

        ``on_sync(vcpu_id, stage, args)`` runs on the vCPU's thread at each
        GUEST_SYNC, with that vCPU paused (the others keep running); an exception
        it raises ends the run and is re-raised here.  Guest failures raise
        GuestAssertError / GuestExceptionError / GuestCrashError / BadUcallError;
        GuestTimeoutError after ``timeout`` seconds, by which time every vCPU has
        been kicked out of KVM_RUN and its thread joined.
        """
        if not isinstance(timeout, (int, float)) or math.isnan(timeout):
            raise KvmError(f"run timeout must be a number of seconds, not {timeout!r}")
        start = time.monotonic()
        threads = self.start(on_sync=on_sync, on_print=on_print, on_exit=on_exit)
        try:
            finished = threads.wait(timeout)
        finally:
            # Stop whatever is still running (timeout, a failing vCPU, ^C) before returning.
            threads.stop()
        threads.result.elapsed = time.monotonic() - start
        if threads.errors:
            raise threads.errors[0]
        if not finished:
            where = ", ".join(f"vCPU {i} at {self.where(i)}" for i in range(len(self.vcpus)))
            raise GuestTimeoutError(f"guest {self.elf.path.name} did not reach GUEST_DONE within {timeout:g} s; "
                                    f"stopped {where}")
        return threads.result

    def where(self, i: int) -> str:
        """vCPU ``i``'s RIP as symbol+offset ('?' if unreadable)."""
        if not isinstance(i, int) or not 0 <= i < len(self.vcpus):
            raise KvmError(f"no vCPU {i!r}: this GuestVm has {len(self.vcpus)}")
        try:
            return self.elf.symbolize(self.vcpus[i].get_regs().rip)
        except KvmError:
            return "?"

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """Stop any vCPU still running, close the VM (and the Kvm handle if this object opened it).

        KvmError if called on a vCPU thread (from a hook): that thread cannot wait for itself;
        a hook ends the run by raising an exception.
        """
        if self.threads is not None:
            self.threads.refuse_on_vcpu_thread(f"GuestVm({self.elf.path.name}).close()")
        try:
            if self.threads is not None:
                self.threads.stop()
        finally:
            if self.vm is not None:
                self.vm.close()
                self.vm = None
            if self._own_kvm and self.kvm is not None:
                self.kvm.close()
                self.kvm = None

    def __enter__(self) -> "GuestVm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
