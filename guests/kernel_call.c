// SPDX-License-Identifier: GPL-2.0-only
/*
 * The privilege helpers of lib/guest.h, at CPL0 or (user mode) CPL3:
 *
 *   KERNEL_CALL_WHERE:  (CS, guest_user_mode()) in guest_main
 *   KERNEL_CALL_CR3:    (guest_read_cr3())
 *   KERNEL_CALL_RESULT: (what kernel_call(in_kernel, arg) returned, the CS in_kernel ran with)
 *   KERNEL_CALL_FLUSHED: after guest_invlpg() and guest_reload_cr3(), a write through a
 *                       mapping it changed lands in the new frame: (value read back)
 *
 * Then, with `raw_cr3` set, a plain `mov %cr3` (a #GP at CPL3).
 */
#include "lib/guest.h"

/* Set by the host. */
uint64_t arg;
uint64_t page_gva;      /* a 4K mapping the guest points at frame_gpa[1] */
uint64_t frame_gpa[2];
uint64_t raw_cr3;

/* Written by in_kernel. */
uint64_t kernel_cs;

static uint64_t in_kernel(uint64_t a)
{
	WRITE_ONCE(kernel_cs, read_cs());
	return a ^ KERNEL_CALL_TEST_MAGIC;
}

void guest_main(uint32_t vcpu_id, uint64_t unused)
{
	uint64_t *pte;
	int level = 0;

	GUEST_SYNC(KERNEL_CALL_WHERE, read_cs(), guest_user_mode());
	GUEST_SYNC(KERNEL_CALL_CR3, guest_read_cr3());
	GUEST_SYNC(KERNEL_CALL_RESULT, kernel_call(in_kernel, arg), READ_ONCE(kernel_cs));

	/* Read through the old frame (a TLB entry), move the mapping, flush both ways. */
	(void)READ_ONCE(*(volatile uint64_t *)page_gva);
	pte = guest_pte(page_gva, &level);
	GUEST_ASSERT(pte && level == 1);
	WRITE_ONCE(*pte, (*pte & ~PTE_ADDR_MASK) | frame_gpa[1]);
	guest_invlpg(page_gva);
	guest_reload_cr3();
	WRITE_ONCE(*(volatile uint64_t *)page_gva, KERNEL_CALL_TEST_MAGIC);
	GUEST_SYNC(KERNEL_CALL_FLUSHED, READ_ONCE(*(volatile uint64_t *)page_gva));

	if (raw_cr3)
		GUEST_SYNC(KERNEL_CALL_RAW_CR3, read_cr3());
	GUEST_DONE();
}
