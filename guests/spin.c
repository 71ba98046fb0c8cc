// SPDX-License-Identifier: GPL-2.0-only
/* Never finishes: for timeout handling.  `spins` shows it was running. */
#include "lib/guest.h"

uint64_t spins;

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	GUEST_SYNC(1);
	for (;;)
		WRITE_ONCE(spins, spins + 1);
}
