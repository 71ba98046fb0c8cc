"""Typed results of KVM_RUN: one class per exit reason that tests care about."""
from __future__ import annotations

import struct
from dataclasses import dataclass
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


class RunPage:
    """A vCPU's kvm_run mapping as its exits see it: the data of an exit is valid for one run.

    ``next_run()`` (called by ``Vcpu.run``) releases the data views handed out so far and
    makes the data of earlier exits unavailable (ValueError), as their bytes are overwritten.
    """

    __slots__ = ("mapping", "generation")

    def __init__(self, mapping: "Mapping") -> None:
        self.mapping = mapping
        self.generation = 0

    def next_run(self) -> None:
        self.generation += 1
        self.mapping.release_views()

    def view(self, generation: int, offset: int, length: int) -> memoryview:
        if generation != self.generation:
            raise ValueError("exit data of an earlier run: the vCPU has run again since (its run page is reused)")
        return self.mapping.view(offset, length)


class _PageData(Exit):
    """An exit whose ``data`` is a view of the run page, made on first use (most exits are
    handled without it)."""

    def __init__(self, reason: int, data: memoryview | None) -> None:
        self.reason = reason
        self._data = data
        self._page: RunPage | None = None
        self._where = (0, 0, 0)     # (generation, offset, length) in the run page

    @property
    def data(self) -> memoryview:
        """A view of the run page (written by an OUT/MMIO write, to be filled for an IN/MMIO read),
        valid until the vCPU's next run or close, which release it (ValueError on use)."""
        if self._data is None:
            self._data = self._page.view(*self._where)
        return self._data

    def _fields(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (self.reason, *self._fields()) == (other.reason, *other._fields())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason}, " + ", ".join(
            f"{n}={v!r}" for n, v in zip(self._fields_names, self._fields())) + ")"


class IoExit(_PageData):
    """Port I/O: ``port``, access ``size``, ``direction`` ('in' or 'out'), ``count`` and ``data``."""

    _fields_names = ("port", "size", "direction", "count")

    def __init__(self, reason: int, port: int, size: int, direction: str, count: int,
                 data: memoryview | None = None) -> None:
        _PageData.__init__(self, reason, data)
        self.port, self.size, self.direction, self.count = port, size, direction, count

    def _fields(self) -> tuple:
        return (self.port, self.size, self.direction, self.count)


class MmioExit(_PageData):
    """MMIO: guest physical ``addr``, ``length``, ``is_write`` and ``data`` (as IoExit's)."""

    _fields_names = ("addr", "length", "is_write")

    def __init__(self, reason: int, addr: int, length: int, is_write: bool, data: memoryview | None = None) -> None:
        _PageData.__init__(self, reason, data)
        self.addr, self.length, self.is_write = addr, length, is_write

    def _fields(self) -> tuple:
        return (self.addr, self.length, self.is_write)


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


# struct kvm_run: exit_reason at 8, the exit union at 32 (checked against the compiler below).
_IO = struct.Struct("<BBHIQ")          # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8xIB")        # phys_addr, (data), len, is_write
_UNION = ffi.offsetof("struct kvm_run", "io")
_MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio", "data")
assert (_UNION, ffi.offsetof("struct kvm_run", "io", "data_offset"), ffi.offsetof("struct kvm_run", "mmio", "len"),
        ffi.offsetof("struct kvm_run", "mmio", "is_write")) == (32, 40, 48, 52), "struct kvm_run changed layout"
_OUT = lib.KVM_EXIT_IO_OUT
_EXIT_IO, _EXIT_MMIO = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO


def decode_reason(r: int, run_bytes: memoryview, run, page: RunPage) -> Exit:
    """The exit object for exit reason ``r`` of the run page (``run_bytes`` its bytes, ``run`` its
    ``struct kvm_run *``); ``page`` hands out the exits' data views."""
    if r == _EXIT_IO:
        direction, size, port, count, data_offset = _IO.unpack_from(run_bytes, _UNION)
        ex = IoExit(r, port, size, "out" if direction == _OUT else "in", count)
    elif r == _EXIT_MMIO:
        addr, length, is_write = _MMIO.unpack_from(run_bytes, _UNION)
        ex = MmioExit(r, addr, length, bool(is_write))
        data_offset, size, count = _MMIO_DATA, min(length, 8), 1
    else:
        return _decode_other(r, run)
    ex._page, ex._where = page, (page.generation, data_offset, size * count)
    return ex


def _decode_other(r: int, run) -> Exit:
    if r == lib.KVM_EXIT_HLT:
        return HltExit(r)
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
