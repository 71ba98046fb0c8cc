// SPDX-License-Identifier: GPL-2.0-only
/* Sync through two stages, print, and finish. */
#include "lib/guest.h"

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	GUEST_SYNC(1);
	GUEST_PRINTF("hello from vcpu %u, arg %lx", vcpu_id, arg);
	GUEST_SYNC(2, 0xdeadbeefcafeull, arg);
	GUEST_DONE();
}
