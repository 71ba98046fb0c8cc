"""KVM binary statistics (KVM_GET_STATS_FD): parse the descriptors once, read values by name.

The layout is documented in Documentation/virt/kvm/api.rst ("KVM_GET_STATS_FD"):
a header, an id string, an array of descriptors (each followed by ``name_size``
bytes of NUL-padded name) and a data block of u64 values.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator, Union

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


class StatsLayout:
    """Parsed header, id and descriptors of a stats fd (``buf``: its bytes from offset 0).

    The constructor checks the header only; a descriptor is checked when it is first
    used (:meth:`locate`), all of them by :attr:`descs` (and :meth:`parse`). Lookups by
    name scan the raw descriptors in C (kvmpy_stats_find), as the C selftests do.
    """

    def __init__(self, buf: bytes) -> None:
        buf = bytes(buf)
        if len(buf) < HEADER_SIZE:
            raise StatsFormatError(f"stats header truncated: {len(buf)} < {HEADER_SIZE} bytes")
        _flags, name_size, num_desc, id_off, desc_off, data_off = _HEADER.unpack_from(buf)
        if name_size == 0:
            raise StatsFormatError("stats header: name_size is 0")
        if id_off < HEADER_SIZE or id_off + name_size > len(buf):
            raise StatsFormatError(f"stats header: id_offset {id_off} (name_size {name_size}) outside the buffer")
        stride = DESC_SIZE + name_size
        desc_end = desc_off + num_desc * stride
        if desc_off < HEADER_SIZE or desc_end > len(buf):
            raise StatsFormatError(
                f"stats header: {num_desc} descriptors at offset {desc_off} run past the buffer ({len(buf)} bytes)")
        if data_off < desc_end and num_desc:
            raise StatsFormatError(f"stats header: data_offset {data_off} overlaps the descriptors (end {desc_end})")
        if id_off < desc_off < id_off + name_size:
            raise StatsFormatError("stats header: id string overlaps the descriptors")
        self._buf = buf
        self.name_size, self.num_desc = name_size, num_desc
        self.id_offset, self.desc_offset, self.data_offset = id_off, desc_off, data_off
        self._stride = stride
        self._descs: dict[str, StatDesc] | None = None
        self._data_size = 0
        # name -> (offset, number of u64s, value is a tuple), filled by locate()
        self._locs: dict[str, tuple[int, int, bool]] = {}

    @classmethod
    def parse(cls, buf: bytes) -> "StatsLayout":
        """Parse ``buf`` and check every descriptor now."""
        layout = cls(buf)
        layout.descs
        return layout

    @property
    def id(self) -> str:
        return _cstr(self._buf[self.id_offset: self.id_offset + self.name_size], "id")

    @property
    def descs(self) -> dict[str, StatDesc]:
        """Every descriptor by name (parsed and checked on first use)."""
        if self._descs is None:
            fmt = struct.Struct(f"<IhHII{self.name_size}s")
            descs: dict[str, StatDesc] = {}
            block = self._buf[self.desc_offset: self.desc_offset + self.num_desc * self._stride]
            for i, (flags, exponent, size, offset, bucket, raw) in enumerate(fmt.iter_unpack(block)):
                d = _checked_desc(i, flags, exponent, size, offset, bucket, raw)
                if d.name in descs:
                    raise StatsFormatError(f"stat {d.name!r} described twice")
                descs[d.name] = d
            self._data_size = max((d.offset + 8 * d.size for d in descs.values()), default=0)
            self._descs = descs
        return self._descs

    @property
    def data_size(self) -> int:
        self.descs
        return self._data_size

    def locate(self, name: str) -> tuple[int, int, bool] | None:
        """(offset in the data block, number of u64 values, value is a tuple) of stat ``name``, or None."""
        loc = self._locs.get(name)
        if loc is None:
            try:
                key = name.encode("ascii")
            except (UnicodeEncodeError, AttributeError):
                return None
            i = lib.kvmpy_stats_find(self._buf, len(self._buf), self.desc_offset, self.num_desc, self._stride,
                                     self.name_size, key) if b"\0" not in key else -1
            if i < 0:
                return None
            base = self.desc_offset + i * self._stride
            d = _checked_desc(i, *_DESC.unpack_from(self._buf, base),
                              self._buf[base + DESC_SIZE: base + self._stride])
            loc = self._locs[name] = (d.offset, d.size, d.is_histogram or d.size > 1)
        return loc

    def decode(self, data: bytes) -> dict[str, Value]:
        """Values of every stat from the data block ``data``."""
        if len(data) < self.data_size:
            raise StatsFormatError(f"stats data truncated: {len(data)} < {self.data_size} bytes")
        return {name: _value(d.offset, d.size, d.is_histogram or d.size > 1, data)
                for name, d in self.descs.items()}


def _value(offset: int, size: int, as_tuple: bool, data: bytes, base: int = 0) -> Value:
    if not as_tuple:
        return int.from_bytes(data[offset - base: offset - base + 8], "little")
    return struct.unpack_from(f"<{size}Q", data, offset - base)


def _checked_desc(i: int, flags: int, exponent: int, size: int, offset: int, bucket_size: int,
                  raw_name: bytes) -> StatDesc:
    """Descriptor ``i`` as a StatDesc; StatsFormatError if any field is out of the ABI."""
    name = _cstr(raw_name, f"descriptor {i} name")
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
    return StatDesc(name, TYPE_NAMES[stype], UNIT_NAMES[unit], BASE_NAMES[base], exponent, size, offset,
                    bucket_size, flags)


def _cstr(raw: bytes, what: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise StatsFormatError(f"stats {what} is not NUL-terminated within name_size")
    if end == 0:
        raise StatsFormatError(f"stats {what} is empty")
    return raw[:end].decode("ascii", "replace")


class Snapshot(Mapping):
    """Stat name → value at one moment. ``b - a`` gives per-stat deltas (histograms per bucket).

    A snapshot read from a stats fd keeps the raw data block and decodes a value when
    it is looked up (all of them on the first iteration), so taking one costs one pread.
    """

    __slots__ = ("_values", "_layout", "_data")

    def __init__(self, values: Mapping[str, Value] | None = None) -> None:
        self._values: dict[str, Value] | None = dict(values or {})
        self._layout: StatsLayout | None = None
        self._data = b""

    @classmethod
    def of_data(cls, layout: StatsLayout, data: bytes) -> "Snapshot":
        """The snapshot of the data block ``data`` read from a fd with ``layout``."""
        if len(data) < layout.data_size:
            raise StatsFormatError(f"stats data truncated: {len(data)} < {layout.data_size} bytes")
        snap = cls.__new__(cls)
        snap._values, snap._layout, snap._data = None, layout, data
        return snap

    def _all(self) -> dict[str, Value]:
        if self._values is None:
            self._values = self._layout.decode(self._data)
        return self._values

    def __getitem__(self, name: str) -> Value:
        if self._values is None:
            loc = self._layout.locate(name) if isinstance(name, str) else None
            if loc is None:
                raise KeyError(name)
            return _value(*loc, self._data)
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"Snapshot({self._all()!r})"

    def __sub__(self, other: Mapping[str, Value]) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for name, v in self._all().items():
            o = other.get(name)
            if o is None:
                continue
            out[name] = tuple(x - y for x, y in zip(v, o)) if isinstance(v, tuple) else v - o
        return out


class _Fd:
    """A file descriptor closed once: by ``close()``, or when collected (cheaper to set up than
    weakref.finalize, which matters for a stats fd opened per measurement)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self, _close=os.close) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close(fd)

    __del__ = close


class Stats:
    """A VM's or vCPU's binary stats fd. Owns the fd; ``close()`` (or garbage collection) releases it."""

    def __init__(self, fd: int, owner: str) -> None:
        self.fd = fd
        self.owner = owner
        self._fd = _Fd(fd)
        try:
            # Header, id and descriptors usually fit in the first read.
            meta = os.pread(fd, _FIRST_READ, 0)
            if len(meta) < HEADER_SIZE:
                raise StatsFormatError(f"{owner}: stats header truncated")
            _flags, name_size, num_desc, id_off, desc_off, data_off = _HEADER.unpack_from(meta)
            # Everything before the data block: header, id and descriptors.
            meta_len = max(data_off, desc_off + num_desc * (DESC_SIZE + name_size), id_off + name_size)
            self.layout = StatsLayout(meta[:meta_len] if meta_len <= len(meta) else os.pread(fd, meta_len, 0))
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
            raise self._no_stat(name) from None

    def _no_stat(self, name: str) -> KeyError:
        return KeyError(f"{self.owner} has no stat {name!r} (it has: {', '.join(sorted(self.layout.descs))})")

    def has(self, name: str) -> bool:
        return self.layout.locate(name) is not None

    def read(self, name: str) -> Value:
        """Current value of ``name`` (a tuple for histograms and arrays)."""
        loc = self.layout.locate(name)
        if loc is None:
            raise self._no_stat(name)
        offset, size, as_tuple = loc
        raw = os.pread(self._open_fd(), 8 * size, self.layout.data_offset + offset)
        if len(raw) < 8 * size:
            raise StatsFormatError(f"{self.owner}: stat {name!r}: read {len(raw)} of {8 * size} bytes")
        return _value(offset, size, as_tuple, raw, offset)

    def snapshot(self) -> Snapshot:
        """All stats, read with one pread so they are mutually consistent as far as KVM allows."""
        layout = self.layout
        return Snapshot.of_data(layout, os.pread(self._open_fd(), layout.data_size, layout.data_offset))

    def _open_fd(self) -> int:
        if self.fd < 0:
            raise KvmError(f"{self.owner}: stats read after close")
        return self.fd

    def close(self) -> None:
        self._fd.close()
        self.fd = -1

    def __enter__(self) -> "Stats":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_FIRST_READ = 4096
