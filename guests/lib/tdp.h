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
	const char *name;	/* "NPT" or "EPT", for messages */
};

/* Take table pages from pool (page aligned, pool_pages of them); allocate the root. */
void tdp_init(struct tdp *t, const char *name, void *pool, size_t pool_pages,
	      uint64_t present, uint64_t table_bits, uint64_t leaf_bits);

/*
 * Map [l2_gpa, l2_gpa + size) to [l1_gpa, ...) with pages of level (1 = 4K,
 * 2 = 2M, 3 = 1G).  Asserts alignment and that no mapping of another size is
 * in the way; remapping a range with the same page size overwrites it.
 */
void tdp_map(struct tdp *t, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, int level);

/* The leaf mapping l2_gpa and its level (1 = 4K, 2 = 2M, 3 = 1G), or NULL. */
uint64_t *tdp_leaf(struct tdp *t, uint64_t l2_gpa, int *level);

#endif
