// SPDX-License-Identifier: GPL-2.0-only
/*
 * Touch memory through the extra mappings the host built (e.g. a 2M and a
 * 1G page).  For each region i the host sets gva[i] and the offsets to
 * probe; at every probed offset the guest checks the value the host wrote
 * (expect ^ offset) and writes back ~(expect ^ offset) 8 bytes further.
 */
#include "lib/guest.h"

#define MAX_REGIONS 4
#define MAX_OFFSETS 4

uint64_t nr_regions;
uint64_t gva[MAX_REGIONS];
uint64_t offsets[MAX_REGIONS][MAX_OFFSETS];
uint64_t nr_offsets[MAX_REGIONS];
uint64_t expect[MAX_REGIONS];

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	GUEST_ASSERT(nr_regions <= MAX_REGIONS);
	for (uint64_t i = 0; i < nr_regions; i++) {
		GUEST_ASSERT(nr_offsets[i] <= MAX_OFFSETS);
		for (uint64_t j = 0; j < nr_offsets[i]; j++) {
			volatile uint64_t *p = (uint64_t *)(gva[i] + offsets[i][j]);

			GUEST_ASSERT_EQ(p[0], expect[i] ^ offsets[i][j]);
			p[1] = ~(expect[i] ^ offsets[i][j]);
		}
		GUEST_SYNC(1, i);
	}
	GUEST_DONE();
}
