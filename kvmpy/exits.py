"""Typed results of KVM_RUN: one class per exit reason that tests care about."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmpy.abi import ffi, lib

if TYPE_CHECKING:
    from kvmpy.memory import Mapping

_EXIT_NAMES = {
    getattr(lib, n): n[len("KVM_EXIT_"):]
    for n in dir(lib)
    if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}


def exit_name(reason: int) -> str:
    """KVM_EXIT_* name of ``reason`` without the prefix, or 'reason N'."""
    return _EXIT_NAMES.get(reason, f"reason {reason}")


@dataclass
class Exit:
    """Base class: ``reason`` is the raw KVM_EXIT_* value."""

    reason: int

    @property
    def name(self) -> str:
        return exit_name(self.reason)


@dataclass
class IoExit(Exit):
    """Port I/O. ``data`` is a view of the run page (written by an OUT, to be filled for an
    IN), valid until the vCPU's next run or close, which release it (ValueError on use)."""

    port: int
    size: int
    direction: str  # 'in' or 'out'
    count: int
    data: memoryview = field(repr=False)


@dataclass
class MmioExit(Exit):
    """MMIO. ``data`` is a view of the run page, valid until the next run or close (as IoExit's)."""

    addr: int
    length: int
    is_write: bool
    data: memoryview = field(repr=False)


@dataclass
class HltExit(Exit):
    pass


@dataclass
class ShutdownExit(Exit):
    """Triple fault (or another shutdown condition) in the guest."""


@dataclass
class FailEntryExit(Exit):
    hardware_entry_failure_reason: int
    cpu: int


@dataclass
class InternalErrorExit(Exit):
    suberror: int
    data: tuple

    @property
    def suberror_name(self) -> str:
        names = {
            lib.KVM_INTERNAL_ERROR_EMULATION: "EMULATION",
            lib.KVM_INTERNAL_ERROR_SIMUL_EX: "SIMUL_EX",
            lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "DELIVERY_EV",
            lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "UNEXPECTED_EXIT_REASON",
        }
        return names.get(self.suberror, str(self.suberror))


@dataclass
class SystemEventExit(Exit):
    type: int
    data: tuple


@dataclass
class DirtyRingFullExit(Exit):
    pass


@dataclass
class InterruptedExit(Exit):
    """KVM_RUN returned EINTR: a kick (immediate_exit + signal) or another signal."""


@dataclass
class UnknownExit(Exit):
    hardware_exit_reason: int = 0


def decode(run, page: "Mapping") -> Exit:
    """Build the exit object for the ``struct kvm_run *`` ``run``; ``page`` is the mapping of
    the run page, which hands out (and later releases) the exits' data views."""
    r = run.exit_reason
    if r == lib.KVM_EXIT_IO:
        io = run.io
        n = io.size * io.count
        return IoExit(r, io.port, io.size, "out" if io.direction == lib.KVM_EXIT_IO_OUT else "in",
                      io.count, page.view(io.data_offset, n))
    if r == lib.KVM_EXIT_HLT:
        return HltExit(r)
    if r == lib.KVM_EXIT_MMIO:
        off = ffi.offsetof("struct kvm_run", "mmio", "data")
        return MmioExit(r, run.mmio.phys_addr, run.mmio.len, bool(run.mmio.is_write),
                        page.view(off, min(run.mmio.len, 8)))
    if r == lib.KVM_EXIT_SHUTDOWN:
        return ShutdownExit(r)
    if r == lib.KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(r, run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if r == lib.KVM_EXIT_INTERNAL_ERROR:
        nd = min(run.internal.ndata, 16)
        return InternalErrorExit(r, run.internal.suberror, tuple(run.internal.data[i] for i in range(nd)))
    if r == lib.KVM_EXIT_SYSTEM_EVENT:
        nd = min(run.system_event.ndata, 16)
        return SystemEventExit(r, run.system_event.type, tuple(run.system_event.data[i] for i in range(nd)))
    if r == lib.KVM_EXIT_DIRTY_RING_FULL:
        return DirtyRingFullExit(r)
    if r == lib.KVM_EXIT_INTR:
        return InterruptedExit(r)
    return UnknownExit(r, run.hw.hardware_exit_reason if r == lib.KVM_EXIT_UNKNOWN else 0)
