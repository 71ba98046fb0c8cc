// SPDX-License-Identifier: GPL-2.0-only
/*
 * Broken ucalls, chosen by `mode`:
 *   0: a ucall pointer outside guest memory
 *   1: a ucall struct that straddles the end of guest memory (ptr = bad_gpa)
 *   2: a wrong magic
 *   3: a len larger than the buffer
 */
#include "lib/guest.h"

uint64_t mode;
uint64_t bad_gpa = 0xfffff000;
static struct ucall uc;

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	GUEST_SYNC(1);
	switch (mode) {
	case 0:
	case 1:
		outl(UCALL_PORT, (uint32_t)bad_gpa);
		break;
	case 2:
		uc.cmd = UCALL_SYNC;
		uc.magic = 0x12345678;
		outl(UCALL_PORT, (uint32_t)(uintptr_t)&uc);
		break;
	case 3:
		uc.cmd = UCALL_PRINTF;
		uc.len = UCALL_BUF_SIZE + 1;
		uc.magic = UCALL_MAGIC;
		outl(UCALL_PORT, (uint32_t)(uintptr_t)&uc);
		break;
	}
	GUEST_DONE();
}
