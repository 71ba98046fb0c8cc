// SPDX-License-Identifier: GPL-2.0-only
/*
 * The `kvmpy perf dirty-log` guest: each vCPU touches every page of its part
 * of the test memory, one pass per host iteration, the way the kernel
 * selftests' memstress guest does (same per-page steps and the same
 * Park-Miller random numbers, so the two tools run the same guest work):
 *
 *   for each of its pages (in order, or a random page each step):
 *       write 0x0123456789ABCDEF to the page's first 8 bytes with probability
 *       write_percent %, else read them
 *   GUEST_SYNC(MEMSTRESS_PASS_DONE, pass); finish when the host has set `quit`
 *
 * The host parks the vCPU in the sync between passes and may change
 * write_percent and random_access there.  With `nested_vendor` set (nested.h),
 * L1 runs the loop in an L2 (SVM with NPT or VMX with EPT) whose guest
 * physical memory is the ranges in nested_gpa/nested_size, identity mapped
 * with 2M pages; L2 syncs with the host directly (its port I/O or MMIO is not
 * intercepted by L1).
 */
#include "lib/guest.h"
#include "lib/nested.h"

#define MAX_VCPUS 16
#define NESTED_RANGES 4
#define TDP_POOL_PAGES 32

/* Set by the host (kvmpy.perf.memstress). */
uint64_t vcpu_gva[MAX_VCPUS];
uint64_t vcpu_pages[MAX_VCPUS];
uint64_t page_size = PAGE_SIZE_4K;
uint32_t write_percent = 100;
uint64_t random_access;
uint32_t random_seed = 1;
uint64_t quit;
uint64_t nested_gpa[NESTED_RANGES];
uint64_t nested_size[NESTED_RANGES];

struct random_state {
	uint32_t seed;
};

/* Park-Miller "minimal standard", out of line as the selftests' guest_random_u32(). */
static __attribute__((noinline)) uint32_t random_u32(struct random_state *s)
{
	s->seed = (uint64_t)s->seed * 48271 % ((uint32_t)(1u << 31) - 1);
	return s->seed;
}

static void memstress(uint32_t vcpu_id)
{
	struct random_state rs = { .seed = random_seed + vcpu_id };
	uint64_t gva = vcpu_gva[vcpu_id], pages = vcpu_pages[vcpu_id];

	for (uint64_t pass = 0;; pass++) {
		for (uint64_t i = 0; i < pages; i++) {
			uint64_t page = READ_ONCE(random_access) ? random_u32(&rs) % pages : i;
			volatile uint64_t *addr = (volatile uint64_t *)(gva + page * READ_ONCE(page_size));

			if (random_u32(&rs) % 100 < READ_ONCE(write_percent))
				*addr = 0x0123456789ABCDEFull;
			else
				(void)*addr;
		}
		GUEST_SYNC(MEMSTRESS_PASS_DONE, pass);
		if (READ_ONCE(quit))
			return;
	}
}

static struct nested nested_l1[MAX_VCPUS];
static union nested_pages nested_pages[MAX_VCPUS] __attribute__((aligned(4096)));
static uint8_t tdp_pool[MAX_VCPUS][TDP_POOL_PAGES][4096] __attribute__((aligned(4096)));
static uint8_t l2_stack[MAX_VCPUS][16384] __attribute__((aligned(16)));

static void l2_main(uint64_t vcpu_id)
{
	memstress(vcpu_id);
	nested_l2_done();
	GUEST_ASSERT_MSG(0, "L1 resumed L2 after done");
}

/* L1: run the loop in an L2 whose GPAs are the nested ranges, identity mapped with 2M pages. */
static void run_in_l2(uint32_t id)
{
	struct nested *n = &nested_l1[id];

	nested_init(n, &(struct nested_config){
		.l2_main = l2_main, .l2_stack_top = l2_stack[id] + sizeof(l2_stack[id]), .l2_arg = id,
		.tdp_pool = tdp_pool[id], .tdp_pool_pages = TDP_POOL_PAGES, .pages = &nested_pages[id] });
	for (int r = 0; r < NESTED_RANGES; r++)
		if (nested_size[r])
			nested_map(n, nested_gpa[r], nested_gpa[r], nested_size[r], PAGE_SIZE_2M);
	while (nested_run(n) == NESTED_EXIT_CALL && nested_forward_l2_call(n) != NESTED_CALL_DONE)
		;
	nested_assert_exit(n, NESTED_EXIT_CALL);
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	GUEST_ASSERT(vcpu_id < MAX_VCPUS);
	if (READ_ONCE(nested_vendor))
		run_in_l2(vcpu_id);
	else
		memstress(vcpu_id);
}
