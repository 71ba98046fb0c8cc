// SPDX-License-Identifier: GPL-2.0-only
/*
 * Every vCPU checks in, then waits until all nr_vcpus have checked in.  The
 * wait only finishes if the vCPUs really run at the same time.
 */
#include "lib/guest.h"

uint64_t nr_vcpus = 1;
uint64_t arrived;
uint64_t seen_arg[16];

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	GUEST_ASSERT(vcpu_id < 16);
	seen_arg[vcpu_id] = arg;
	__atomic_fetch_add(&arrived, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(&arrived, __ATOMIC_SEQ_CST) < READ_ONCE(nr_vcpus))
		cpu_relax();
	GUEST_SYNC(1, vcpu_id, (uint64_t)&arg);
	GUEST_DONE();
}
