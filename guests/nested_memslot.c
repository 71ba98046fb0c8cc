// SPDX-License-Identifier: GPL-2.0-only
/*
 * L1 maps L2's data region with 4K NPT/EPT pages through a last-level table it
 * keeps at L1 GPA table_gpa, in a memslot of its own.  The host replaces that
 * memslot (deletes it, adds new memory at the same GPA) while L1 is parked, so
 * KVM's nested MMU is left holding a shadow page of a table whose memslot went
 * away, and L1 refills the table (the new memory is zero) to map the data
 * elsewhere (SVM or VMX, nested.h).
 *
 * Globals (the host sets them):
 *   data_l2_gpa, data_size  L2 GPAs (2M aligned, at most 2M: one table) that L2
 *                           reaches through L1's own page tables (the host maps them)
 *   table_gpa               the table's L1 GPA (the host maps it for L1 too)
 *   cmd_target              the L1 GPA the data maps to: L1 refills the table
 *                           whenever the host changes it at a park
 *   cmd_stop                L2 finishes at the next park
 *
 * Stages (NESTED_MEMSLOT_*): START, then after each pass PASS(pass, pages):
 * L2 wrote (pass << 32 | page) into the first u64 of every data page.
 */
#include "lib/guest.h"
#include "lib/nested.h"

uint64_t l1_mem_size = 64ul << 20;
uint64_t data_l2_gpa, data_size, table_gpa;
volatile uint64_t cmd_target;
volatile uint64_t cmd_stop;

static struct nested n;
static uint8_t tdp_pool[16][4096] __attribute__((aligned(4096)));
static uint8_t l2_stack[16384] __attribute__((aligned(16)));

static void l2_main(uint64_t arg)
{
	uint64_t npages = data_size / PAGE_SIZE_4K;

	for (uint64_t pass = 1; !cmd_stop; pass++) {
		for (uint64_t i = 0; i < npages; i++)
			WRITE_ONCE(*(volatile uint64_t *)(data_l2_gpa + i * PAGE_SIZE_4K), pass << 32 | i);
		nested_l2_sync(NESTED_MEMSLOT_PASS, pass, npages, 0);
	}
	nested_l2_done();
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	uint64_t target = cmd_target;

	GUEST_ASSERT(data_l2_gpa >= l1_mem_size && data_l2_gpa % PAGE_SIZE_2M == 0);
	GUEST_ASSERT(data_size && data_size <= PAGE_SIZE_2M && data_size % PAGE_SIZE_4K == 0);
	nested_init(&n, &(struct nested_config){
		.l2_main = l2_main, .l2_stack_top = l2_stack + sizeof(l2_stack),
		.tdp_pool = tdp_pool, .tdp_pool_pages = 16 });
	nested_map(&n, 0, 0, l1_mem_size, PAGE_SIZE_2M);
	tdp_set_table(n.tdp, data_l2_gpa, 1, (void *)(uintptr_t)table_gpa);
	nested_map(&n, data_l2_gpa, target, data_size, PAGE_SIZE_4K);
	GUEST_SYNC(NESTED_MEMSLOT_START);

	for (;;) {
		nested_run(&n);
		nested_assert_exit(&n, NESTED_EXIT_CALL);	/* an NPF/EPT violation: a table entry missing */
		if (nested_forward_l2_call(&n) == NESTED_CALL_DONE)
			break;
		if (cmd_target != target) {
			target = cmd_target;
			nested_map(&n, data_l2_gpa, target, data_size, PAGE_SIZE_4K);
			nested_flush_tdp(&n);
		}
	}
}
