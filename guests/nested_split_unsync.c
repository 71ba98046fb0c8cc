// SPDX-License-Identifier: GPL-2.0-only
/*
 * L1 puts its own last-level NPT/EPT tables inside an L1 range that it maps to
 * L2 with one huge (2M or 1G) page, so that the gfn of the direct shadow page
 * an eager split of that huge mapping asks for is also the gfn of indirect
 * shadow pages (the tables), and makes those unsync (SVM or VMX, nested.h).
 *
 * Globals (the host sets them):
 *   huge_l2, huge_l1, huge_size  L2 GPAs [huge_l2, +huge_size) map to L1 GPAs
 *                                [huge_l1, ...) with one NPT/EPT leaf of huge_size
 *   nr_tables                    tables at L1 GPAs huge_l1 + t * 2M; table t maps
 *                                the 512 pages at L2 GPA y_l2 + t * 2M (4K) to
 *                                frames[t][0..511] (outside the huge range)
 *   write_first/stride/count     the pages of the huge range L2 writes at the end
 * L2 reaches every L2 GPA through L1's page tables (the host maps the GVAs).
 *
 * Stages (SPLIT_UNSYNC_*): START (before L2 runs), HUGE (L2 read the huge range first, so its nested
 * SPTE is huge), SHADOWED (L2 read all pages behind the tables: KVM shadows
 * them), EDITED (L1 swapped the frames of entries 0 and 1 of every table and
 * parks: the host enables dirty logging here), WRITTEN (L1 flushed and entered
 * L2, which checked the swap and wrote its pages, each (0x77 << 32 | page)).
 */
#include "lib/guest.h"
#include "lib/nested.h"

#define MAX_TABLES 2

uint64_t l1_mem_size = 64ul << 20;
uint64_t huge_l2, huge_l1, huge_size;
uint64_t nr_tables;
uint64_t y_l2;
uint64_t write_first, write_stride, write_count;

static struct nested n;
static uint8_t tdp_pool[16][4096] __attribute__((aligned(4096)));
static uint8_t l2_stack[16384] __attribute__((aligned(16)));
static uint8_t frames[MAX_TABLES][512][4096] __attribute__((aligned(4096)));

static uint64_t stamp(uint64_t t, uint64_t i)
{
	return SPLIT_UNSYNC_FRAME_SEED | t << 12 | i;
}

static uint64_t y_read(uint64_t t, uint64_t i)
{
	return READ_ONCE(*(volatile uint64_t *)(y_l2 + t * PAGE_SIZE_2M + i * PAGE_SIZE_4K));
}

static void l2_main(uint64_t arg)
{
	(void)READ_ONCE(*(volatile uint64_t *)(huge_l2 + PAGE_SIZE_4K));
	nested_l2_sync(SPLIT_UNSYNC_HUGE, 0, 0, 0);

	for (uint64_t t = 0; t < nr_tables; t++)
		for (uint64_t i = 0; i < 512; i++)
			GUEST_ASSERT_EQ(y_read(t, i), stamp(t, i));
	nested_l2_sync(SPLIT_UNSYNC_SHADOWED, 0, 0, 0);

	/* L1 has swapped entries 0 and 1 and flushed: the new frames, the rest unchanged. */
	for (uint64_t t = 0; t < nr_tables; t++) {
		GUEST_ASSERT_EQ(y_read(t, 0), stamp(t, 1));
		GUEST_ASSERT_EQ(y_read(t, 1), stamp(t, 0));
		GUEST_ASSERT_EQ(y_read(t, 2), stamp(t, 2));
	}
	for (uint64_t j = 0; j < write_count; j++) {
		uint64_t page = write_first + j * write_stride;

		WRITE_ONCE(*(volatile uint64_t *)(huge_l2 + page * PAGE_SIZE_4K), 0x77ul << 32 | page);
	}
	nested_l2_sync(SPLIT_UNSYNC_WRITTEN, write_count, 0, 0);
	nested_l2_done();
}

static void run_until_call(uint64_t want)
{
	nested_run(&n);
	GUEST_ASSERT_EQ(nested_forward_l2_call(&n), want);
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	GUEST_ASSERT(nr_tables >= 1 && nr_tables <= MAX_TABLES && nr_tables * PAGE_SIZE_2M <= huge_size);
	nested_init(&n, &(struct nested_config){
		.l2_main = l2_main, .l2_stack_top = l2_stack + sizeof(l2_stack),
		.tdp_pool = tdp_pool, .tdp_pool_pages = 16 });
	nested_map(&n, 0, 0, l1_mem_size, PAGE_SIZE_2M);
	nested_map(&n, huge_l2, huge_l1, huge_size, huge_size);
	for (uint64_t t = 0; t < nr_tables; t++) {
		uint64_t y = y_l2 + t * PAGE_SIZE_2M;

		tdp_set_table(n.tdp, y, 1, (void *)(uintptr_t)(huge_l1 + t * PAGE_SIZE_2M));
		for (uint64_t i = 0; i < 512; i++) {
			*(uint64_t *)frames[t][i] = stamp(t, i);
			nested_map(&n, y + i * PAGE_SIZE_4K, (uint64_t)(uintptr_t)frames[t][i], PAGE_SIZE_4K,
				   PAGE_SIZE_4K);
		}
	}

	GUEST_SYNC(SPLIT_UNSYNC_START);
	run_until_call(NESTED_CALL_SYNC);		/* HUGE */
	run_until_call(NESTED_CALL_SYNC);		/* SHADOWED */

	for (uint64_t t = 0; t < nr_tables; t++) {
		uint64_t *e0 = nested_leaf(&n, y_l2 + t * PAGE_SIZE_2M, NULL);
		uint64_t *e1 = nested_leaf(&n, y_l2 + t * PAGE_SIZE_2M + PAGE_SIZE_4K, NULL);
		uint64_t v0 = *e0;

		*e0 = *e1;
		*e1 = v0;
	}
	GUEST_SYNC(SPLIT_UNSYNC_EDITED);

	nested_flush_tdp(&n);
	run_until_call(NESTED_CALL_SYNC);		/* WRITTEN */
	run_until_call(NESTED_CALL_DONE);
}
