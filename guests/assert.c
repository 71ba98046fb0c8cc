// SPDX-License-Identifier: GPL-2.0-only
/* Guest assertions: the host picks which one fails through `mode`. */
#include "lib/guest.h"

uint64_t mode;
uint64_t value = 41;

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	GUEST_SYNC(1);
	switch (mode) {
	case 0:
		GUEST_ASSERT_EQ(value, 42);
		break;
	case 1:
		GUEST_ASSERT_MSG(value > 100, "value is only %lu", value);
		break;
	case 2:
		GUEST_ASSERT_NE(value, 41);
		break;
	}
	GUEST_DONE();
}
