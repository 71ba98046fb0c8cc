// SPDX-License-Identifier: GPL-2.0-only
/* Second-level page tables (NPT/EPT) built by L1: see tdp.h. */
#include "tdp.h"

static uint64_t *tdp_alloc(struct tdp *t)
{
	GUEST_ASSERT_MSG(t->used < t->pool_pages, "%s pool of %lu pages exhausted",
			 t->name, (uint64_t)t->pool_pages);
	uint64_t *table = (uint64_t *)t->pool[t->used++];

	memset(table, 0, 4096);
	return table;
}

void tdp_init(struct tdp *t, const char *name, void *pool, size_t pool_pages,
	      uint64_t present, uint64_t table_bits, uint64_t leaf_bits,
	      uint64_t accessed, uint64_t dirty)
{
	GUEST_ASSERT(((uintptr_t)pool & 4095) == 0);
	t->name = name;
	t->pool = pool;
	t->pool_pages = pool_pages;
	t->used = 0;
	t->present = present;
	t->table_bits = table_bits;
	t->leaf_bits = leaf_bits;
	t->accessed = accessed;
	t->dirty = dirty;
	t->pml4 = tdp_alloc(t);
}

uint64_t *tdp_table(struct tdp *t, uint64_t l2_gpa, int level)
{
	uint64_t *table = t->pml4;

	for (int lvl = 4; lvl > level; lvl--) {
		uint64_t *e = &table[pt_index(l2_gpa, lvl)];

		if (!(*e & t->present))
			*e = (uint64_t)(uintptr_t)tdp_alloc(t) | t->table_bits;
		GUEST_ASSERT_MSG(!(*e & TDP_PS), "L2 GPA %#lx: a larger %s page is in the way", l2_gpa, t->name);
		table = (uint64_t *)(*e & PTE_ADDR_MASK);
	}
	return table;
}

static void tdp_map_one(struct tdp *t, uint64_t l2_gpa, uint64_t l1_gpa, int level)
{
	uint64_t *leaf = &tdp_table(t, l2_gpa, level)[pt_index(l2_gpa, level)];

	GUEST_ASSERT_MSG(!(*leaf & t->present) || level == 1 || (*leaf & TDP_PS),
			 "L2 GPA %#lx: smaller %s pages are in the way", l2_gpa, t->name);
	*leaf = l1_gpa | t->leaf_bits | (level > 1 ? TDP_PS : 0);
}

void tdp_map(struct tdp *t, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, int level)
{
	uint64_t page_size = 1ul << (12 + 9 * (level - 1));

	GUEST_ASSERT_MSG(!(l2_gpa % page_size) && !(l1_gpa % page_size) && !(size % page_size),
			 "%s map(%#lx -> %#lx, size %#lx) not aligned to page size %#lx",
			 t->name, l2_gpa, l1_gpa, size, page_size);
	for (uint64_t off = 0; off < size; off += page_size)
		tdp_map_one(t, l2_gpa + off, l1_gpa + off, level);
}

void tdp_map_unaccessed(struct tdp *t, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, int level)
{
	uint64_t table_bits = t->table_bits, leaf_bits = t->leaf_bits;

	GUEST_ASSERT_MSG(t->accessed, "%s has no accessed/dirty bits in use", t->name);
	t->table_bits &= ~t->accessed;
	t->leaf_bits &= ~(t->accessed | t->dirty);
	tdp_map(t, l2_gpa, l1_gpa, size, level);
	t->table_bits = table_bits;
	t->leaf_bits = leaf_bits;
}

void tdp_set_table(struct tdp *t, uint64_t l2_gpa, int level, void *table)
{
	GUEST_ASSERT_MSG(level >= 1 && level < 4 && ((uintptr_t)table & 4095) == 0,
			 "%s table for level %d at %p", t->name, level, table);
	uint64_t *e = &tdp_table(t, l2_gpa, level + 1)[pt_index(l2_gpa, level + 1)];

	GUEST_ASSERT_MSG(!(*e & t->present), "L2 GPA %#lx: a %s table or page is there already", l2_gpa, t->name);
	memset(table, 0, 4096);
	*e = (uint64_t)(uintptr_t)table | t->table_bits;
}

uint64_t *tdp_leaf(struct tdp *t, uint64_t l2_gpa, int *level)
{
	return pt_walk(t->pml4, l2_gpa, t->present, level);
}
