"""How a guest run fails: one exception type per way, each naming the vCPU and what it did."""
from __future__ import annotations

from kvmpy.errors import KvmError
from kvmpy.exits import Exit, IoExit, MmioExit
from kvmpy.guest.ucall import AssertCall, ExceptionCall


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
                         f"at RIP {call.rip:#x} ({where}, CPL{call.cs & 3}), error code {call.error_code:#x}, "
                         f"CR2 {call.cr2:#x}")


class GuestCrashError(GuestError):
    """The vCPU stopped in a way no guest program asks for: SHUTDOWN (triple fault),
    entry failure, internal error, or an exit the runner does not handle."""

    def __init__(self, vcpu_id: int, exit: Exit, regs_dump: str) -> None:
        self.vcpu_id, self.exit, self.regs_dump = vcpu_id, exit, regs_dump
        super().__init__(f"vCPU {vcpu_id}: guest crashed: exit {exit.name} (reason {exit.reason})"
                         f"{_exit_detail(exit)}\n{regs_dump}")


class GuestTimeoutError(GuestError):
    """The guest did not reach GUEST_DONE in time; every vCPU has been stopped."""


def _exit_detail(ex: Exit) -> str:
    if isinstance(ex, IoExit):
        return f" (port {ex.port:#x} {ex.direction} size {ex.size}, not a ucall)"
    if isinstance(ex, MmioExit):
        return f" (MMIO {'write' if ex.is_write else 'read'} of {ex.length} bytes at GPA {ex.addr:#x})"
    if hasattr(ex, "suberror_name"):
        return f" (suberror {ex.suberror_name}, data {[hex(d) for d in ex.data]})"
    if hasattr(ex, "hardware_entry_failure_reason"):
        return f" (hardware entry failure reason {ex.hardware_entry_failure_reason:#x})"
    return {"SHUTDOWN": " (triple fault or other shutdown)",
            "HLT": " (guest halted without GUEST_DONE)"}.get(ex.name, "")


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
