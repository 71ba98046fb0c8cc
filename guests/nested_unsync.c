// SPDX-License-Identifier: GPL-2.0-only
/*
 * L1 edits leaf entries of its last-level NPT/EPT tables while KVM's nested
 * MMU shadows them, for the nested unsync selftest (SVM or VMX, nested.h).
 *
 * L2 GPAs [NESTED_UNSYNC_L2_GPA + t * 2M, + 8 pages) are mapped with 4K
 * NPT/EPT pages to L1 frames frames[t][0..7], one last-level table per t; frame
 * (t, i) holds stamp(t, i).  L2 reaches them through L1's page tables (the
 * host maps the GVAs).  Stages (stages.h, NESTED_UNSYNC_*):
 *
 *   SHADOWED  L2 read every page (KVM shadows each table), L1 forwards its sync
 *   EDITED    L1 swapped the frames of entries 1 and 2 in every table, no flush
 *   NOFLUSH   L1 entered L2 again without flushing; L2 reports (new, old):
 *             how many of the edited pages showed the swapped / the old frame
 *   FLUSHED   L1 flushed (SVM: INVLPGA of each edited page and TLB_CONTROL
 *             FLUSH_ASID on the next VMRUN; VMX: INVEPT)
 *   REREAD    L2 read the edited pages again: (new, old)
 */
#include "lib/guest.h"
#include "lib/nested.h"

#define TABLES  NESTED_UNSYNC_TABLES
#define PAGES   NESTED_UNSYNC_PAGES
#define L2_GPA  ((uint64_t)NESTED_UNSYNC_L2_GPA)

uint64_t l1_mem_size = 64ul << 20;

static struct nested n;
static uint8_t tdp_pool[16][4096] __attribute__((aligned(4096)));
static uint8_t l2_stack[16384] __attribute__((aligned(16)));
static uint8_t frames[TABLES][PAGES][4096] __attribute__((aligned(4096)));

static uint64_t page_gpa(uint64_t t, uint64_t i)
{
	return L2_GPA + t * PAGE_SIZE_2M + i * PAGE_SIZE_4K;
}

static uint64_t stamp(uint64_t t, uint64_t i)
{
	return 0x5eed000000ul | t << 8 | i;
}

/* L2: of the pages of entries 1 and 2, how many show the swapped frame (new) and the old one. */
static void count_swapped(uint64_t *new, uint64_t *old)
{
	*new = *old = 0;
	for (uint64_t t = 0; t < TABLES; t++) {
		for (uint64_t i = 1; i <= 2; i++) {
			uint64_t v = READ_ONCE(*(volatile uint64_t *)page_gpa(t, i));

			if (v == stamp(t, 3 - i))
				++*new;
			else if (v == stamp(t, i))
				++*old;
			else
				GUEST_ASSERT_MSG(0, "L2 GPA %#lx reads %#lx: neither frame's stamp", page_gpa(t, i), v);
		}
	}
}

static void l2_main(uint64_t arg)
{
	uint64_t new, old;

	for (uint64_t t = 0; t < TABLES; t++)
		for (uint64_t i = 0; i < PAGES; i++)
			GUEST_ASSERT_EQ(READ_ONCE(*(volatile uint64_t *)page_gpa(t, i)), stamp(t, i));
	count_swapped(&new, &old);
	GUEST_ASSERT_EQ(old, 2 * TABLES);
	nested_l2_sync(NESTED_UNSYNC_SHADOWED, 0, 0, 0);
	count_swapped(&new, &old);
	nested_l2_sync(NESTED_UNSYNC_NOFLUSH, new, old, 0);
	count_swapped(&new, &old);
	nested_l2_sync(NESTED_UNSYNC_REREAD, new, old, 0);
	nested_l2_done();
}

static void run_until_call(uint64_t want)
{
	nested_run(&n);
	GUEST_ASSERT_EQ(nested_forward_l2_call(&n), want);
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	nested_init(&n, &(struct nested_config){
		.l2_main = l2_main, .l2_stack_top = l2_stack + sizeof(l2_stack),
		.tdp_pool = tdp_pool, .tdp_pool_pages = 16 });
	nested_map(&n, 0, 0, l1_mem_size, PAGE_SIZE_2M);
	for (uint64_t t = 0; t < TABLES; t++) {
		for (uint64_t i = 0; i < PAGES; i++) {
			*(uint64_t *)frames[t][i] = stamp(t, i);
			nested_map(&n, page_gpa(t, i), (uint64_t)(uintptr_t)frames[t][i], PAGE_SIZE_4K, PAGE_SIZE_4K);
		}
	}

	run_until_call(NESTED_CALL_SYNC);		/* SHADOWED */

	for (uint64_t t = 0; t < TABLES; t++) {
		uint64_t *e1 = nested_leaf(&n, page_gpa(t, 1), NULL), *e2 = nested_leaf(&n, page_gpa(t, 2), NULL);
		uint64_t v1 = *e1;

		*e1 = *e2;
		*e2 = v1;
	}
	GUEST_SYNC(NESTED_UNSYNC_EDITED);

	run_until_call(NESTED_CALL_SYNC);		/* NOFLUSH: nothing flushed since the edit */

	if (n.vendor == NESTED_SVM)
		for (uint64_t t = 0; t < TABLES; t++)
			for (uint64_t i = 1; i <= 2; i++)
				svm_invlpga(page_gpa(t, i), n.svm.vmcb->control.asid);
	nested_flush_tdp(&n);
	GUEST_SYNC(NESTED_UNSYNC_FLUSHED);

	run_until_call(NESTED_CALL_SYNC);		/* REREAD */
	run_until_call(NESTED_CALL_DONE);
}
