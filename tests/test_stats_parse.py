"""Binary stats parsing on crafted byte streams: every type, units, and bad headers."""
from __future__ import annotations

import struct

import pytest

from kvmpy.abi import lib
from kvmpy.stats import Snapshot
from kvmpy.stats_layout import DESC_SIZE, HEADER_SIZE, StatsFormatError, StatsLayout

NAME_SIZE = 48


def _flags(stype, unit=lib.KVM_STATS_UNIT_NONE, base=lib.KVM_STATS_BASE_POW10):
    return stype | unit | base


def craft(descs, ident="kvm-1234", name_size=NAME_SIZE, values=None):
    """Build a stats fd image: header | id | descriptors | data (the layout KVM documents)."""
    id_off = HEADER_SIZE
    desc_off = id_off + name_size
    desc_stride = DESC_SIZE + name_size
    data_off = desc_off + len(descs) * desc_stride
    out = bytearray(struct.pack("<6I", 0, name_size, len(descs), id_off, desc_off, data_off))
    out += ident.encode().ljust(name_size, b"\0")
    data = bytearray()
    for name, flags, exp, size, bucket in descs:
        off = len(data)
        out += struct.pack("<IhHII", flags, exp, size, off, bucket) + name.encode().ljust(name_size, b"\0")
        vals = (values or {}).get(name, list(range(1, size + 1)))
        data += struct.pack(f"<{size}Q", *vals)
    return bytes(out), bytes(data)


ALL_TYPES = [
    ("exits", _flags(lib.KVM_STATS_TYPE_CUMULATIVE), 0, 1, 0),
    ("pages_4k", _flags(lib.KVM_STATS_TYPE_INSTANT), 0, 1, 0),
    ("max_rmap", _flags(lib.KVM_STATS_TYPE_PEAK), 0, 1, 0),
    ("halt_hist", _flags(lib.KVM_STATS_TYPE_LINEAR_HIST, lib.KVM_STATS_UNIT_SECONDS), -9, 4, 100),
    ("wait_hist", _flags(lib.KVM_STATS_TYPE_LOG_HIST, lib.KVM_STATS_UNIT_SECONDS), -9, 3, 0),
    ("mem_bytes", _flags(lib.KVM_STATS_TYPE_INSTANT, lib.KVM_STATS_UNIT_BYTES, lib.KVM_STATS_BASE_POW2), 10, 1, 0),
    ("cycles", _flags(lib.KVM_STATS_TYPE_CUMULATIVE, lib.KVM_STATS_UNIT_CYCLES), 0, 1, 0),
    ("flag", _flags(lib.KVM_STATS_TYPE_INSTANT, lib.KVM_STATS_UNIT_BOOLEAN), 0, 1, 0),
]


def test_parse_every_type():
    meta, data = craft(ALL_TYPES, values={"exits": [7], "halt_hist": [1, 2, 3, 4]})
    layout = StatsLayout.parse(meta)
    assert layout.id == "kvm-1234"
    d = layout.descs
    assert [d[n].type for n in ("exits", "pages_4k", "max_rmap", "halt_hist", "wait_hist")] == [
        "cumulative", "instant", "peak", "linear_hist", "log_hist"]
    assert d["halt_hist"].unit == "seconds" and d["halt_hist"].exponent == -9 and d["halt_hist"].bucket_size == 100
    assert d["mem_bytes"].unit == "bytes" and d["mem_bytes"].base == 2 and d["mem_bytes"].exponent == 10
    assert d["cycles"].unit == "cycles" and d["flag"].unit == "boolean"
    vals = layout.decode(data)
    assert vals["exits"] == 7
    assert vals["halt_hist"] == (1, 2, 3, 4)
    assert vals["wait_hist"] == (1, 2, 3)


# The SPTE counts, their descriptors out of name order and values all different: a parser that
# pairs a name with another stat's offset (e.g. pages_4k with pages_2m's) reads the wrong value.
PAGE_STATS = [
    ("pages_1g", _flags(lib.KVM_STATS_TYPE_INSTANT), 0, 1, 0),
    ("pages_4k", _flags(lib.KVM_STATS_TYPE_INSTANT), 0, 1, 0),
    ("mmu_unsync", _flags(lib.KVM_STATS_TYPE_INSTANT), 0, 1, 0),
    ("pages_2m", _flags(lib.KVM_STATS_TYPE_INSTANT), 0, 1, 0),
]


def test_each_value_belongs_to_its_name():
    values = {"pages_1g": [1], "pages_4k": [4096], "mmu_unsync": [7], "pages_2m": [512]}
    meta, data = craft(PAGE_STATS, values=values)
    layout = StatsLayout.parse(meta)
    # The values sit in descriptor order in the data block, each at its descriptor's offset.
    assert [layout.descs[n].offset for n, *_ in PAGE_STATS] == [0, 8, 16, 24]
    assert layout.decode(data) == {name: v[0] for name, v in values.items()}
    assert {n: StatsLayout._value(layout.descs[n], data) for n in values} == {n: v[0] for n, v in values.items()}


def test_snapshot_diff():
    a = Snapshot({"exits": 5, "hist": (1, 1)})
    b = Snapshot({"exits": 9, "hist": (1, 4), "new": 3})
    assert b - a == {"exits": 4, "hist": (0, 3)}


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m[:10], "truncated"),
    (lambda m: struct.pack("<6I", 0, 0, 1, 24, 72, 200) + m[24:], "name_size is 0"),
    (lambda m: struct.pack("<6I", 0, NAME_SIZE, 50, 24, 72, 200) + m[24:], "run past the buffer"),
    (lambda m: struct.pack("<6I", 0, NAME_SIZE, 1, 24, 72, 80) + m[24:], "overlaps the descriptors"),
    (lambda m: struct.pack("<6I", 0, NAME_SIZE, 1, 9999, 72, 200) + m[24:], "id_offset"),
])
def test_bad_headers_rejected(mutate, message):
    meta, _ = craft(ALL_TYPES[:1])
    with pytest.raises(StatsFormatError, match=message):
        StatsLayout.parse(mutate(meta))


def test_bad_descriptor_type_unit_base():
    for flags, what in [(0xF, "unknown type"), (lib.KVM_STATS_TYPE_INSTANT | (0xE << lib.KVM_STATS_UNIT_SHIFT), "unknown unit"),
                        (lib.KVM_STATS_TYPE_INSTANT | (0xE << lib.KVM_STATS_BASE_SHIFT), "unknown base")]:
        meta, _ = craft([("x", flags, 0, 1, 0)])
        with pytest.raises(StatsFormatError, match=what):
            StatsLayout.parse(meta)


def test_unterminated_name_and_zero_size():
    meta, _ = craft([("y" * NAME_SIZE, _flags(lib.KVM_STATS_TYPE_INSTANT), 0, 1, 0)])
    with pytest.raises(StatsFormatError, match="NUL-terminated"):
        StatsLayout.parse(meta)
    meta, _ = craft([("z", _flags(lib.KVM_STATS_TYPE_INSTANT), 0, 0, 0)])
    with pytest.raises(StatsFormatError, match="size 0"):
        StatsLayout.parse(meta)


def test_truncated_data():
    meta, data = craft(ALL_TYPES)
    layout = StatsLayout.parse(meta)
    with pytest.raises(StatsFormatError, match="data truncated"):
        layout.decode(data[:-8])


def test_a_descriptor_table_size_that_wraps_around_2_64_is_rejected_in_c():
    """num_desc * (16 + name_size) wrapped in u64 (name_size 2^32-1, num_desc 2^32-14: the
    table "ended" inside a 4 GiB image), so the C check passed and the name lookup walked
    far past the buffer. The check reads only the header: a claimed length is enough here."""
    name_size, num_desc = (1 << 32) - 1, (1 << 32) - 14
    header = struct.pack("<6I", 0, name_size, num_desc, HEADER_SIZE, HEADER_SIZE, (1 << 32) - 100)
    claimed = HEADER_SIZE + name_size + 64
    assert lib.kvmpy_stats_check_header(header, claimed) == lib.KVMPY_STATS_BAD_HEADER
