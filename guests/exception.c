// SPDX-License-Identifier: GPL-2.0-only
/*
 * Unexpected and expected exceptions, chosen by `mode`:
 *   0: read an unmapped address (#PF, reported to the host)
 *   1: ud2 (#UD, reported to the host)
 *   2: ud2 twice with a #UD handler installed that skips it, then done
 */
#include "lib/guest.h"

uint64_t mode;
uint64_t unmapped_gva = 0x40000000000ull;	/* 4 TiB: never mapped */
uint64_t ud_count;

static void skip_ud2(struct ex_regs *regs)
{
	ud_count++;
	regs->rip += 2;
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	GUEST_SYNC(1);
	switch (mode) {
	case 0:
		(void)READ_ONCE(*(uint64_t *)unmapped_gva);
		break;
	case 1:
		ud2();
		break;
	case 2:
		guest_install_handler(UD_VECTOR, skip_ud2);
		ud2();
		ud2();
		GUEST_ASSERT_EQ(ud_count, 2);
		break;
	}
	GUEST_DONE();
}
