// SPDX-License-Identifier: GPL-2.0-only
/*
 * Touch a region page by page, one pass per host command, for the MMU
 * (page splitting / huge page recovery) selftests.
 *
 * The guest parks at GUEST_SYNC(MMU_TOUCH_PARKED, passes, sum) between passes;
 * while it is parked the VM is quiescent, so the host can read the stats,
 * toggle dirty logging and set up the next pass:
 *
 *   op        MMU_TOUCH_OP_READ, _WRITE, _EXEC or _QUIT (lib/stages.h); _RELOAD_CR3
 *             instead of a pass, after the host changed the guest's page tables
 *   start     byte offset of the first page touched, from test_gva
 *   length    bytes covered by the pass
 *   stride    bytes between touched addresses (a multiple of 8)
 *   stamp     a write pass stores stamp ^ offset in the first 8 bytes at each
 *             touched address; a read pass sums what it finds there into `sum`;
 *             an exec pass calls a RET the host put exec_offset bytes past each
 *             touched address (an instruction fetch, for kvm.nx_huge_pages)
 *
 * The region itself holds nothing but test data: the counters live in this
 * program's .bss, in memslot 0.
 */
#include "lib/guest.h"

/* Set by the host. */
uint64_t test_gva;
uint64_t test_size;
uint64_t op;
uint64_t start;
uint64_t length;
uint64_t stride;
uint64_t stamp;
uint64_t exec_offset;	/* in .bss, whose page the counters keep mapped: no new SPTE at a first exec pass */

/* Read by the host. */
uint64_t passes;
uint64_t sum;
uint64_t touched;

static void touch(uint64_t o, uint64_t first, uint64_t len, uint64_t step, uint64_t s)
{
	volatile uint64_t *p;
	uint64_t off, acc = 0, n = 0;

	for (off = first; off < first + len; off += step, n++) {
		p = (volatile uint64_t *)(test_gva + off);
		if (o == MMU_TOUCH_OP_WRITE)
			*p = s ^ off;
		else if (o == MMU_TOUCH_OP_EXEC)
			((void (*)(void))(test_gva + off + exec_offset))();
		else
			acc += *p;
	}
	WRITE_ONCE(sum, acc);
	WRITE_ONCE(touched, n);
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	for (;;) {
		GUEST_SYNC(MMU_TOUCH_PARKED, READ_ONCE(passes), READ_ONCE(sum));

		uint64_t o = READ_ONCE(op);
		uint64_t first = READ_ONCE(start), len = READ_ONCE(length);
		uint64_t step = READ_ONCE(stride);

		if (o == MMU_TOUCH_OP_QUIT)
			break;
		if (o == MMU_TOUCH_OP_RELOAD_CR3) {
			guest_reload_cr3();
			continue;
		}
		GUEST_ASSERT(o == MMU_TOUCH_OP_READ || o == MMU_TOUCH_OP_WRITE || o == MMU_TOUCH_OP_EXEC);
		GUEST_ASSERT(step >= 8 && step % 8 == 0);
		GUEST_ASSERT(o != MMU_TOUCH_OP_EXEC || exec_offset < step);
		GUEST_ASSERT(first + len <= test_size && first + len >= first);
		touch(o, first, len, step, READ_ONCE(stamp));
		WRITE_ONCE(passes, passes + 1);
	}
	GUEST_DONE();
}
