"""Stats.snapshot()'s C reader (kvmpy/_stats_snapshot.c) on plain files: what it reads, every
way a read fails, bad construction, and that snapshots are freed (no /dev/kvm)."""
from __future__ import annotations

import copy
import gc
import os
import pickle
import tracemalloc

import pytest

from kvmpy._stats_snapshot import SnapshotBase, SnapshotReader
from kvmpy.errors import KvmError
from kvmpy.stats import Snapshot, _snapshot_failed
from kvmpy.stats_layout import StatsFormatError


class FakeLayout:
    """What the reader asks of a layout: data_size, once."""

    def __init__(self, size: int) -> None:
        self.size, self.asked = size, 0

    @property
    def data_size(self) -> int:
        self.asked += 1
        if isinstance(self.size, BaseException):
            raise self.size
        return self.size

    def decode(self, data: bytes) -> dict:
        return {"first": data[0], "len": len(data)}


@pytest.fixture
def block(tmp_path):
    """A file whose bytes 16.. are a 64-byte 'data block', open read-only."""
    path = tmp_path / "stats"
    path.write_bytes(bytes(16) + bytes(range(64)))
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def reader(fd: int, layout, offset: int = 16) -> SnapshotReader:
    return SnapshotReader(fd, offset, layout, Snapshot, "vcpu 0", _snapshot_failed)


def test_a_snapshot_is_the_data_block_with_its_layout(block):
    layout = FakeLayout(64)
    read = reader(block, layout)
    a, b = read(), read()
    assert type(a) is Snapshot and a is not b and a._data is not b._data
    assert a._data == bytes(range(64)) and a._layout is layout and layout.asked == 1
    assert dict(a) == {"first": 0, "len": 64} and a._values == {"first": 0, "len": 64}
    assert not read.closed


def test_a_closed_reader_does_not_read(block):
    read = reader(block, FakeLayout(64))
    read.close()
    assert read.closed
    with pytest.raises(KvmError, match="^vcpu 0: stats read after close$"):
        read()


def test_a_short_read_is_a_format_error(block):
    with pytest.raises(StatsFormatError, match="^vcpu 0: stats data truncated: 64 < 65 bytes$"):
        reader(block, FakeLayout(65))()
    with pytest.raises(StatsFormatError, match="truncated: 0 < 8 bytes"):
        reader(block, FakeLayout(8), offset=1 << 40)()


def test_a_failed_pread_names_the_owner_and_errno(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(KvmError, match=f"^vcpu 0: reading the stats: {os.strerror(21)}$"):
            reader(fd, FakeLayout(8))()
    finally:
        os.close(fd)


def test_a_layout_that_cannot_say_its_size_is_asked_again(block):
    layout = FakeLayout(StatsFormatError("stat 'x': size 0"))
    read = reader(block, layout)
    for _ in range(2):
        with pytest.raises(StatsFormatError, match="size 0"):
            read()
    assert layout.asked == 2
    layout.size = -1
    with pytest.raises(ValueError, match="negative data_size"):
        read()


@pytest.mark.parametrize("args, error, match", [
    ((3, 0, None, dict, "x", _snapshot_failed), TypeError, "subclass of SnapshotBase"),
    ((3, 0, None, 5, "x", _snapshot_failed), TypeError, "must be type"),
    ((-1, 0, None, Snapshot, "x", _snapshot_failed), ValueError, "must be >= 0"),
    ((3, -8, None, Snapshot, "x", _snapshot_failed), ValueError, "must be >= 0"),
    ((3, 0, None, Snapshot, b"x", _snapshot_failed), TypeError, "must be str"),
    ((3, 0, None, Snapshot, "x", None), TypeError, "fail must be callable"),
    ((3.0, 0, None, Snapshot, "x", _snapshot_failed), TypeError, "integer"),
])
def test_bad_construction_is_refused(args, error, match):
    with pytest.raises(error, match=match):
        SnapshotReader(*args)


def test_misuse_raises_and_never_crashes(block):
    with pytest.raises(ValueError, match="not initialised"):
        SnapshotReader.__new__(SnapshotReader)()
    read = reader(block, FakeLayout(64))
    with pytest.raises(TypeError, match="takes no arguments"):
        read(1)
    with pytest.raises(TypeError, match="takes no arguments"):
        read(x=1)
    lazy = SnapshotReader(block, 16, FakeLayout(64), Snapshot, "vcpu 0", lambda *a: None)
    lazy.close()
    with pytest.raises(SystemError, match="returned instead of raising"):
        lazy()
    snap = read()
    with pytest.raises(AttributeError):
        snap._data = b""            # what was read stays what was read
    with pytest.raises(AttributeError):
        Snapshot({"a": 1})._layout  # a snapshot made from values has none


def test_snapshots_made_from_values_copy_and_pickle_as_values(block):
    made = Snapshot({"exits": 3, "hist": (1, 2)})
    read = reader(block, FakeLayout(64))()
    for snap, values in ((made, {"exits": 3, "hist": (1, 2)}), (read, {"first": 0, "len": 64})):
        for twin in (copy.copy(snap), copy.deepcopy(snap), pickle.loads(pickle.dumps(snap))):
            assert type(twin) is Snapshot and dict(twin) == values and twin == snap
    assert made - Snapshot({"exits": 1, "hist": (1, 1)}) == {"exits": 2, "hist": (0, 1)}
    assert issubclass(Snapshot, SnapshotBase)


def test_snapshots_are_freed_even_in_a_cycle(block):
    read = reader(block, FakeLayout(64))
    freed = []

    class Canary:
        def __del__(self):
            freed.append(True)

    snap = read()
    snap._values = {"me": snap, "canary": Canary()}
    del snap
    gc.collect()
    assert freed == [True]
    read()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20_000):
            read()
        gc.collect()
        assert tracemalloc.get_traced_memory()[0] - before < 16 << 10
    finally:
        tracemalloc.stop()
