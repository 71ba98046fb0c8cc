"""KVM binary statistics (KVM_GET_STATS_FD): parse the descriptors once, read values by name.

The layout is documented in Documentation/virt/kvm/api.rst ("KVM_GET_STATS_FD"):
a header, an id string, an array of descriptors (each followed by ``name_size``
bytes of NUL-padded name) and a data block of u64 values.
"""
from __future__ import annotations

import os
import struct
import weakref
from dataclasses import dataclass, replace
from typing import Union

from kvmpy import faults
from kvmpy.abi import ffi, lib
from kvmpy.errors import KvmError

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

Value = Union[int, tuple]


class StatsFormatError(KvmError):
    """The stats fd content does not follow the documented layout."""


@dataclass(frozen=True)
class StatDesc:
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


@dataclass(frozen=True)
class StatsLayout:
    """Parsed header, id and descriptors of a stats fd."""

    id: str
    data_offset: int
    descs: dict[str, StatDesc]

    @property
    def data_size(self) -> int:
        return max((d.offset + 8 * d.size for d in self.descs.values()), default=0)

    @classmethod
    def parse(cls, buf: bytes) -> "StatsLayout":
        """Parse the header, id and descriptor block from ``buf`` (the fd's bytes from offset 0)."""
        if len(buf) < HEADER_SIZE:
            raise StatsFormatError(f"stats header truncated: {len(buf)} < {HEADER_SIZE} bytes")
        _flags, name_size, num_desc, id_off, desc_off, data_off = _HEADER.unpack_from(buf)
        if name_size == 0:
            raise StatsFormatError("stats header: name_size is 0")
        if id_off < HEADER_SIZE or id_off + name_size > len(buf):
            raise StatsFormatError(f"stats header: id_offset {id_off} (name_size {name_size}) outside the buffer")
        desc_stride = DESC_SIZE + name_size
        desc_end = desc_off + num_desc * desc_stride
        if desc_off < HEADER_SIZE or desc_end > len(buf):
            raise StatsFormatError(
                f"stats header: {num_desc} descriptors at offset {desc_off} run past the buffer ({len(buf)} bytes)")
        if data_off < desc_end and num_desc:
            raise StatsFormatError(f"stats header: data_offset {data_off} overlaps the descriptors (end {desc_end})")
        if id_off < desc_off < id_off + name_size:
            raise StatsFormatError("stats header: id string overlaps the descriptors")
        ident = _cstr(buf[id_off: id_off + name_size], "id")
        descs: dict[str, StatDesc] = {}
        for i in range(num_desc):
            base_off = desc_off + i * desc_stride
            flags, exponent, size, offset, bucket_size = _DESC.unpack_from(buf, base_off)
            name = _cstr(buf[base_off + DESC_SIZE: base_off + desc_stride], f"descriptor {i} name")
            stype = flags & lib.KVM_STATS_TYPE_MASK
            unit = flags & lib.KVM_STATS_UNIT_MASK
            base = flags & lib.KVM_STATS_BASE_MASK
            if stype not in TYPE_NAMES:
                raise StatsFormatError(f"stat {name!r}: unknown type {stype >> lib.KVM_STATS_TYPE_SHIFT}")
            if unit not in UNIT_NAMES:
                raise StatsFormatError(f"stat {name!r}: unknown unit {unit >> lib.KVM_STATS_UNIT_SHIFT}")
            if base not in BASE_NAMES:
                raise StatsFormatError(f"stat {name!r}: unknown base {base >> lib.KVM_STATS_BASE_SHIFT}")
            if size == 0:
                raise StatsFormatError(f"stat {name!r}: size 0")
            if TYPE_NAMES[stype] == "linear_hist" and bucket_size == 0:
                raise StatsFormatError(f"stat {name!r}: linear histogram with bucket_size 0")
            if name in descs:
                raise StatsFormatError(f"stat {name!r} described twice")
            descs[name] = StatDesc(name, TYPE_NAMES[stype], UNIT_NAMES[unit], BASE_NAMES[base],
                                   exponent, size, offset, bucket_size, flags)
        if faults.active("stats-names-swapped") and {"pages_4k", "pages_2m"} <= descs.keys():
            a, b = descs["pages_4k"], descs["pages_2m"]   # FAULT: stats-names-swapped
            descs["pages_4k"], descs["pages_2m"] = replace(a, offset=b.offset), replace(b, offset=a.offset)
        return cls(ident, data_off, descs)

    def decode(self, data: bytes) -> dict[str, Value]:
        """Values of every stat from the data block ``data``."""
        if len(data) < self.data_size:
            raise StatsFormatError(f"stats data truncated: {len(data)} < {self.data_size} bytes")
        return {name: self._value(d, data) for name, d in self.descs.items()}

    @staticmethod
    def _value(d: StatDesc, data: bytes, base: int = 0) -> Value:
        vals = struct.unpack_from(f"<{d.size}Q", data, d.offset - base)
        return vals if d.is_histogram or d.size > 1 else vals[0]


def _cstr(raw: bytes, what: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise StatsFormatError(f"stats {what} is not NUL-terminated within name_size")
    if end == 0:
        raise StatsFormatError(f"stats {what} is empty")
    return raw[:end].decode("ascii", "replace")


class Snapshot(dict):
    """Stat name → value at one moment. ``b - a`` gives per-stat deltas (histograms per bucket)."""

    def __sub__(self, other: "Snapshot") -> dict[str, Value]:
        out: dict[str, Value] = {}
        for name, v in self.items():
            o = other.get(name)
            if o is None:
                continue
            out[name] = tuple(x - y for x, y in zip(v, o)) if isinstance(v, tuple) else v - o
        return out


class Stats:
    """A VM's or vCPU's binary stats fd. Owns the fd; ``close()`` (or garbage collection) releases it."""

    def __init__(self, fd: int, owner: str) -> None:
        self.fd = fd
        self.owner = owner
        self._close_fd = weakref.finalize(self, os.close, fd)
        self._close_fd.atexit = False
        try:
            head = os.pread(fd, HEADER_SIZE, 0)
            if len(head) < HEADER_SIZE:
                raise StatsFormatError(f"{owner}: stats header truncated")
            _flags, name_size, num_desc, id_off, desc_off, data_off = _HEADER.unpack(head)
            # Everything before the data block: header, id and descriptors.
            meta_len = max(data_off, desc_off + num_desc * (DESC_SIZE + name_size), id_off + name_size)
            self.layout = StatsLayout.parse(os.pread(fd, meta_len, 0))
        except BaseException:
            self.close()
            raise

    @property
    def names(self) -> list[str]:
        return list(self.layout.descs)

    def desc(self, name: str) -> StatDesc:
        try:
            return self.layout.descs[name]
        except KeyError:
            raise KeyError(f"{self.owner} has no stat {name!r} (it has: {', '.join(sorted(self.layout.descs))})") from None

    def has(self, name: str) -> bool:
        return name in self.layout.descs

    def read(self, name: str) -> Value:
        """Current value of ``name`` (a tuple for histograms and arrays)."""
        d = self.desc(name)
        raw = os.pread(self._open_fd(), 8 * d.size, self.layout.data_offset + d.offset)
        if len(raw) < 8 * d.size:
            raise StatsFormatError(f"{self.owner}: stat {name!r}: read {len(raw)} of {8 * d.size} bytes")
        return StatsLayout._value(d, raw, d.offset)

    def snapshot(self) -> Snapshot:
        """All stats, read with one pread so they are mutually consistent as far as KVM allows."""
        data = os.pread(self._open_fd(), self.layout.data_size, self.layout.data_offset)
        return Snapshot(self.layout.decode(data))

    def _open_fd(self) -> int:
        if self.fd < 0:
            raise KvmError(f"{self.owner}: stats read after close")
        return self.fd

    def close(self) -> None:
        self._close_fd()
        self.fd = -1

    def __enter__(self) -> "Stats":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
