"""The format of a KVM binary stats fd (KVM_GET_STATS_FD): header, id, descriptors, values.

The layout is documented in Documentation/virt/kvm/api.rst ("KVM_GET_STATS_FD"):
a header, an id string, an array of descriptors (each followed by ``name_size``
bytes of NUL-padded name) and a data block of u64 values. kvmpy.stats reads fds with it.
"""
from __future__ import annotations

import struct
from typing import Union

from kvmpy import faults
from kvmpy.abi import ffi, lib
from kvmpy.errors import KvmError
from kvmpy.record import Record, replace

# Parsed with struct from the bytes themselves: a cffi pointer over a temporary slice
# would read freed memory once the slice is gone (tests/test_memory_safety.py).
_HEADER = struct.Struct("<6I")     # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESC = struct.Struct("<IhHII")    # flags, exponent, size, offset, bucket_size (then the name)
HEADER_SIZE = ffi.sizeof("struct kvm_stats_header")
DESC_SIZE = ffi.sizeof("struct kvm_stats_desc")
assert (_HEADER.size, _DESC.size) == (HEADER_SIZE, DESC_SIZE), "struct kvm_stats_* changed layout"

TYPE_NAMES = {
    lib.KVM_STATS_TYPE_CUMULATIVE: "cumulative",
    lib.KVM_STATS_TYPE_INSTANT: "instant",
    lib.KVM_STATS_TYPE_PEAK: "peak",
    lib.KVM_STATS_TYPE_LINEAR_HIST: "linear_hist",
    lib.KVM_STATS_TYPE_LOG_HIST: "log_hist",
}
UNIT_NAMES = {
    lib.KVM_STATS_UNIT_NONE: "none",
    lib.KVM_STATS_UNIT_BYTES: "bytes",
    lib.KVM_STATS_UNIT_SECONDS: "seconds",
    lib.KVM_STATS_UNIT_CYCLES: "cycles",
    lib.KVM_STATS_UNIT_BOOLEAN: "boolean",
}
BASE_NAMES = {lib.KVM_STATS_BASE_POW10: 10, lib.KVM_STATS_BASE_POW2: 2}
_HISTOGRAMS = (lib.KVM_STATS_TYPE_LINEAR_HIST, lib.KVM_STATS_TYPE_LOG_HIST)
_TYPE_MASK, _UNIT_MASK, _BASE_MASK = lib.KVM_STATS_TYPE_MASK, lib.KVM_STATS_UNIT_MASK, lib.KVM_STATS_BASE_MASK

Value = Union[int, tuple]


class StatsFormatError(KvmError):
    """The stats fd content does not follow the documented layout."""


class StatDesc(Record, frozen=True):
    """One statistic's descriptor."""

    name: str
    type: str       # cumulative, instant, peak, linear_hist, log_hist
    unit: str       # none, bytes, seconds, cycles, boolean
    base: int       # 10 or 2: value * base**exponent is in ``unit``
    exponent: int
    size: int       # number of u64 values (buckets for histograms)
    offset: int     # byte offset of the values inside the data block
    bucket_size: int
    flags: int

    @property
    def is_histogram(self) -> bool:
        return self.type in ("linear_hist", "log_hist")


class StatsLayout:
    """Parsed header, id and descriptors of a stats fd (``buf``: its bytes from offset 0).

    The constructor checks the header only; a descriptor is checked when it is first
    used (:meth:`locate`), all of them by :attr:`descs` (and :meth:`parse`). Lookups by
    name scan the raw descriptors in C (kvmpy_stats_locate), as the C selftests do.
    """

    def __init__(self, buf: bytes) -> None:
        buf = bytes(buf)
        if lib.kvmpy_stats_check_header(buf, len(buf)):
            _raise_header_error(buf)
        self._buf = buf
        _flags, self.name_size, self.num_desc, self.id_offset, self.desc_offset, self.data_offset = \
            _HEADER.unpack_from(buf)
        self.desc_end = self.desc_offset + self.num_desc * (DESC_SIZE + self.name_size)
        self.desc_block = buf[self.desc_offset: self.desc_end]
        self._descs: dict[str, StatDesc] | None = None
        self._data_size = 0
        # name -> (offset, number of u64s, value is a tuple), filled by locate()
        self.locs: dict[str, tuple[int, int, bool]] = {}

    @classmethod
    def parse(cls, buf: bytes) -> "StatsLayout":
        """Parse ``buf`` and check every descriptor now."""
        layout = cls(buf)
        layout.descs
        return layout

    @property
    def id(self) -> str:
        return self.id_in(self._buf)

    def id_in(self, buf: bytes) -> str:
        """The id string in ``buf``, a fd's bytes from offset 0 (fds sharing a layout differ in it)."""
        return _cstr(buf[self.id_offset: self.id_offset + self.name_size], "id")

    @property
    def descs(self) -> dict[str, StatDesc]:
        """Every descriptor by name (parsed and checked on first use)."""
        if self._descs is None:
            fmt = struct.Struct(f"<IhHII{self.name_size}s")
            descs: dict[str, StatDesc] = {}
            block = self._buf[self.desc_offset: self.desc_offset + self.num_desc * fmt.size]
            for i, (flags, exponent, size, offset, bucket, raw) in enumerate(fmt.iter_unpack(block)):
                d = _checked_desc(i, flags, exponent, size, offset, bucket, raw)
                if d.name in descs:
                    raise StatsFormatError(f"stat {d.name!r} described twice")
                descs[d.name] = d
            for name, other in _SWAPPABLE.items():
                if _read_as(name) == other and {name, other} <= descs.keys():
                    descs[name] = replace(descs[name], offset=descs[other].offset)
            self._data_size = max((d.offset + 8 * d.size for d in descs.values()), default=0)
            self._descs = descs
        return self._descs

    @property
    def data_size(self) -> int:
        self.descs
        return self._data_size

    def locate(self, name: str) -> tuple[int, int, bool] | None:
        """(offset in the data block, number of u64 values, value is a tuple) of stat ``name``, or None."""
        loc = self.locs.get(name)
        if loc is None:
            try:
                key = _read_as(name).encode("ascii")
            except (UnicodeEncodeError, AttributeError):
                return None
            if b"\0" in key:
                return None
            found = lib.kvmpy_stats_locate(self._buf, len(self._buf), key)
            if found < 0:
                if found == lib.KVMPY_STATS_NOT_FOUND:
                    return None
                self._descs = None
                self.descs              # raises the descriptor's error
                raise StatsFormatError(f"stat {name!r}: descriptor out of the ABI")
            loc = self.locs[name] = (found & 0xFFFFFFFF, found >> 32 & 0xFFFF, bool(found >> 48))
        return loc

    @staticmethod
    def _value(d: StatDesc, data: bytes) -> Value:
        """The value of stat ``d`` in the data block ``data``."""
        return value_at(d.offset, d.size, d.is_histogram or d.size > 1, data)

    def decode(self, data: bytes) -> dict[str, Value]:
        """Values of every stat from the data block ``data``."""
        if len(data) < self.data_size:
            raise StatsFormatError(f"stats data truncated: {len(data)} < {self.data_size} bytes")
        return {name: value_at(d.offset, d.size, d.is_histogram or d.size > 1, data)
                for name, d in self.descs.items()}


_SWAPPABLE = {"pages_4k": "pages_2m", "pages_2m": "pages_4k"}


def _read_as(name: str) -> str:
    """The stat whose value a lookup of ``name`` gives: ``name`` itself (unless a fault is injected)."""
    if faults.active("stats-names-swapped") and name in _SWAPPABLE:   # FAULT: stats-names-swapped
        return _SWAPPABLE[name]
    return name


def _raise_header_error(buf: bytes) -> None:
    """Raise the StatsFormatError that says what is wrong with the header of ``buf``."""
    if len(buf) < HEADER_SIZE:
        raise StatsFormatError(f"stats header truncated: {len(buf)} < {HEADER_SIZE} bytes")
    _flags, name_size, num_desc, id_off, desc_off, data_off = _HEADER.unpack_from(buf)
    if name_size == 0:
        raise StatsFormatError("stats header: name_size is 0")
    if id_off < HEADER_SIZE or id_off + name_size > len(buf):
        raise StatsFormatError(f"stats header: id_offset {id_off} (name_size {name_size}) outside the buffer")
    desc_end = desc_off + num_desc * (DESC_SIZE + name_size)
    if desc_off < HEADER_SIZE or desc_end > len(buf):
        raise StatsFormatError(
            f"stats header: {num_desc} descriptors at offset {desc_off} run past the buffer ({len(buf)} bytes)")
    if data_off < desc_end and num_desc:
        raise StatsFormatError(f"stats header: data_offset {data_off} overlaps the descriptors (end {desc_end})")
    raise StatsFormatError("stats header: id string overlaps the descriptors")


def meta_size(header: bytes) -> int:
    """How many bytes from offset 0 hold the id and descriptors that ``header`` describes."""
    _flags, name_size, num_desc, id_off, desc_off, data_off = _HEADER.unpack_from(header)
    return max(data_off, desc_off + num_desc * (DESC_SIZE + name_size), id_off + name_size)


def value_at(offset: int, size: int, as_tuple: bool, data: bytes, base: int = 0) -> Value:
    """The value of ``size`` u64s at ``offset`` in ``data`` (placed at ``base``): an int, or a tuple."""
    if not as_tuple:
        return int.from_bytes(data[offset - base: offset - base + 8], "little")
    return struct.unpack_from(f"<{size}Q", data, offset - base)


def _checked_desc(i: int, flags: int, exponent: int, size: int, offset: int, bucket_size: int,
                  raw_name: bytes) -> StatDesc:
    """Descriptor ``i`` as a StatDesc; StatsFormatError if any field is out of the ABI."""
    name = _cstr(raw_name, f"descriptor {i} name")
    stype = _check_flags(name, flags, size, bucket_size)
    return StatDesc(name, TYPE_NAMES[stype], UNIT_NAMES[flags & lib.KVM_STATS_UNIT_MASK],
                    BASE_NAMES[flags & lib.KVM_STATS_BASE_MASK], exponent, size, offset, bucket_size, flags)


def _check_flags(name: str, flags: int, size: int, bucket_size: int) -> int:
    """The type bits of stat ``name``'s flags; StatsFormatError if a field is out of the ABI."""
    stype = flags & _TYPE_MASK
    if stype not in TYPE_NAMES:
        raise StatsFormatError(f"stat {name!r}: unknown type {stype >> lib.KVM_STATS_TYPE_SHIFT}")
    if flags & _UNIT_MASK not in UNIT_NAMES:
        raise StatsFormatError(f"stat {name!r}: unknown unit {(flags & _UNIT_MASK) >> lib.KVM_STATS_UNIT_SHIFT}")
    if flags & _BASE_MASK not in BASE_NAMES:
        raise StatsFormatError(f"stat {name!r}: unknown base {(flags & _BASE_MASK) >> lib.KVM_STATS_BASE_SHIFT}")
    if size == 0:
        raise StatsFormatError(f"stat {name!r}: size 0")
    if stype == lib.KVM_STATS_TYPE_LINEAR_HIST and bucket_size == 0:
        raise StatsFormatError(f"stat {name!r}: linear histogram with bucket_size 0")
    return stype


def _cstr(raw: bytes, what: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise StatsFormatError(f"stats {what} is not NUL-terminated within name_size")
    if end == 0:
        raise StatsFormatError(f"stats {what} is empty")
    return raw[:end].decode("ascii", "replace")
