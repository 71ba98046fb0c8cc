// SPDX-License-Identifier: GPL-2.0-only
/*
 * Exits to the host forever, as fast as the guest can: the KVM_RUN round-trip
 * benchmark (kvmpy.perf.micro).  At CPL0 each exit is an OUT to EXIT_LOOP_PORT;
 * when the host sets `mmio_gpa` (a user-mode guest, where OUT faults) it is an
 * 8-byte store there, which no memslot backs.
 */
#include "lib/guest.h"

uint64_t mmio_gpa;

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	volatile uint64_t *mmio = (volatile uint64_t *)mmio_gpa;

	if (mmio)
		for (;;)
			*mmio = 0;
	for (;;)
		outb(EXIT_LOOP_PORT, 0);
}
