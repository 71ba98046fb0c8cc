"""Host-side x86-64 4-level page tables: a builder and a walker.

The builder writes tables into guest memory (anything with ``read``/``write``,
e.g. a ``Vm`` or a ``FlatMemory``), taking table pages from a pool region of
guest physical memory.  Intermediate entries are always present, writable and
user-accessible, so a leaf's own bits decide the permissions.  The walker
reads tables back the way the CPU does and combines the bits of every level.
"""
from __future__ import annotations

import struct

from kvmpy.abi import ffi, is_int, lib
from kvmpy.errors import KvmError
from kvmpy.memory import PAGE_1G, PAGE_2M, PAGE_4K
from kvmpy.record import Record
from kvmpy.x86.physmem import PhysMemory

ENTRIES_PER_TABLE = 512     # a split of one page makes 512 mappings of the next size down

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_G = 1 << 8
PTE_NX = 1 << 63
PTE_PAT_HUGE = 1 << 12      # PAT in a 2M/1G leaf; an address bit in a 4K one
PTE_ADDR_MASK = 0x000F_FFFF_FFFF_F000
PTE_FLAGS_MASK = ((1 << 64) - 1) & ~PTE_ADDR_MASK   # bits 0-11 and 52-63
MAX_PHYS_BITS = 52          # the entries' address field ends at bit 51

# Level 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT; a leaf at level L maps _LEVEL_SIZE[L].
_LEVEL_SIZE = {1: PAGE_4K, 2: PAGE_2M, 3: PAGE_1G}
_SIZE_LEVEL = {v: k for k, v in _LEVEL_SIZE.items()}


class PagingError(KvmError):
    """A mapping request that cannot be honoured (alignment, overlap, pool exhausted...)."""


def _table_key(gva: int, level: int) -> tuple[int, int]:
    """The builder's key of the level-``level`` table translating ``gva``: (level, the first GVA
    it covers, in 48 bits)."""
    span = 1 << (12 + 9 * level)        # what one entry of the table above covers
    return level, gva & ~(span - 1) & ((1 << 48) - 1)


def _index(gva: int, level: int) -> int:
    return (gva >> (12 + 9 * (level - 1))) & 511


def is_canonical(gva: int) -> bool:
    """True if ``gva`` is a canonical 48-bit virtual address."""
    top = gva >> 47
    return top == 0 or top == (1 << 17) - 1


class Translation(Record, frozen=True):
    """Result of a walk: where ``gva`` lands and with which effective permissions."""

    gva: int
    gpa: int
    page_size: int
    writable: bool
    user: bool
    nx: bool
    pte_gpa: int  # guest physical address of the leaf entry
    pte: int      # the leaf entry's value


def walk(mem: PhysMemory, cr3: int, gva: int) -> Translation | None:
    """Translate ``gva`` through the tables at ``cr3``; None if not present.

    Raises PagingError for a non-canonical address.
    """
    if not is_canonical(gva):
        raise PagingError(f"GVA {gva:#x} is not canonical")
    table = cr3 & PTE_ADDR_MASK
    writable, user, nx = True, True, False
    for level in (4, 3, 2, 1):
        pte_gpa = table + 8 * _index(gva, level)
        (pte,) = struct.unpack("<Q", mem.read(pte_gpa, 8))
        if not pte & PTE_P:
            return None
        writable &= bool(pte & PTE_RW)
        user &= bool(pte & PTE_US)
        nx |= bool(pte & PTE_NX)
        if level == 1 or (level in (2, 3) and pte & PTE_PS):
            size = _LEVEL_SIZE[level]
            base = pte & PTE_ADDR_MASK & ~(size - 1)
            return Translation(gva, base + (gva & (size - 1)), size, writable, user, nx, pte_gpa, pte)
        table = pte & PTE_ADDR_MASK
    raise AssertionError("unreachable")


class PageTableBuilder:
    """Builds 4-level page tables in guest memory.

    ``pool_gpa``/``pool_size`` is the page-aligned region that table pages are
    allocated from (the PML4 is its first page, so ``cr3 == pool_gpa``);
    :meth:`add_pool` adds more regions, used when the ones before are full.
    ``phys_bits`` bounds the GPAs that can be mapped (CPUID 0x80000008 EAX[7:0]).
    ``preset_ad`` sets the accessed bit in every entry and the dirty bit in every leaf,
    so that neither the CPU nor KVM's page walker ever writes the tables.

    :meth:`map` writes the entries in C (kvmpy_pt_map in _bulk.c) straight into the
    pools' guest memory; :meth:`map_page` is the one-entry Python form.
    """

    def __init__(self, mem: PhysMemory, pool_gpa: int, pool_size: int, phys_bits: int = 52, *,
                 preset_ad: bool = False) -> None:
        if not is_int(phys_bits) or not 12 < phys_bits <= MAX_PHYS_BITS:
            raise PagingError(f"phys_bits {phys_bits!r} is not 13..{MAX_PHYS_BITS} (a leaf entry holds "
                              f"a GPA of at most {MAX_PHYS_BITS} bits)")
        self.mem = mem
        self.phys_bits = phys_bits
        self._pools: list[tuple[int, int]] = []
        self.add_pool(pool_gpa, pool_size)
        self._pool = 0
        self._used = 0
        self._table_bits = PTE_P | PTE_RW | PTE_US | (PTE_A if preset_ad else 0)
        self._leaf_bits = PTE_P | (PTE_A | PTE_D if preset_ad else 0)
        self._next = pool_gpa
        # (level, gva of the table's first byte) -> table GPA; saves re-reading entries.
        self._tables: dict[tuple[int, int], int] = {}
        self.cr3 = self._alloc_table()
        self._tables[(4, 0)] = self.cr3

    @property
    def pool_gpa(self) -> int:
        return self._pools[0][0]

    @property
    def pool_size(self) -> int:
        return self._pools[0][1]

    def add_pool(self, gpa: int, size: int) -> None:
        """Take table pages from guest memory ``[gpa, gpa+size)`` once the pools before it are full."""
        if not is_int(gpa) or not is_int(size):
            raise PagingError(f"page-table pool {gpa!r}+{size!r}: GPA and size must be ints")
        if gpa % PAGE_4K or size % PAGE_4K or size < PAGE_4K or gpa < 0:
            raise PagingError(f"page-table pool {gpa:#x}+{size:#x} must be page aligned and non-empty")
        if gpa + size > 1 << self.phys_bits:
            raise PagingError(f"page-table pool {gpa:#x}+{size:#x} is beyond the {self.phys_bits}-bit "
                              "physical address space")
        for g, sz in self._pools:
            if gpa < g + sz and g < gpa + size:
                raise PagingError(f"page-table pool {gpa:#x}+{size:#x} overlaps pool {g:#x}+{sz:#x}")
        self._pools.append((gpa, size))

    @property
    def pages_used(self) -> int:
        """Number of table pages allocated from the pools so far."""
        return self._used

    @property
    def pages_free(self) -> int:
        """Table pages still available in the pools."""
        gpa, size = self._pools[self._pool]
        return (gpa + size - self._next) // PAGE_4K + sum(sz for _, sz in self._pools[self._pool + 1:]) // PAGE_4K

    @staticmethod
    def tables_needed(gva: int, size: int, page_size: int = PAGE_4K) -> int:
        """At most how many new table pages mapping ``[gva, gva+size)`` with ``page_size`` pages takes."""
        if not all(map(is_int, (gva, size, page_size))):
            raise PagingError(f"GVA {gva!r}, size {size!r} and page size {page_size!r} must be ints")
        if page_size not in _SIZE_LEVEL:
            raise PagingError(f"page size {page_size:#x} is not 4K, 2M or 1G")
        need = 0
        for level in range(_SIZE_LEVEL[page_size] + 1, 5):      # tables below the PML4
            span = 1 << (12 + 9 * (level - 1))
            need += (gva + size - 1) // span - gva // span + 1
        return need

    def _exhausted(self) -> PagingError:
        pools = ", ".join(f"{g:#x}+{sz:#x}" for g, sz in self._pools)
        return PagingError(f"page-table pool {pools} is exhausted ({self.pages_used} pages used)")

    def _alloc_table(self) -> int:
        while self._next + PAGE_4K > sum(self._pools[self._pool]):
            if self._pool + 1 == len(self._pools):
                raise self._exhausted()
            self._pool += 1
            self._next = self._pools[self._pool][0]
        gpa = self._next
        self._next += PAGE_4K
        self._used += 1
        self.mem.write(gpa, bytes(PAGE_4K))
        return gpa

    def _read(self, gpa: int) -> int:
        return struct.unpack("<Q", self.mem.read(gpa, 8))[0]

    def _write(self, gpa: int, val: int) -> None:
        self.mem.write(gpa, struct.pack("<Q", val))

    def _table_for(self, gva: int, leaf_level: int, create: bool) -> int | None:
        """GPA of the level-``leaf_level`` table covering ``gva``, descending from the PML4."""
        table = self.cr3
        for level in range(4, leaf_level, -1):
            key = _table_key(gva, level - 1)
            child = self._tables.get(key)
            if child is None:
                pte_gpa = table + 8 * _index(gva, level)
                pte = self._read(pte_gpa)
                if pte & PTE_P:
                    if level in (2, 3) and pte & PTE_PS:
                        raise PagingError(f"GVA {gva:#x} is already inside a "
                                          f"{1 << (12 + 9 * (level - 1)) >> 20} MiB page")
                    child = pte & PTE_ADDR_MASK
                elif not create:
                    return None
                else:
                    child = self._alloc_table()
                    self._write(pte_gpa, child | self._table_bits)
                self._tables[key] = child
            table = child
        return table

    def set_table(self, gva: int, level: int, table_gpa: int) -> None:
        """Make the page at ``table_gpa`` the level-``level`` table (1 = the last level, 2 or 3)
        that translates ``gva``: zeroed and linked from the table above, which is created as
        needed; later :meth:`map` calls there fill it. For a test that needs a guest page table
        at a GPA of its choosing (e.g. in a memslot of its own); the page is guest memory
        outside the pools, and no table may translate ``gva`` at that level yet (PagingError).
        """
        if not all(map(is_int, (gva, level, table_gpa))) or level not in (1, 2, 3):
            raise PagingError(f"set_table: GVA {gva!r}, level {level!r} (1..3) or table GPA {table_gpa!r} is not valid")
        if table_gpa % PAGE_4K or table_gpa < 0 or table_gpa + PAGE_4K > 1 << self.phys_bits:
            raise PagingError(f"table GPA {table_gpa:#x} is not a page of the {self.phys_bits}-bit physical address space")
        if not is_canonical(gva):
            raise PagingError(f"GVA {gva:#x} is not canonical")
        if any(g <= table_gpa < g + sz for g, sz in self._pools):
            raise PagingError(f"table GPA {table_gpa:#x} is inside a page-table pool, whose pages the builder hands out")
        key = _table_key(gva, level)
        parent = self._table_for(gva, level + 1, create=True)
        pte_gpa = parent + 8 * _index(gva, level + 1)
        if key in self._tables or self._read(pte_gpa) & PTE_P:
            raise PagingError(f"GVA {gva:#x} already has a level-{level} table or a page there")
        self.mem.write(table_gpa, bytes(PAGE_4K))
        self._write(pte_gpa, table_gpa | self._table_bits)
        self._tables[key] = table_gpa

    def validate(self, gva: int, gpa: int, size: int, page_size: int = PAGE_4K, extra: int = 0) -> None:
        """PagingError if :meth:`map` would refuse these arguments; checks them only (no table is read)."""
        # Floats pass the arithmetic below and then fail in struct/cffi with a TypeError.
        for what, value in (("GVA", gva), ("GPA", gpa), ("size", size), ("page size", page_size),
                            ("extra", extra)):
            if not is_int(value):
                raise PagingError(f"{what} {value!r} is not an int")
        if page_size not in _SIZE_LEVEL:
            raise PagingError(f"page size {page_size:#x} is not 4K, 2M or 1G")
        if size <= 0 or size % page_size:
            raise PagingError(f"size {size:#x} is not a positive multiple of page size {page_size:#x}")
        allowed = PTE_FLAGS_MASK | (PTE_PAT_HUGE if page_size != PAGE_4K else 0)
        if extra < 0 or extra & ~allowed:
            raise PagingError(f"extra {extra:#x} has bits that are not entry flags (allowed: {allowed:#x}); "
                              "ORed in, they would change the mapped address")
        if gva % page_size or gpa % page_size:
            raise PagingError(f"GVA {gva:#x} / GPA {gpa:#x} not aligned to page size {page_size:#x}")
        if not is_canonical(gva) or not is_canonical(gva + size - 1) or (gva >> 47) != ((gva + size - 1) >> 47):
            raise PagingError(f"GVA range {gva:#x}+{size:#x} is not canonical")
        if gpa < 0 or gpa + size > 1 << self.phys_bits:
            raise PagingError(f"GPA {gpa:#x} is beyond the {self.phys_bits}-bit physical address space")

    def _leaf(self, page_size: int, writable: bool, user: bool, nx: bool, global_: bool, extra: int) -> int:
        return (self._leaf_bits | extra | (PTE_PS if page_size != PAGE_4K else 0) | (PTE_RW if writable else 0)
                | (PTE_US if user else 0) | (PTE_NX if nx else 0) | (PTE_G if global_ else 0))

    def map_page(self, gva: int, gpa: int, page_size: int = PAGE_4K, *, writable: bool = True,
                 user: bool = False, nx: bool = False, global_: bool = False, extra: int = 0) -> int:
        """Map one page; returns the GPA of the leaf entry.

        Re-mapping a page of the same size replaces it; a page that would
        overlap a different-size mapping raises PagingError.
        """
        self.validate(gva, gpa, page_size, page_size, extra)
        level = _SIZE_LEVEL[page_size]
        table = self._table_for(gva, level, create=True)
        pte_gpa = table + 8 * _index(gva, level)
        old = self._read(pte_gpa)
        if old & PTE_P and level > 1 and not old & PTE_PS:
            raise PagingError(f"GVA {gva:#x}: a {page_size >> 20} MiB page would replace a page table "
                              "of smaller mappings")
        self._write(pte_gpa, gpa | self._leaf(page_size, writable, user, nx, global_, extra))
        return pte_gpa

    def map(self, gva: int, gpa: int, size: int, page_size: int = PAGE_4K, *, writable: bool = True,
            user: bool = False, nx: bool = False, global_: bool = False, extra: int = 0) -> None:
        """Map ``[gva, gva+size)`` to ``[gpa, gpa+size)`` with pages of ``page_size``.

        The flags are those of :meth:`map_page`. On an error (PagingError) the pages
        before the one named are mapped.
        """
        self.validate(gva, gpa, size, page_size, extra)
        leaf = self._leaf(page_size, writable, user, nx, global_, extra)
        done = self._map_bulk(gva, gpa, size // page_size, page_size, leaf)
        for off in range(done * page_size, size, page_size):    # tables the C path does not know
            self.map_page(gva + off, gpa + off, page_size, writable=writable, user=user, nx=nx,
                          global_=global_, extra=extra)

    def _pool_buffers(self) -> list:
        """cffi buffers over each pool's guest memory, for C to write the tables into.

        PagingError (nothing held) if a pool's view is read-only or shorter than the pool:
        C writes anywhere in ``size`` bytes of it.
        """
        bufs = []
        try:
            for g, sz in self._pools:
                view = memoryview(self.mem.gpa_view(g, sz))
                if view.nbytes != sz:
                    raise PagingError(f"page-table pool {g:#x}+{sz:#x}: guest memory gave a view of "
                                      f"{view.nbytes:#x} bytes, not the pool's {sz:#x}")
                try:
                    bufs.append(ffi.from_buffer(view, require_writable=True))
                except (BufferError, TypeError) as e:
                    raise PagingError(f"page-table pool {g:#x}+{sz:#x}: guest memory is not writable ({e})") from None
        except BaseException:
            for buf in bufs:
                ffi.release(buf)
            raise
        return bufs

    def _map_bulk(self, gva: int, gpa: int, npages: int, page_size: int, leaf: int) -> int:
        """Map in C; returns how many pages it mapped before reaching a table outside the pools."""
        req = ffi.new("struct kvmpy_pt_req *", {
            "cr3": self.cr3, "gva": gva, "gpa": gpa, "npages": npages, "page_size": page_size,
            "leaf_bits": leaf, "table_bits": self._table_bits, "npools": len(self._pools),
            "pool": self._pool, "next": self._next})
        pools = ffi.new("struct kvmpy_pt_pool[]", len(self._pools))
        bufs = self._pool_buffers()
        try:
            for p, (g, sz), buf in zip(pools, self._pools, bufs):
                p.gpa, p.size, p.hva = g, sz, int(ffi.cast("uintptr_t", buf))
            rc = lib.kvmpy_pt_map(req, pools)       # holds the buffers: no unmap under it
        finally:
            for buf in bufs:
                ffi.release(buf)
        # C moves through the pools as _alloc_table does, and stops at the end of the last one.
        self._used += req.allocated
        self._pool, self._next = req.pool, req.next
        if rc == lib.KVMPY_PT_EXHAUSTED:
            raise self._exhausted()
        if rc == lib.KVMPY_PT_IN_HUGE:
            raise PagingError(f"GVA {req.fail_gva:#x} is already inside a bigger page")
        if rc == lib.KVMPY_PT_OVER_TABLE:
            raise PagingError(f"GVA {req.fail_gva:#x}: a {page_size >> 20} MiB page would replace a page table "
                              "of smaller mappings")
        return req.done

    def first_in_use(self, gva: int, size: int, page_size: int = PAGE_4K) -> int | None:
        """The first page of ``[gva, gva+size)`` that mapping it with ``page_size`` pages would
        replace or be refused at (an entry present at that size's level, or a bigger page); None
        if there is none. Skips what a missing table leaves unmapped."""
        if not all(map(is_int, (gva, size))) or page_size not in _SIZE_LEVEL or size < 0:
            raise PagingError(f"GVA {gva!r}, size {size!r} or page size {page_size!r} is not valid")
        if size and not (is_canonical(gva) and is_canonical(gva + size - 1)):
            raise PagingError(f"GVA range {gva:#x}+{size:#x} is not canonical")
        leaf_level = _SIZE_LEVEL[page_size]
        end = gva + size
        while gva < end:
            table, skip = self.cr3, page_size
            for level in range(4, leaf_level - 1, -1):
                pte = self._read(table + 8 * _index(gva, level))
                if not pte & PTE_P:
                    skip = 1 << (12 + 9 * (level - 1))     # what this entry would map
                    break
                if level == leaf_level or level in (2, 3) and pte & PTE_PS:
                    return gva
                table = pte & PTE_ADDR_MASK
            gva = (gva & ~(skip - 1)) + skip
        return None

    def unmap_page(self, gva: int) -> Translation:
        """Clear the leaf entry mapping ``gva`` (of any size); returns what it mapped.

        PagingError if ``gva`` is not mapped.  The guest must still flush its TLB.
        """
        t = self.translate(gva)
        if t is None:
            raise PagingError(f"GVA {gva:#x} is not mapped")
        self._write(t.pte_gpa, 0)
        return t

    def translate(self, gva: int) -> Translation | None:
        """Walk these tables for ``gva`` (see :func:`walk`)."""
        return walk(self.mem, self.cr3, gva)
