// SPDX-License-Identifier: GPL-2.0-only
/*
 * L2 writes pages of a data region that L1 maps with 2M NPT/EPT pages, in
 * passes the host drives, for dirty-logging and huge-page-split tests of KVM's
 * nested (shadow NPT/EPT) MMU, on SVM or VMX (nested.h).
 *
 * Addresses (globals the host may set before the run):
 *   L2 GVA data_l2_gpa --(L1's own page tables, shared by L2; the host maps
 *   this range)--> L2 GPA data_l2_gpa --(NPT/EPT built here, 2M pages)--> L1
 *   GPA data_l1_gpa: the host's memslot.  L1 never touches the data itself,
 *   so every SPTE for that memslot belongs to the nested MMU.
 *   L2 GPAs [0, l1_mem_size) are identity mapped (2M pages) for L2's code,
 *   stack, page tables and globals.
 *
 * Each pass: L2 asks L1 to GUEST_SYNC(pass, pages written in the previous
 * pass); while the vCPU is stopped there the host reads stats, toggles dirty
 * logging and sets the next pass in `cmd_*`.  With cmd_stop set L2 finishes.
 * A pass writes the u64 (pass << 32 | page) at the start of pages first,
 * first + stride, ... of the region; with cmd_exec set it calls them instead,
 * at exec_offset, where the host has put a RET (an instruction fetch through
 * the nested MMU, for the kvm.nx_huge_pages tests).
 */
#include "lib/guest.h"
#include "lib/nested.h"

uint64_t data_l2_gpa = 0x40000000ul;
uint64_t data_l1_gpa = 0xc0000000ul;
uint64_t data_size = 64ul << 20;
uint64_t l1_mem_size = 64ul << 20;

uint64_t exec_offset = 2048;	/* the host's before an exec pass; in .data, which L2 reads each pass */

volatile uint64_t cmd_first;
volatile uint64_t cmd_stride = 1;
volatile uint64_t cmd_exec;
volatile uint64_t cmd_stop;

static struct nested n;
static uint8_t tdp_pool[16][4096] __attribute__((aligned(4096)));
static uint8_t l2_stack[16384] __attribute__((aligned(16)));

static void l2_main(uint64_t arg)
{
	uint64_t npages = data_size / PAGE_SIZE_4K, written = 0;

	for (uint64_t pass = 1;; pass++) {
		nested_l2_sync(pass, written, 0, 0);
		if (cmd_stop)
			break;
		uint64_t stride = cmd_stride, first = cmd_first, exec = cmd_exec;

		GUEST_ASSERT(stride > 0 && exec_offset < PAGE_SIZE_4K);
		written = 0;
		for (uint64_t i = first; i < npages; i += stride, written++) {
			uint64_t page = data_l2_gpa + i * PAGE_SIZE_4K;

			if (exec)
				((void (*)(void))(page + exec_offset))();
			else
				WRITE_ONCE(*(volatile uint64_t *)page, pass << 32 | i);
		}
	}
	nested_l2_done();
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	GUEST_ASSERT(data_l2_gpa >= l1_mem_size);
	nested_init(&n, &(struct nested_config){
		.l2_main = l2_main, .l2_stack_top = l2_stack + sizeof(l2_stack),
		.tdp_pool = tdp_pool, .tdp_pool_pages = 16 });
	nested_map(&n, 0, 0, l1_mem_size, PAGE_SIZE_2M);
	nested_map(&n, data_l2_gpa, data_l1_gpa, data_size, PAGE_SIZE_2M);

	while (nested_run(&n) == NESTED_EXIT_CALL && nested_forward_l2_call(&n) != NESTED_CALL_DONE)
		;
	nested_assert_exit(&n, NESTED_EXIT_CALL);
}
