"""Typed results of KVM_RUN: one class per exit reason that tests care about."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from kvmpy.abi import ffi, lib
from kvmpy.record import Record

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


class Exit(Record):
    """Base class: ``reason`` is the raw KVM_EXIT_* value."""

    reason: int

    @property
    def name(self) -> str:
        return exit_name(self.reason)


class RunPage:
    """A vCPU's kvm_run mapping as its exits see it: the data of an exit is valid for one run.

    ``current`` is the exit of the vCPU's last run (None while it runs): only that exit may
    hand out views of the page. ``Vcpu.run`` calls ``release()`` when views were handed out,
    so the data of earlier exits is unavailable (ValueError): the run overwrote its bytes.
    """

    __slots__ = ("mapping", "current", "handed_out")

    def __init__(self, mapping: "Mapping") -> None:
        self.mapping = mapping
        self.current: Exit | None = None
        self.handed_out = False

    def release(self) -> None:
        self.handed_out = False
        self.mapping.release_views()

    def view(self, ex: Exit, offset: int, length: int) -> memoryview:
        if ex is not self.current:
            raise ValueError("exit data of an earlier run: the vCPU has run again since (its run page is reused)")
        self.handed_out = True
        return self.mapping.view(offset, length)


class _PageData(Exit):
    """An exit whose ``data`` is a view of the run page, made on first use (most exits are
    handled without it). Built once per exit: plain attributes, no generated __init__."""

    __slots__ = ("_data", "_page")
    _fields_names = ()

    @property
    def data(self) -> memoryview:
        """A view of the run page (written by an OUT/MMIO write, to be filled for an IN/MMIO read),
        valid until the vCPU's next run or close, which release it (ValueError on use)."""
        try:
            return self._data           # unset until first used: one store less per exit
        except AttributeError:
            self._data = self._page.view(self, *self._span())
            return self._data

    def _span(self) -> tuple[int, int]:
        raise NotImplementedError

    def _fields(self) -> tuple:
        return tuple(getattr(self, n) for n in self._fields_names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _PageData) and self._fields_names == other._fields_names and \
            (self.reason, *self._fields()) == (other.reason, *other._fields())

    def __repr__(self) -> str:
        return f"{self._kind}(reason={self.reason}, " + ", ".join(
            f"{n}={v!r}" for n, v in zip(self._fields_names, self._fields())) + ")"


class IoExit(_PageData):
    """Port I/O: ``port``, access ``size``, ``direction`` ('in' or 'out'), ``count`` and ``data``.

    The fields are kept as the one tuple that IO_FIELDS unpacks from the run page, which is
    all a run does per port-I/O exit (every ucall at ring 0; see RunIoExit).
    """

    __slots__ = ("_io",)
    _fields_names = ("port", "size", "direction", "count")
    _kind = "IoExit"

    def __init__(self, reason: int, port: int, size: int, direction: str, count: int,
                 data: memoryview | None = None) -> None:
        self.reason = reason
        self._io = (lib.KVM_EXIT_IO_OUT if direction == "out" else lib.KVM_EXIT_IO_IN, size, port, count, 0)
        if data is not None:
            self._data = data

    def _span(self) -> tuple[int, int]:
        return self._io[4], self._io[1] * self._io[3]

    @property
    def port(self) -> int:
        return self._io[2]

    @property
    def size(self) -> int:
        return self._io[1]

    @property
    def direction(self) -> str:
        return "out" if self._io[0] == lib.KVM_EXIT_IO_OUT else "in"

    @property
    def count(self) -> int:
        return self._io[3]


class RunIoExit(IoExit):
    """The IoExit ``Vcpu.run`` returns: built from the unpacked run page (``io``, IO_FIELDS) with
    the fewest stores (its reason is the class's), its data in ``page`` for this run only."""

    __slots__ = ()
    reason = lib.KVM_EXIT_IO

    def __init__(self, io: tuple, page: RunPage) -> None:
        self._io = io
        self._page = page
        page.current = self


class MmioExit(_PageData):
    """MMIO: guest physical ``addr``, ``length``, ``is_write`` and ``data`` (as IoExit's)."""

    __slots__ = ("addr", "length", "is_write")
    _fields_names = __slots__
    _kind = "MmioExit"

    def __init__(self, reason: int, addr: int, length: int, is_write: bool, data: memoryview | None = None,
                 page: RunPage | None = None) -> None:
        self.reason = reason
        self.addr = addr
        self.length = length
        self.is_write = is_write
        if data is not None:
            self._data = data
        self._page = page
        if page is not None:
            page.current = self

    def _span(self) -> tuple[int, int]:
        return _MMIO_DATA, min(self.length, 8)


class HltExit(Exit):
    """HLT with no interrupt to wake the vCPU (KVM_EXIT_HLT)."""


class ShutdownExit(Exit):
    """Triple fault (or another shutdown condition) in the guest."""


class FailEntryExit(Exit):
    """VM entry failed (KVM_EXIT_FAIL_ENTRY): the hardware's reason, on ``cpu``."""

    hardware_entry_failure_reason: int
    cpu: int


class InternalErrorExit(Exit):
    """KVM could not go on (KVM_EXIT_INTERNAL_ERROR): ``suberror`` (e.g. EMULATION) and its data words."""

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


class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset or crash (``type``) with its data words."""

    type: int
    data: tuple


class DirtyRingFullExit(Exit):
    """The vCPU's dirty ring is full: harvest and reset it before running again."""


class InterruptedExit(Exit):
    """KVM_RUN returned EINTR: a kick (immediate_exit + signal) or another signal."""


class UnknownExit(Exit):
    """An exit reason kvmpy has no type for (KVM_EXIT_UNKNOWN's ``hardware_exit_reason`` if it was that)."""

    hardware_exit_reason: int = 0


# struct kvm_run: exit_reason at 8, the exit union at 32 (checked against the compiler below).
IO_FIELDS = struct.Struct("<BBHIQ")    # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8xIB")        # phys_addr, (data), len, is_write
_UNION = ffi.offsetof("struct kvm_run", "io")
_MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio", "data")
assert (_UNION, ffi.offsetof("struct kvm_run", "io", "data_offset"), ffi.offsetof("struct kvm_run", "mmio", "len"),
        ffi.offsetof("struct kvm_run", "mmio", "is_write"), ffi.offsetof("struct kvm_run", "fail_entry", "cpu"),
        ffi.offsetof("struct kvm_run", "internal", "data"), ffi.offsetof("struct kvm_run", "system_event", "data")) \
    == (32, 40, 48, 52, 40, 40, 40), "struct kvm_run changed layout"
_EXIT_MMIO = lib.KVM_EXIT_MMIO


def decode_reason(r: int, run_bytes: memoryview, page: RunPage) -> Exit:
    """The exit object for exit reason ``r`` of the run page ``run_bytes``; ``page`` hands out
    the exits' data views. KVM_EXIT_IO, the exit of every port-I/O ucall, is decoded inline
    by ``Vcpu.run`` (IO_FIELDS, RunIoExit) instead. Everything is read through the view: an
    unmapped page raises ValueError."""
    if r == _EXIT_MMIO:
        addr, length, is_write = _MMIO.unpack_from(run_bytes, _UNION)
        return MmioExit(r, addr, length, bool(is_write), None, page)
    return _decode_other(r, run_bytes)


_U64 = struct.Struct("<Q")
_U64_U32 = struct.Struct("<QI")        # fail_entry: hardware_entry_failure_reason, cpu
_U32_U32 = struct.Struct("<II")        # internal: suberror, ndata; system_event: type, ndata


def _decode_other(r: int, run_bytes: memoryview) -> Exit:
    if r == lib.KVM_EXIT_HLT:
        return HltExit(r)
    if r == lib.KVM_EXIT_SHUTDOWN:
        return ShutdownExit(r)
    if r == lib.KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(r, *_U64_U32.unpack_from(run_bytes, _UNION))
    if r in (lib.KVM_EXIT_INTERNAL_ERROR, lib.KVM_EXIT_SYSTEM_EVENT):
        kind, ndata = _U32_U32.unpack_from(run_bytes, _UNION)
        data = struct.unpack_from(f"<{min(ndata, 16)}Q", run_bytes, _UNION + 8)
        return (InternalErrorExit if r == lib.KVM_EXIT_INTERNAL_ERROR else SystemEventExit)(r, kind, data)
    if r == lib.KVM_EXIT_DIRTY_RING_FULL:
        return DirtyRingFullExit(r)
    if r == lib.KVM_EXIT_INTR:
        return InterruptedExit(r)
    return UnknownExit(r, _U64.unpack_from(run_bytes, _UNION)[0] if r == lib.KVM_EXIT_UNKNOWN else 0)
