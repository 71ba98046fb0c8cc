"""KVM binary statistics (KVM_GET_STATS_FD): read a VM's or vCPU's values by name, or all at once.

The fd's format (header, id, descriptors) is parsed by kvmpy.stats_layout, once per kernel.
"""
from __future__ import annotations

import errno
import os
import struct
from collections.abc import Mapping
from typing import Callable, Iterator

from kvmpy.abi import ffi, lib
from kvmpy.errors import KvmError
from kvmpy.stats_layout import HEADER_SIZE, StatDesc, StatsFormatError, StatsLayout, Value, meta_size, value_at

try:
    from kvmpy._stats_snapshot import SnapshotBase, SnapshotReader
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "kvmpy's compiled stats reader (kvmpy._stats_snapshot) is missing: install kvmpy with "
        "`pip install .`, or `pip install -e .` in the source tree") from exc


class Snapshot(SnapshotBase, Mapping):
    """Stat name → value at one moment. ``b - a`` gives per-stat deltas (histograms per bucket).

    A snapshot read from a stats fd keeps the raw data block and decodes a value when
    it is looked up (all of them on the first iteration), so taking one costs one pread.
    Its fields live in C (kvmpy/_stats_snapshot.c), which makes the read ones.
    """

    __slots__ = ()

    def __init__(self, values: Mapping[str, Value] | None = None) -> None:
        self._values = dict(values or {})

    def _all(self) -> dict[str, Value]:
        try:
            return self._values
        except AttributeError:      # read from a fd: decoded on first use
            self._values = self._layout.decode(self._data)
            return self._values

    def __getitem__(self, name: str) -> Value:
        try:
            values = self._values
        except AttributeError:
            loc = self._layout.locate(name) if isinstance(name, str) else None
            if loc is None:
                raise KeyError(name) from None
            return value_at(*loc, self._data)
        return values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"Snapshot({self._all()!r})"

    def __reduce__(self):
        """Copies and pickles carry the values (not the fd's layout and raw block)."""
        return Snapshot, (self._all(),)

    def __sub__(self, other: Mapping[str, Value]) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for name, v in self._all().items():
            o = other.get(name)
            if o is None:
                continue
            out[name] = tuple(x - y for x, y in zip(v, o)) if isinstance(v, tuple) else v - o
        return out


def _snapshot_failed(owner: str, closed: bool, err: int, got: int, size: int) -> None:
    """Raise the error of a failed ``Stats.snapshot()`` read (called by its C reader)."""
    if closed:
        raise KvmError(f"{owner}: stats read after close")
    if err:
        raise KvmError(f"{owner}: reading the stats: {os.strerror(err)}")
    raise StatsFormatError(f"{owner}: stats data truncated: {got} < {size} bytes")


class Stats:
    """A VM's or vCPU's binary stats fd. Owns the fd; ``close()`` (or garbage collection) releases it.

    Opening one costs a pread and a header check (in C); ``read(name)`` a lookup (in C, once
    per name) and a pread; ``snapshot()`` one pread. The descriptors are parsed once per
    kernel: a fd whose header and descriptors are byte for byte those of one parsed before
    shares its ``layout`` (and the lookups made through it).

    ``snapshot()`` returns every stat as a :class:`Snapshot`, read with one pread so the
    values are mutually consistent as far as KVM allows. It is a C callable
    (kvmpy/_stats_snapshot.c): a stats poll's cost is then the pread's.
    """

    __slots__ = ("fd", "owner", "layout", "snapshot", "_meta", "_locs", "_data_offset")

    snapshot: Callable[[], Snapshot]

    def __init__(self, fd: int, owner: str) -> None:
        self.fd = fd
        self.owner = owner
        try:
            # Header, id and descriptors (and the data block) usually fit in the first read.
            meta = _pread(fd, _FIRST_READ, 0)
            known = _LAYOUTS.get(meta[:HEADER_SIZE])
            if known is None or not meta.startswith(known.desc_block, known.desc_offset):
                if len(meta) == _FIRST_READ and lib.kvmpy_stats_check_header(meta, _FIRST_READ):
                    meta = _pread(fd, meta_size(meta), 0)
                known = _LAYOUTS[meta[:HEADER_SIZE]] = StatsLayout(meta)
            self.layout = known
            self._meta = meta
            self._locs, self._data_offset = known.locs, known.data_offset
            self.snapshot = SnapshotReader(fd, known.data_offset, known, Snapshot, owner, _snapshot_failed)
        except StatsFormatError as e:
            self.close()
            raise StatsFormatError(f"{owner}: {e}") from None
        except BaseException:
            self.close()
            raise

    @property
    def id(self) -> str:
        """The fd's id string (e.g. kvm-PID/VMFD)."""
        return self.layout.id_in(self._meta)

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
        loc = self._locs.get(name) or self.layout.locate(name)
        if loc is None:
            raise self._no_stat(name)
        offset, size, as_tuple = loc
        fd = self.fd
        if fd < 0:
            raise KvmError(f"{self.owner}: stats read after close")
        if not as_tuple:        # one C call: the pread and the value, no bytes object
            value = _read_u64(fd, self._data_offset + offset)
            if value != _U64_MAX or not ffi.errno:
                return value
            if ffi.errno != errno.EIO:
                raise KvmError(f"{self.owner}: reading stat {name!r}: {os.strerror(ffi.errno)}")
        else:
            raw = _pread(fd, 8 * size, self._data_offset + offset)
            if len(raw) == 8 * size:
                return struct.unpack(f"<{size}Q", raw)
        raise StatsFormatError(f"{self.owner}: stat {name!r}: a short read (fewer than {8 * size} bytes)")

    def close(self, _close=os.close) -> None:
        fd, self.fd = self.fd, -1
        try:
            self.snapshot.close()
        except AttributeError:      # __init__ failed before making it
            pass
        if fd >= 0:
            _close(fd)

    __del__ = close

    def __enter__(self) -> "Stats":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_pread = os.pread
_read_u64 = lib.kvmpy_stats_read_u64
_U64_MAX = (1 << 64) - 1
_FIRST_READ = 4096
# Parsed layouts by header bytes; reused for a fd whose descriptors are the same bytes.
_LAYOUTS: dict[bytes, StatsLayout] = {}
