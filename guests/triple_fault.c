// SPDX-License-Identifier: GPL-2.0-only
/* Load an empty IDT and fault: #UD -> #GP -> #DF -> triple fault (SHUTDOWN). */
#include "lib/guest.h"

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr = { 0, 0 };

	GUEST_SYNC(1);
	__asm__ volatile("lidt %0" :: "m"(idtr) : "memory");
	ud2();
	GUEST_DONE();
}
