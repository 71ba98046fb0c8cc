"""The C helpers of _bulk.c against plain-Python references, on random inputs (no /dev/kvm)."""
from __future__ import annotations

import random
import struct

import pytest

from kvmpy.abi import ffi, lib
from kvmpy.bitmap import DirtyBitmap
from kvmpy.memory import PAGE_1G, PAGE_2M, PAGE_4K
from kvmpy.stats_layout import DESC_SIZE, HEADER_SIZE, StatsLayout
from kvmpy.x86.paging import PageTableBuilder, PagingError, walk
from kvmpy.x86.physmem import FlatMemory

DIRTY, RESET = lib.KVM_DIRTY_GFN_F_DIRTY, lib.KVM_DIRTY_GFN_F_RESET


@pytest.mark.parametrize("seed", range(8))
def test_bitmap_pages_match_a_bit_by_bit_scan(seed):
    rng = random.Random(seed)
    npages = rng.choice([1, 63, 64, 65, 1000, 4096 * 8 + 3])
    pages = rng.sample(range(npages), rng.randint(0, npages))
    bm = DirtyBitmap.from_pages(npages, pages)
    expect = [p for p in range(npages) if bm.buffer[p >> 3] >> (p & 7) & 1]
    assert bm.pages_array().tolist() == expect == sorted(pages)
    assert bm.pages() == expect and bm.count() == len(expect)
    assert bm.pages_array().typecode == "Q"


@pytest.mark.parametrize("room", [0, 1, 63, 64, 65, 200, 299, 300, 301])
def test_set_bits_writes_no_more_than_its_room_and_counts_them_all(room):
    # The words can change between pages_array's count and its scan (the GIL is
    # released), so the scan must stop at out_len wherever it falls in a word.
    rng = random.Random(room)
    pages = sorted(rng.sample(range(4096), 300))
    bm = DirtyBitmap.from_pages(4096, pages)
    guard = 0xDEADBEEF
    out = ffi.new("uint64_t[]", room + 4)
    for i in range(room + 4):
        out[i] = guard
    words = ffi.from_buffer("uint64_t[]", bm.buffer)
    assert lib.kvmpy_set_bits(words, 64, out, room) == 300
    assert list(out[0: min(room, 300)]) == pages[:room]
    assert all(out[i] == guard for i in range(min(room, 300), room + 4))


def _ring_reference(entries: list[list[int]], fetch: int, limit: int) -> list[tuple[int, int]]:
    """The harvest loop as Python did it before the C helper (flags, slot, offset per entry)."""
    out, mask = [], len(entries) - 1
    while len(out) < limit:
        e = entries[(fetch + len(out)) & mask]
        if not e[0] & DIRTY:
            break
        out.append((e[1], e[2]))
        e[0] = RESET
    return out


@pytest.mark.parametrize("seed", range(16))
def test_ring_harvest_matches_the_python_loop(seed):
    rng = random.Random(seed)
    n = rng.choice([16, 64, 512, 4096])
    entries = [[rng.choice([0, DIRTY, DIRTY, DIRTY, RESET, DIRTY | RESET]), rng.getrandbits(32), rng.getrandbits(64)]
               for _ in range(n)]
    fetch = rng.getrandbits(32)
    limit = rng.choice([0, 1, n // 3, n, n + 5])
    gfns = ffi.new("struct kvm_dirty_gfn[]", n)
    for g, (flags, slot, offset) in zip(gfns, entries):
        g.flags, g.slot, g.offset = flags, slot, offset
    slots, offsets = ffi.new("uint32_t[]", n), ffi.new("uint64_t[]", n)
    got = lib.kvmpy_ring_harvest(gfns, n - 1, fetch, min(limit, n), slots, offsets)
    expect = _ring_reference(entries, fetch, min(limit, n))
    assert [(slots[i], offsets[i]) for i in range(got)] == expect
    assert [g.flags for g in gfns] == [e[0] for e in entries]     # RESET exactly where harvested


def _stats_image(names: list[str], name_size: int = 48) -> bytes:
    desc_off = HEADER_SIZE + name_size
    data_off = desc_off + len(names) * (DESC_SIZE + name_size)
    out = struct.pack("<6I", 0, name_size, len(names), HEADER_SIZE, desc_off, data_off)
    out += b"kvm-1".ljust(name_size, b"\0")
    for i, n in enumerate(names):
        out += struct.pack("<IhHII", lib.KVM_STATS_TYPE_CUMULATIVE, 0, 1 + i % 3, 8 * i, 0)
        out += n.encode()[:name_size].ljust(name_size, b"\0")
    return out


@pytest.mark.parametrize("seed", range(8))
def test_stats_lookup_matches_the_full_parse(seed):
    rng = random.Random(seed)
    names = list({"".join(rng.choice("abcxyz_") for _ in range(rng.randint(1, 20))) for _ in range(60)})
    layout = StatsLayout(_stats_image(names))
    full = StatsLayout.parse(_stats_image(names)).descs
    for name in names + ["", "nope", names[0] + "x", names[0][:-1], "a" * 60, "x\0y"]:
        loc = layout.locate(name)
        d = full.get(name)
        assert loc == (None if d is None else (d.offset, d.size, d.size > 1)), name


def test_stats_lookup_never_matches_an_unterminated_name():
    image = _stats_image(["q" * 48, "ok"])     # the first name fills name_size: no NUL
    assert StatsLayout(image).locate("ok") == (8, 2, True)
    assert StatsLayout(image).locate("q" * 47) is None
    assert lib.kvmpy_stats_locate(image, len(image), b"ok") == 8 | 2 << 32 | 1 << 48
    assert lib.kvmpy_stats_locate(image, len(image) - 1, b"ok") == lib.KVMPY_STATS_BAD_HEADER


def _python_tables(mem: FlatMemory, requests, pool: int, pool_size: int) -> PageTableBuilder:
    """The same requests through map_page only (the Python reference)."""
    pt = PageTableBuilder(mem, pool, pool_size, phys_bits=46)
    for gva, gpa, size, page_size, flags in requests:
        for off in range(0, size, page_size):
            pt.map_page(gva + off, gpa + off, page_size, **flags)
    return pt


@pytest.mark.parametrize("seed", range(10))
def test_page_tables_in_c_match_map_page(seed):
    rng = random.Random(seed)
    requests, used = [], set()
    for _ in range(rng.randint(1, 6)):
        page_size = rng.choice([PAGE_4K, PAGE_4K, PAGE_2M, PAGE_1G])
        npages = rng.randint(1, 700 if page_size == PAGE_4K else 20)
        region = rng.randrange(1, 200)      # one 64 GiB-aligned GVA region per request: no overlaps
        if region in used:
            continue
        used.add(region)
        half = rng.choice([0, 0xFFFF_8000_0000_0000])
        gva = half + (region << 36) + rng.randrange(0, (1 << 35) // page_size) * page_size
        gpa = rng.randrange(0, (1 << 40) // page_size) * page_size
        flags = {"writable": rng.random() < 0.7, "user": rng.random() < 0.5, "nx": rng.random() < 0.3,
                 "global_": rng.random() < 0.2}
        requests.append((gva, gpa, npages * page_size, page_size, flags))
    pool, pool_size = 0x10000, 2000 * PAGE_4K
    fast_mem, slow_mem = FlatMemory(pool + pool_size), FlatMemory(pool + pool_size)
    fast = PageTableBuilder(fast_mem, pool, pool_size, phys_bits=46)
    for gva, gpa, size, page_size, flags in requests:
        fast.map(gva, gpa, size, page_size, **flags)
    slow = _python_tables(slow_mem, requests, pool, pool_size)
    assert fast.pages_used == slow.pages_used
    # Tables may be allocated in another order: compare what every mapped page translates to.
    for gva, gpa, size, page_size, _ in requests:
        for off in sorted({0, size - page_size, rng.randrange(0, size // page_size) * page_size}):
            assert walk(fast_mem, fast.cr3, gva + off) == walk(slow_mem, slow.cr3, gva + off)


def test_page_tables_span_pools_and_report_errors_like_map_page():
    mem = FlatMemory(0x100000 + 64 * PAGE_4K)
    pt = PageTableBuilder(mem, 0x10000, 3 * PAGE_4K, phys_bits=46)    # PML4 + 2 tables
    pt.add_pool(0x100000, 64 * PAGE_4K)
    pt.map(0x4000_0000, 0x20_0000, 2000 * PAGE_4K)                    # 4 PTs: needs the second pool
    assert pt.pages_used == 1 + 1 + 1 + 4
    assert walk(mem, pt.cr3, 0x4000_0000 + 1999 * PAGE_4K).gpa == 0x20_0000 + 1999 * PAGE_4K
    assert PageTableBuilder.tables_needed(0x4000_0000, 2000 * PAGE_4K) >= 6
    with pytest.raises(PagingError, match="would replace a page table"):
        pt.map(0x4000_0000, 0, PAGE_2M, PAGE_2M)
    pt.map(0x8000_0000, 0, 2 * PAGE_2M, PAGE_2M)
    with pytest.raises(PagingError, match="inside a bigger page"):
        pt.map(0x8000_0000 + PAGE_2M, 0, 4 * PAGE_4K)
    with pytest.raises(PagingError, match="overlaps pool"):
        pt.add_pool(0x100000 + PAGE_4K, PAGE_4K)
    small = PageTableBuilder(FlatMemory(0x10000 + 2 * PAGE_4K), 0x10000, 2 * PAGE_4K, phys_bits=46)
    with pytest.raises(PagingError, match="exhausted"):
        small.map(0, 0, 4 * PAGE_4K)
