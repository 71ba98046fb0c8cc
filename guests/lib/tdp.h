/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Second-level page tables that L1 builds for its L2: AMD NPT and Intel EPT.
 *
 * Both are 4-level radix trees indexed like x86 page tables, with the
 * page-size bit at bit 7 of a 2M/1G leaf.  They differ only in which bits
 * make an entry present and in the bits of table and leaf entries, so one
 * builder serves both; svm.h and vmx.h wrap it with their entry formats.
 */
#ifndef KVMPY_GUEST_TDP_H
#define KVMPY_GUEST_TDP_H

#include "guest.h"

#define TDP_PS PTE_HUGE	/* bit 7: a 2M/1G leaf, as in x86 page tables */

struct tdp {
	uint64_t *pml4;
	uint8_t (*pool)[4096];
	size_t pool_pages, used;
	uint64_t present;	/* an entry is present when any of these bits is set */
	uint64_t table_bits;	/* bits of an entry pointing to a table */
	uint64_t leaf_bits;	/* bits of a leaf (TDP_PS is added for 2M/1G) */
	uint64_t accessed;	/* the accessed and dirty bits the walker sets, 0 if */
	uint64_t dirty;		/* the format has none in use (EPT without A/D) */
	const char *name;	/* "NPT" or "EPT", for messages */
};

/*
 * Take table pages from pool (page aligned, pool_pages of them); allocate the
 * root.  table_bits and leaf_bits include the accessed (and leaf dirty) bits
 * where the format has them, so the nested MMU never has to write them.
 */
void tdp_init(struct tdp *t, const char *name, void *pool, size_t pool_pages,
	      uint64_t present, uint64_t table_bits, uint64_t leaf_bits,
	      uint64_t accessed, uint64_t dirty);

/*
 * Map [l2_gpa, l2_gpa + size) to [l1_gpa, ...) with pages of level (1 = 4K,
 * 2 = 2M, 3 = 1G).  Asserts alignment and that no mapping of another size is
 * in the way; remapping a range with the same page size overwrites it.
 */
void tdp_map(struct tdp *t, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, int level);

/*
 * tdp_map, but the entries it creates have the accessed bit clear (leaves the
 * dirty bit too), so the first L2 access through them makes KVM's walker of
 * L1's tables (FNAME(update_accessed_dirty_bits)) set them.
 */
void tdp_map_unaccessed(struct tdp *t, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, int level);

/*
 * Use the page `table` (anywhere in L1 memory, identity mapped) as the table
 * of `level` (1 = the last level) that translates l2_gpa: later tdp_map()s
 * there fill it.  For a test that needs an NPT/EPT table at a chosen L1 GPA.
 */
void tdp_set_table(struct tdp *t, uint64_t l2_gpa, int level, void *table);

/* The table of `level` (1 = the last level) that translates l2_gpa, creating it and those above. */
uint64_t *tdp_table(struct tdp *t, uint64_t l2_gpa, int level);

/* The leaf mapping l2_gpa and its level (1 = 4K, 2 = 2M, 3 = 1G), or NULL. */
uint64_t *tdp_leaf(struct tdp *t, uint64_t l2_gpa, int *level);

#endif
