"""Page-table builder and walker, checked translation by translation (no /dev/kvm)."""
from __future__ import annotations

import struct

import pytest

from kvmpy.memory import PAGE_1G, PAGE_2M, PAGE_4K
from kvmpy.x86.paging import PTE_NX, PTE_P, PTE_PS, PTE_RW, PTE_US, PageTableBuilder, PagingError, is_canonical, walk
from kvmpy.x86.physmem import FlatMemory

POOL = 0x10000


def builder(pool_pages: int = 64) -> PageTableBuilder:
    return PageTableBuilder(FlatMemory(POOL + pool_pages * PAGE_4K), POOL, pool_pages * PAGE_4K, phys_bits=46)


def test_every_4k_translation():
    pt = builder()
    pt.map(0x7000_0000, 0x20_0000, 300 * PAGE_4K)  # crosses a page-table boundary (512 entries)
    pt.map(0xFFFF_8000_0000_0000, 0x1234_5000, 3 * PAGE_4K, writable=False, user=True, nx=True)
    for i in range(300):
        for off in (0, 0x7FF, 0xFFF):
            t = pt.translate(0x7000_0000 + i * PAGE_4K + off)
            assert (t.gpa, t.page_size, t.writable, t.user, t.nx) == (0x20_0000 + i * PAGE_4K + off, PAGE_4K,
                                                                      True, False, False)
    for i in range(3):
        t = pt.translate(0xFFFF_8000_0000_0000 + i * PAGE_4K + 8)
        assert (t.gpa, t.writable, t.user, t.nx) == (0x1234_5000 + i * PAGE_4K + 8, False, True, True)
    # neighbours are not mapped
    assert pt.translate(0x7000_0000 - PAGE_4K) is None
    assert pt.translate(0x7000_0000 + 300 * PAGE_4K) is None
    assert pt.translate(0xFFFF_8000_0000_0000 + 3 * PAGE_4K) is None


def test_every_2m_translation():
    pt = builder()
    pt.map(0x40_0000_0000, 0x1_0000_0000, 4 * PAGE_2M, PAGE_2M)
    for i in range(4):
        for off in range(0, PAGE_2M, PAGE_4K):
            t = pt.translate(0x40_0000_0000 + i * PAGE_2M + off + 5)
            assert (t.gpa, t.page_size) == (0x1_0000_0000 + i * PAGE_2M + off + 5, PAGE_2M)
    assert pt.translate(0x40_0000_0000 + 4 * PAGE_2M) is None


def test_every_1g_translation():
    pt = builder()
    pt.map(0x80_0000_0000, 0x8000_0000, 2 * PAGE_1G, PAGE_1G, nx=True)
    for i in range(2):
        for off in range(0, PAGE_1G, PAGE_2M):
            t = pt.translate(0x80_0000_0000 + i * PAGE_1G + off + 0x123)
            assert (t.gpa, t.page_size, t.nx) == (0x8000_0000 + i * PAGE_1G + off + 0x123, PAGE_1G, True)
    # 1G leaves need only a PML4 and a PDPT
    assert pt.pages_used == 2


def test_raw_entries_match_the_architecture():
    """Decode the tables by hand, independently of walk()."""
    pt = builder()
    gva, gpa = 0x1234_5678_9000, 0x3_4567_8000
    pt.map_page(gva, gpa, writable=False, user=True, nx=True)
    mem = pt.mem
    table = pt.cr3
    for level, shift in ((4, 39), (3, 30), (2, 21)):
        (e,) = struct.unpack("<Q", mem.read(table + 8 * ((gva >> shift) & 511), 8))
        assert e & (PTE_P | PTE_RW | PTE_US) == PTE_P | PTE_RW | PTE_US, f"level {level}"
        assert not e & (PTE_PS | PTE_NX)
        table = e & 0x000F_FFFF_FFFF_F000
    (leaf,) = struct.unpack("<Q", mem.read(table + 8 * ((gva >> 12) & 511), 8))
    assert leaf == gpa | PTE_P | PTE_US | PTE_NX
    assert pt.pages_used == 4


def test_permissions_combine_across_levels():
    pt = builder()
    pt.map_page(0x5000, 0x5000)
    t = pt.translate(0x5000)
    # Make the PML4 entry read-only and supervisor: the effective bits follow.
    pml4e = pt.cr3
    (e,) = struct.unpack("<Q", pt.mem.read(pml4e, 8))
    pt.mem.write(pml4e, struct.pack("<Q", (e & ~(PTE_RW | PTE_US)) | PTE_NX))
    t = pt.translate(0x5000)
    assert (t.writable, t.user, t.nx) == (False, False, True)


def test_remap_same_size_replaces_and_unmap_clears():
    pt = builder()
    pt.map_page(0x200000, 0x200000, PAGE_2M)
    pt.map_page(0x200000, 0x600000, PAGE_2M, writable=False)
    t = pt.translate(0x200010)
    assert (t.gpa, t.writable) == (0x600010, False)
    assert pt.unmap_page(0x200010).gpa == 0x600010
    assert pt.translate(0x200010) is None
    with pytest.raises(PagingError, match="not mapped"):
        pt.unmap_page(0x200010)


@pytest.mark.parametrize("args,match", [
    ((0x1001, 0x1000, PAGE_4K), "not aligned"),
    ((0x200000, 0x201000, PAGE_2M), "not aligned"),
    ((0x1000, 0x1000, 0x3000), "not 4K, 2M or 1G"),
    ((0x0000_8000_0000_0000, 0, PAGE_4K), "not canonical"),
    ((0x1000, 1 << 46, PAGE_4K), "beyond the 46-bit"),
])
def test_bad_requests(args, match):
    with pytest.raises(PagingError, match=match):
        builder().map_page(*args)


def test_overlapping_sizes_rejected():
    pt = builder()
    pt.map_page(0x400000, 0x400000, PAGE_2M)
    with pytest.raises(PagingError, match="already inside a 2 MiB page"):
        pt.map_page(0x401000, 0x401000, PAGE_4K)
    pt.map_page(0x800000, 0x800000, PAGE_4K)
    with pytest.raises(PagingError, match="would replace a page table"):
        pt.map_page(0x800000, 0x800000, PAGE_2M)
    with pytest.raises(PagingError, match="not a positive multiple"):
        pt.map(0x1000, 0x1000, 0x1800)


def test_pool_exhaustion():
    pt = builder(pool_pages=4)
    pt.map_page(0x1000, 0x1000)  # PML4 + PDPT + PD + PT: pool full
    pt.map_page(0x2000, 0x2000)  # same PT: no new page
    with pytest.raises(PagingError, match="exhausted"):
        pt.map_page(0x400000, 0x400000)  # needs a new PT


def test_canonical_and_walk_errors():
    assert is_canonical(0x7FFF_FFFF_FFFF) and is_canonical(0xFFFF_8000_0000_0000)
    assert not is_canonical(0x8000_0000_0000)
    pt = builder()
    with pytest.raises(PagingError, match="not canonical"):
        walk(pt.mem, pt.cr3, 0x1_0000_0000_0000)


class _ViewMemory(FlatMemory):
    """Guest memory whose gpa_view a test controls (read-only, or clamped like a naive slice)."""

    def __init__(self, size: int, *, read_only: bool = False, view_end: int | None = None) -> None:
        super().__init__(size)
        self.read_only, self.view_end = read_only, view_end
        self.frozen = bytes(size)

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        if self.read_only:
            return memoryview(self.frozen)[gpa: gpa + length]
        end = min(gpa + length, self.view_end if self.view_end is not None else gpa + length)
        return memoryview(self.buf)[gpa: end]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.buf[gpa: gpa + length])

    def write(self, gpa: int, data: bytes) -> None:     # the Python path writes elsewhere
        self.buf[gpa: gpa + len(data)] = data


def test_map_refuses_pool_memory_it_cannot_write_in_c():
    ro = _ViewMemory(POOL + 16 * PAGE_4K, read_only=True)
    pt = PageTableBuilder(ro, POOL, 16 * PAGE_4K, phys_bits=46)
    with pytest.raises(PagingError, match=r"pool 0x10000\+0x10000: guest memory is not writable"):
        pt.map(0x100000, 0x100000, 2 * PAGE_4K)
    assert ro.frozen == bytes(len(ro.frozen))        # the immutable bytes were not written


def test_map_refuses_a_pool_view_shorter_than_the_pool():
    # A clamping slice: C would write table pages past the view's end.
    short = _ViewMemory(POOL + 64 * PAGE_4K, view_end=POOL + PAGE_4K)
    pt = PageTableBuilder(short, POOL, 64 * PAGE_4K, phys_bits=46)
    with pytest.raises(PagingError, match=r"gave a view of 0x1000 bytes, not the pool's 0x40000"):
        pt.map(0, 0, 8 * PAGE_4K)
    assert not any(short.buf[POOL + PAGE_4K:])
    short.view_end = None                            # the builder is still usable
    pt.map(0, 0, 8 * PAGE_4K)
    assert pt.translate(7 * PAGE_4K).gpa == 7 * PAGE_4K


def test_builder_stays_consistent_after_map_exhausts_the_pools():
    mem = FlatMemory(0x400000)
    mem.write(POOL + 4 * PAGE_4K, b"PRECIOUS" * 512)    # the page right after the pool
    pt = PageTableBuilder(mem, POOL, 4 * PAGE_4K, phys_bits=46)
    with pytest.raises(PagingError, match="exhausted"):
        pt.map(0, 0, 1 << 32)                          # the C path runs out of tables
    assert pt.pages_free == 0 and pt.pages_used == 4
    with pytest.raises(PagingError, match="exhausted"):
        pt.map_page(0x80_0000_0000, 0x5000)
    pt.add_pool(0x200000, 16 * PAGE_4K)
    pte = pt.map_page(0x80_0000_0000, 0x5000)          # Python path: tables from the new pool
    assert 0x200000 <= pte < 0x210000
    pt.map(0x100_0000_0000, 0x6000, PAGE_4K)           # C path too
    assert pt.translate(0x100_0000_0000).pte_gpa >= 0x200000
    assert mem.read(POOL + 4 * PAGE_4K, 8) == b"PRECIOUS"
    assert pt.pages_free == 16 - 6


def test_map_takes_tables_from_a_pool_below_the_current_one():
    mem = FlatMemory(0x200000)
    pt = PageTableBuilder(mem, 0x100000, 4 * PAGE_4K, phys_bits=46)
    pt.add_pool(0x10000, 16 * PAGE_4K)                  # lower GPA, added before the first is full
    pt.map(0x80_0000_0000, 0, 2 * PAGE_4K)              # PDPT, PD, PT: fills the first pool
    pt.map(0x100_0000_0000, 0, 2 * PAGE_4K)             # 3 more: only the lower pool has them
    assert 0x10000 <= pt.translate(0x100_0000_0000).pte_gpa < 0x20000
    assert pt.pages_used == 7
    # and after an exhaustion by map(), a lower pool added then
    pt = PageTableBuilder(FlatMemory(0x200000), 0x100000, 4 * PAGE_4K, phys_bits=46)
    with pytest.raises(PagingError, match="exhausted"):
        pt.map(0, 0, 1 << 32)
    pt.add_pool(0x10000, 16 * PAGE_4K)
    pt.map(0x80_0000_0000, 0, PAGE_4K)
    assert 0x10000 <= pt.translate(0x80_0000_0000).pte_gpa < 0x20000


@pytest.mark.parametrize("call,match", [
    (lambda pt: pt.tables_needed(0, 0x3000, 0x3000), "page size 0x3000 is not 4K, 2M or 1G"),
    (lambda pt: pt.map(0x4000_0000, 0x4000_0000, 0x4000 / 2), "size 8192.0 is not an int"),
    (lambda pt: pt.map_page(0x4000_0000, 0x4000_0000, extra=-1), "extra -0x1 has bits that are not entry flags"),
    (lambda pt: pt.map(0x4000_0000, 0, PAGE_4K, extra=0x5000), "extra 0x5000 has bits that are not entry"),
    (lambda pt: pt.map_page(0x4000_0000, 0, PAGE_4K, extra=1 << 12), "extra 0x1000 has bits"),  # PAT only in 2M/1G
    (lambda pt: PageTableBuilder(pt.mem, POOL, PAGE_4K, phys_bits=64), "phys_bits 64 is not 13..52"),
    (lambda pt: pt.add_pool(1 << 46, PAGE_4K), "beyond the 46-bit physical address space"),
])
def test_bad_arguments_are_paging_errors(call, match):
    pt = builder()
    with pytest.raises(PagingError, match=match):
        call(pt)
    assert pt.translate(0x4000_0000) is None and pt.pages_used == 1


def test_extra_flag_bits_are_set_as_given():
    pt = builder()
    pt.map_page(0x4000_0000, 0x20_0000, PAGE_2M, extra=1 << 12 | 1 << 9 | 1 << 62)   # PAT, avail, PKE bit
    t = pt.translate(0x4000_0000)
    assert t.gpa == 0x20_0000 and t.pte & (1 << 12 | 1 << 9 | 1 << 62) == 1 << 12 | 1 << 9 | 1 << 62


def test_first_in_use_finds_what_a_map_would_replace():
    pt = builder()
    assert pt.first_in_use(0x4000_0000, 1 << 30, PAGE_2M) is None
    pt.map_page(0x4000_0000 + 5 * PAGE_2M + 7 * PAGE_4K, 0)           # one 4K page
    assert pt.first_in_use(0x4000_0000, 1 << 30, PAGE_2M) == 0x4000_0000 + 5 * PAGE_2M
    assert pt.first_in_use(0x4000_0000, 1 << 30, PAGE_4K) == 0x4000_0000 + 5 * PAGE_2M + 7 * PAGE_4K
    pt.map_page(0x8000_0000, 0, PAGE_1G)
    assert pt.first_in_use(0x8000_0000 + PAGE_2M, PAGE_2M, PAGE_2M) == 0x8000_0000 + PAGE_2M
    assert pt.first_in_use(0xC000_0000, 1 << 30, PAGE_4K) is None


def test_set_table_puts_a_table_where_the_caller_says():
    """A last-level table at a chosen GPA outside the pools: map() fills it (the C path hands
    such tables to the Python one), the walk goes through it, and a re-map after the page was
    replaced by new, zeroed memory (a memslot replaced under the guest) fills it again."""
    mem = FlatMemory(0x80_0000)
    pt = PageTableBuilder(mem, POOL, 16 * PAGE_4K, phys_bits=46)
    table = 0x40_0000
    mem.write(table, b"\xff" * PAGE_4K)                      # set_table zeroes it
    pt.set_table(0x7000_0000, 1, table)
    pt.map(0x7000_0000, 0x20_0000, 8 * PAGE_4K)
    t = pt.translate(0x7000_0000 + 3 * PAGE_4K + 5)
    assert (t.gpa, t.pte_gpa) == (0x20_3005, table + 3 * 8)
    assert struct.unpack_from("<Q", mem.read(table + 8 * 8, 8))[0] == 0    # the rest stays empty
    assert pt.pages_used == 3                                 # PML4, PDPT, PD: not the table
    mem.write(table, bytes(PAGE_4K))                          # new memory behind the table
    pt.map(0x7000_0000, 0x30_0000, 8 * PAGE_4K)
    assert pt.translate(0x7000_0000 + 7 * PAGE_4K).gpa == 0x30_7000
    with pytest.raises(PagingError, match="already has a level-1 table"):
        pt.set_table(0x7000_1000, 1, 0x41_0000)
    with pytest.raises(PagingError, match="inside a page-table pool"):
        pt.set_table(0x9000_0000, 1, POOL + PAGE_4K)
    with pytest.raises(PagingError, match="is not valid"):
        pt.set_table(0x9000_0000, 4, 0x42_0000)
    with pytest.raises(PagingError, match="not a page"):
        pt.set_table(0x9000_0000, 1, 0x42_0008)
