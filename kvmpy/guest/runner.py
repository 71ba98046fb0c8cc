"""Run a guest program to GUEST_DONE: VM + memory + vCPUs in long mode, ucall dispatch.

Guest physical layout of memslot 0 (identity mapped, GVA == GPA):

    0x000000  page 0: not mapped, so NULL dereferences fault
    0x001000  GDT
    0x002000  IDT (256 gates)
    0x003000  TSSs, TSS_STRIDE bytes per vCPU
    0x010000  page-table pool (PT_POOL_SIZE)
    0x100000  per-vCPU stack blocks of STACK_BLOCK bytes:
              [guard][#DF IST stack][guard][stack ......]  (guards unmapped)
    0x400000  the guest ELF (guests/lib/guest.ld), then free memory
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kvmpy.errors import KvmError
from kvmpy.exits import Exit, InterruptedExit, IoExit, MmioExit
from kvmpy.guest import programs
from kvmpy.guest.elf import GuestElf
from kvmpy.guest.ucall import (AssertCall, BadUcallError, DoneCall, ExceptionCall, PrintfCall, SyncCall,
                               Ucall, decode, ucall_gpa)
from kvmpy.x86 import cpu, descriptors
from kvmpy.x86.paging import PAGE_1G, PAGE_2M, PAGE_4K, PageTableBuilder

log = logging.getLogger(__name__)

GDT_GPA = 0x1000
IDT_GPA = 0x2000
TSS_GPA = 0x3000
TSS_STRIDE = 128
PT_POOL_GPA = 0x10000
PT_POOL_SIZE = 0xF0000
STACKS_GPA = 0x100000
STACK_BLOCK = 0x8000
IST_OFFSET = 0x1000      # #DF stack page inside a block
STACK_OFFSET = 0x3000    # main stack from here to the end of the block
MAX_VCPUS = 16
ELF_MIN_GPA = 0x200000
DF_VECTOR = 8

SyncHook = Callable[[int, int, tuple], None]
PrintHook = Callable[[int, str], None]


class GuestError(KvmError):
    """Base of errors raised when a guest run fails; ``vcpu_id`` says which vCPU."""

    vcpu_id: int | None = None


class GuestAssertError(GuestError):
    """GUEST_ASSERT* failed in the guest: file:line, expression and values."""

    def __init__(self, vcpu_id: int, call: AssertCall) -> None:
        self.vcpu_id, self.call = vcpu_id, call
        super().__init__(f"vCPU {vcpu_id}: guest assertion failed at {call.describe()}")


class GuestExceptionError(GuestError):
    """The guest took an exception it had no handler for."""

    def __init__(self, vcpu_id: int, call: ExceptionCall, where: str) -> None:
        self.vcpu_id, self.call = vcpu_id, call
        self.vector, self.error_code, self.rip, self.cr2 = call.vector, call.error_code, call.rip, call.cr2
        super().__init__(f"vCPU {vcpu_id}: unexpected guest exception {call.vector_name} (vector {call.vector}) "
                         f"at RIP {call.rip:#x} ({where}), error code {call.error_code:#x}, CR2 {call.cr2:#x}")


class GuestCrashError(GuestError):
    """The vCPU stopped in a way no guest program asks for: SHUTDOWN (triple fault),
    entry failure, internal error, or an exit the runner does not handle."""

    def __init__(self, vcpu_id: int, exit: Exit, detail: str, regs_dump: str) -> None:
        self.vcpu_id, self.exit, self.regs_dump = vcpu_id, exit, regs_dump
        super().__init__(f"vCPU {vcpu_id}: guest crashed: exit {exit.name} (reason {exit.reason}){detail}\n"
                         f"{regs_dump}")


class GuestTimeoutError(GuestError):
    """The guest did not reach GUEST_DONE in time; every vCPU has been stopped."""


@dataclass
class RunResult:
    """What a run produced: syncs as (vcpu_id, stage, args), prints as (vcpu_id, text)."""

    syncs: list[tuple[int, int, tuple]] = field(default_factory=list)
    prints: list[tuple[int, str]] = field(default_factory=list)
    elapsed: float = 0.0


def format_regs(vcpu) -> str:
    """A register dump of a stopped vCPU."""
    try:
        r, s = vcpu.get_regs(), vcpu.get_sregs()
    except KvmError as e:
        return f"(registers unavailable: {e})"
    gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
    lines = [f"  rip {r.rip:#018x}  rflags {r.rflags:#x}"]
    for i in range(0, len(gprs), 4):
        lines.append("  " + "  ".join(f"{n:>3} {getattr(r, n):#018x}" for n in gprs[i:i + 4]))
    lines.append(f"  cr0 {s.cr0:#x}  cr2 {s.cr2:#x}  cr3 {s.cr3:#x}  cr4 {s.cr4:#x}  efer {s.efer:#x}")
    lines.append(f"  cs {s.cs.selector:#x} (l={s.cs.l})  ss {s.ss.selector:#x}  tr {s.tr.selector:#x}  "
                 f"gdt {s.gdt.base:#x}/{s.gdt.limit:#x}  idt {s.idt.base:#x}/{s.idt.limit:#x}")
    return "\n".join(lines)


class GuestVm:
    """A VM running guest program ``program`` (a name from guests/ or a path to an ELF).

    Construction creates the VM, memslot 0 (``mem_size`` bytes at GPA 0), loads
    the program, builds GDT/TSS/IDT and identity-mapping page tables, and
    creates ``nr_vcpus`` vCPUs in 64-bit mode at the ELF entry with their own
    stacks; vCPU i gets ``vcpu_args[i]`` as guest_main's second argument.
    Before :meth:`run` a test can add memslots, map more memory and set globals.
    """

    def __init__(self, program: str | Path, *, nr_vcpus: int = 1, mem_size: int = 64 << 20,
                 vcpu_args: Sequence[int] | None = None, kvm=None, backing=None) -> None:
        if not 1 <= nr_vcpus <= MAX_VCPUS:
            raise KvmError(f"nr_vcpus must be 1..{MAX_VCPUS}, got {nr_vcpus}")
        if vcpu_args is not None and len(vcpu_args) != nr_vcpus:
            raise KvmError(f"{len(vcpu_args)} vcpu_args for {nr_vcpus} vCPUs")
        path = Path(program) if "/" in str(program) or str(program).endswith(".elf") else programs.find(str(program))
        self.elf = GuestElf(path)
        if min(s.paddr for s in self.elf.segments) < ELF_MIN_GPA:
            raise KvmError(f"{path}: loads below {ELF_MIN_GPA:#x}, into the runtime's reserved area")
        if mem_size % PAGE_4K or self.elf.end > mem_size:
            raise KvmError(f"mem_size {mem_size:#x} must be page aligned and hold the program (ends {self.elf.end:#x})")

        from kvmpy import Kvm

        self._own_kvm = kvm is None
        self.kvm = Kvm() if kvm is None else kvm
        self.vm = None
        self.vcpus: list = []
        self._ran = False
        try:
            self.vm = self.kvm.create_vm()
            self.mem_size = mem_size
            self.vm.add_memory(slot=0, gpa=0, size=mem_size, backing=backing)
            self.elf.load(self.vm)
            self.cpuid = cpu.vcpu_cpuid(self.kvm, 0)
            self.has_nx = cpu.cpuid_has(self.cpuid, cpu.FEATURE_NX)
            self.pt = PageTableBuilder(self.vm, PT_POOL_GPA, PT_POOL_SIZE, cpu.phys_bits(self.cpuid))
            self._identity_map(nr_vcpus)
            self._build_tables(nr_vcpus)
            args = list(vcpu_args) if vcpu_args is not None else [0] * nr_vcpus
            for i in range(nr_vcpus):
                self._create_vcpu(i, args[i])
        except BaseException:
            self.close()
            raise

    # -- setup ----------------------------------------------------------------------
    def _identity_map(self, nr_vcpus: int) -> None:
        guards = set()
        for i in range(nr_vcpus):
            block = STACKS_GPA + i * STACK_BLOCK
            guards.update({block, block + IST_OFFSET + PAGE_4K})
        low_end = min(ELF_MIN_GPA, self.mem_size)
        for gpa in range(PAGE_4K, low_end, PAGE_4K):
            if gpa not in guards:
                self.pt.map_page(gpa, gpa, PAGE_4K)
        gpa = low_end
        while gpa < self.mem_size:
            size = PAGE_2M if gpa % PAGE_2M == 0 and gpa + PAGE_2M <= self.mem_size else PAGE_4K
            self.pt.map_page(gpa, gpa, size)
            gpa += size

    def _build_tables(self, nr_vcpus: int) -> None:
        tss_bases = [TSS_GPA + i * TSS_STRIDE for i in range(nr_vcpus)]
        self._gdt = descriptors.build_gdt(tss_bases)
        self.vm.write(GDT_GPA, self._gdt)
        for i, base in enumerate(tss_bases):
            ist_top = STACKS_GPA + i * STACK_BLOCK + IST_OFFSET + PAGE_4K
            self.vm.write(base, descriptors.build_tss(ist={1: ist_top}))
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
                            tss=descriptors.tss_segment(i, TSS_GPA + i * TSS_STRIDE), nx=self.has_nx)
        r = vcpu.get_regs()
        r.rip = self.elf.entry
        r.rsp = STACKS_GPA + (i + 1) * STACK_BLOCK
        r.rdi, r.rsi = i, arg
        r.rflags = cpu.RFLAGS_FIXED
        vcpu.set_regs(r)

    # -- test-facing helpers ------------------------------------------------------------
    def add_memory(self, slot: int, gpa: int, size: int, backing=None):
        """Add a memslot (see ``Vm.add_memory``); map it with :meth:`map` to use it."""
        return self.vm.add_memory(slot=slot, gpa=gpa, size=size, backing=backing)

    def map(self, gva: int, gpa: int, size: int, page_size: int = PAGE_4K, *, writable: bool = True,
            user: bool = False, nx: bool = False) -> None:
        """Map ``[gva, gva+size)`` to ``[gpa, gpa+size)``; RequirementError if the vCPU's
        CPUID lacks 1G pages (pdpe1gb) or NX when they are asked for."""
        if page_size == PAGE_1G:
            cpu.require_feature(self.cpuid, cpu.FEATURE_GBPAGES, "1 GiB guest pages")
        if nx:
            cpu.require_feature(self.cpuid, cpu.FEATURE_NX, "non-executable mappings")
        self.pt.map(gva, gpa, size, page_size, writable=writable, user=user, nx=nx)

    def write_global(self, name: str, value: int | bytes, offset: int = 0) -> None:
        """Set a guest global before the run (see ``GuestElf.write_global``)."""
        self.elf.write_global(self.vm, name, value, offset)

    def read_global(self, name: str, offset: int = 0, size: int | None = None) -> int:
        """Read a guest global (int) after or during a run."""
        return self.elf.read_global(self.vm, name, offset, size)

    def read_global_bytes(self, name: str) -> bytes:
        return self.elf.read_global_bytes(self.vm, name)

    # -- running ----------------------------------------------------------------------
    def run(self, timeout: float = 30.0, on_sync: SyncHook | None = None,
            on_print: PrintHook | None = None) -> RunResult:
        """Run every vCPU (one thread each) until all reach GUEST_DONE.

        ``on_sync(vcpu_id, stage, args)`` runs on the vCPU's thread at each
        GUEST_SYNC, with that vCPU paused (the others keep running); an
        exception it raises ends the run and is re-raised here.  Guest failures
        raise GuestAssertError / GuestExceptionError / GuestCrashError /
        BadUcallError; GuestTimeoutError after ``timeout`` seconds, by which
        time every vCPU has been kicked out of KVM_RUN and its thread joined.
        """
        if self._ran:
            raise KvmError("GuestVm.run() can only be called once")
        self._ran = True
        result = RunResult()
        stop = threading.Event()
        errors: list[BaseException] = []
        lock = threading.Lock()

        def fail(e: BaseException) -> None:
            with lock:
                errors.append(e)
            stop.set()

        def loop(i: int) -> None:
            vcpu = self.vcpus[i]
            try:
                while not stop.is_set():
                    ex = vcpu.run()
                    if isinstance(ex, InterruptedExit):
                        continue  # kicked: the loop condition decides
                    try:
                        call = self._ucall_of(ex)
                    except BadUcallError as e:
                        raise BadUcallError(f"vCPU {i}: {e}") from None
                    if call is None:
                        raise self._crash(i, ex)
                    if isinstance(call, DoneCall):
                        return
                    if isinstance(call, SyncCall):
                        with lock:
                            result.syncs.append((i, call.stage, call.args))
                        if on_sync is not None:
                            on_sync(i, call.stage, call.args)
                    elif isinstance(call, PrintfCall):
                        text = call.text + (" [truncated]" if call.truncated else "")
                        log.info("guest vCPU %d: %s", i, text)
                        with lock:
                            result.prints.append((i, text))
                        if on_print is not None:
                            on_print(i, text)
                    elif isinstance(call, AssertCall):
                        raise GuestAssertError(i, call)
                    elif isinstance(call, ExceptionCall):
                        raise GuestExceptionError(i, call, self.elf.symbolize(call.rip))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                if isinstance(e, GuestError):
                    e.vcpu_id = i
                fail(e)

        threads = [threading.Thread(target=loop, args=(i,), name=f"kvmpy-vcpu{i}", daemon=True)
                   for i in range(len(self.vcpus))]
        start = time.monotonic()
        for t in threads:
            t.start()
        deadline = start + timeout
        timed_out = False
        try:
            for t in threads:
                while t.is_alive() and not stop.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        timed_out = True
                        break
                    t.join(min(remaining, 0.05))
                if timed_out or stop.is_set():
                    break
        finally:
            # Stop whatever is still running (timeout, a failing vCPU, ^C) before returning.
            stop.set()
            self._stop_threads(threads)
        result.elapsed = time.monotonic() - start
        if errors:
            raise errors[0]
        if timed_out:
            where = ", ".join(f"vCPU {i} at {self._rip(v)}" for i, v in enumerate(self.vcpus))
            raise GuestTimeoutError(f"guest {self.elf.path.name} did not reach GUEST_DONE within {timeout:g} s; "
                                    f"stopped {where}")
        return result

    def _stop_threads(self, threads: list[threading.Thread]) -> None:
        for _ in range(100):
            alive = [t for t in threads if t.is_alive()]
            if not alive:
                return
            for i, t in enumerate(threads):
                if t.is_alive():
                    self.vcpus[i].kick()
            for t in alive:
                t.join(0.05)
        names = [t.name for t in threads if t.is_alive()]
        raise KvmError(f"vCPU threads {names} did not stop after repeated kicks")

    def _rip(self, vcpu) -> str:
        try:
            return self.elf.symbolize(vcpu.get_regs().rip)
        except KvmError:
            return "?"

    def _ucall_of(self, ex: Exit) -> Ucall | None:
        if not isinstance(ex, IoExit):
            return None
        gpa = ucall_gpa(ex.port, ex.size, ex.direction, ex.data)
        return None if gpa is None else decode(self.vm, gpa)

    def _crash(self, i: int, ex: Exit) -> GuestCrashError:
        detail = {"SHUTDOWN": " (triple fault or other shutdown)",
                  "HLT": " (guest halted without GUEST_DONE)"}.get(ex.name, "")
        if isinstance(ex, IoExit):
            detail = f" (port {ex.port:#x} {ex.direction} size {ex.size}, not the ucall port)"
        elif isinstance(ex, MmioExit):
            detail = f" (MMIO {'write' if ex.is_write else 'read'} of {ex.length} bytes at GPA {ex.addr:#x})"
        elif hasattr(ex, "suberror_name"):
            detail = f" (suberror {ex.suberror_name}, data {[hex(d) for d in ex.data]})"
        elif hasattr(ex, "hardware_entry_failure_reason"):
            detail = f" (hardware entry failure reason {ex.hardware_entry_failure_reason:#x})"
        return GuestCrashError(i, ex, detail, format_regs(self.vcpus[i]))

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """Close the VM (and the Kvm handle if this object opened it)."""
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


def run_until_done(program: str | Path, *, timeout: float = 30.0, on_sync: SyncHook | None = None,
                   on_print: PrintHook | None = None, globals_: dict | None = None, **kwargs) -> RunResult:
    """Create a :class:`GuestVm`, set ``globals_``, run it to GUEST_DONE, close it."""
    with GuestVm(program, **kwargs) as g:
        for name, value in (globals_ or {}).items():
            g.write_global(name, value)
        return g.run(timeout=timeout, on_sync=on_sync, on_print=on_print)
