// SPDX-License-Identifier: GPL-2.0-only
/* Read parameters the host wrote into globals; leave results in globals. */
#include "lib/guest.h"

uint64_t in_value;
uint32_t in_array[4];
uint64_t out_value;
char out_text[32];

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	uint64_t sum = in_value * 3;

	for (int i = 0; i < 4; i++)
		sum += in_array[i];
	out_value = sum;
	guest_snprintf(out_text, sizeof(out_text), "sum=%lu", sum);
	GUEST_DONE();
}
