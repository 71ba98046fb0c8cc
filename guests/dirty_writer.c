// SPDX-License-Identifier: GPL-2.0-only
/*
 * Dirty-logging writer.  Each vCPU stores the current stamp (the host-set global
 * `iteration`) into the first 8 bytes of pages of the test region, in rounds:
 *
 *   park:   GUEST_SYNC(DIRTY_WRITER_PARKED, vcpu, writes) -- the host holds the vCPU
 *           here between rounds (sets iteration, clears stop, collects, checks)
 *   sweep:  if `stride` is non-zero, every stride-th page of the vCPU's range
 *           (with `burst` non-zero, in runs of `burst` pages by store_burst: a
 *           5-instruction loop, as tight as upstream's dirty_log_test writer, so
 *           many pages are dirtied between two of KVM's request checks)
 *   random: pseudo-random pages of the range until the host sets `stop` (with
 *           `random_run` non-zero, runs of that many consecutive pages from a
 *           pseudo-random one, by store_burst; every `sync_every` writes,
 *           GUEST_SYNC(DIRTY_WRITER_PROGRESS) if non-zero)
 *
 * A vCPU's range (`vcpu_first`/`vcpu_npages`) is read at every park, so the host
 * may change it between rounds.
 *
 * `iteration` is re-read for every store (see store_stamp), so the host may also change it while
 * the guest runs (to tell phases apart).  Setting `quit` before releasing a
 * parked vCPU ends it with GUEST_DONE.  The counters live in the program's
 * .bss (memslot 0), never in the logged region.
 */
#include "lib/guest.h"

#define MAX_VCPUS 16

/* Set by the host. */
uint64_t iteration;
uint64_t stop;
uint64_t quit;
uint64_t test_gva;
uint64_t test_npages;
uint64_t stride;
uint64_t sync_every;
uint64_t burst;
uint64_t random_run;
uint64_t seed = 1;
uint64_t vcpu_first[MAX_VCPUS];   /* per-vCPU page range; npages 0 = whole region */
uint64_t vcpu_npages[MAX_VCPUS];

/* Read by the host. */
uint64_t nr_writes[MAX_VCPUS];
uint64_t nr_rounds[MAX_VCPUS];

static inline uint64_t next_random(uint64_t *s)
{
	/* xorshift64* */
	uint64_t x = *s;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545f4914f6cdd1dull;
}

/*
 * The only store to the test region, in asm so the host can tell exactly which
 * store a kicked vCPU left unfinished: stopped at `stamp_store`, the vCPU has
 * loaded the stamp (rax) but not stored it to the page at rdi; when it runs again
 * that store retires with that (by then old) stamp.  Anywhere else, no store to
 * the region is pending.
 */
void store_stamp(volatile uint64_t *p);
asm(".pushsection .text\n"
    ".globl store_stamp\n"
    ".type store_stamp, @function\n"
    "store_stamp:\n"
    "	movq iteration(%rip), %rax\n"
    ".globl stamp_store\n"
    "stamp_store:\n"
    "	movq %rax, (%rdi)\n"
    "	ret\n"
    ".size store_stamp, . - store_stamp\n"
    ".popsection\n");

/*
 * store_burst(p, n, step): n stores of the (re-read) stamp to p, p + step, ...
 * Like stamp_store, `burst_store` is the only store: a vCPU stopped there has
 * loaded the stamp (rax) and not yet stored it to the page at rdi.
 */
void store_burst(volatile uint64_t *p, uint64_t n, uint64_t step);
asm(".pushsection .text\n"
    ".globl store_burst\n"
    ".type store_burst, @function\n"
    "store_burst:\n"
    "	test %rsi, %rsi\n"
    "	jz 2f\n"
    "1:	movq iteration(%rip), %rax\n"
    ".globl burst_store\n"
    "burst_store:\n"
    "	movq %rax, (%rdi)\n"
    "	addq %rdx, %rdi\n"
    "	decq %rsi\n"
    "	jnz 1b\n"
    "2:	ret\n"
    ".size store_burst, . - store_burst\n"
    ".popsection\n");

static inline void write_page(uint32_t id, uint64_t page)
{
	store_stamp((volatile uint64_t *)(test_gva + page * PAGE_SIZE_4K));
	WRITE_ONCE(nr_writes[id], nr_writes[id] + 1);
}

void guest_main(uint32_t id, uint64_t arg)
{
	uint64_t rng, first, n, since_sync = 0;

	GUEST_ASSERT(id < MAX_VCPUS);
	rng = (seed ^ (0x9e3779b97f4a7c15ull * (id + 1))) | 1;

	for (;;) {
		GUEST_SYNC(DIRTY_WRITER_PARKED, id, READ_ONCE(nr_writes[id]));
		if (READ_ONCE(quit))
			break;
		WRITE_ONCE(nr_rounds[id], nr_rounds[id] + 1);
		first = READ_ONCE(vcpu_npages[id]) ? READ_ONCE(vcpu_first[id]) : 0;
		n = READ_ONCE(vcpu_npages[id]) ? READ_ONCE(vcpu_npages[id]) : READ_ONCE(test_npages);
		GUEST_ASSERT(n > 0);
		GUEST_ASSERT(first + n <= test_npages);

		uint64_t s = READ_ONCE(stride);
		uint64_t b = READ_ONCE(burst);
		if (s && b) {
			for (uint64_t p = first; p < first + n && !READ_ONCE(stop); ) {
				uint64_t k = (first + n - p + s - 1) / s;

				if (k > b)
					k = b;
				store_burst((volatile uint64_t *)(test_gva + p * PAGE_SIZE_4K), k, s * PAGE_SIZE_4K);
				WRITE_ONCE(nr_writes[id], nr_writes[id] + k);
				p += k * s;
			}
		} else if (s) {
			for (uint64_t p = first; p < first + n && !READ_ONCE(stop); p += s)
				write_page(id, p);
		}
		uint64_t run = READ_ONCE(random_run);
		while (!READ_ONCE(stop)) {
			if (run) {
				uint64_t p = first + next_random(&rng) % n;
				uint64_t k = first + n - p < run ? first + n - p : run;

				store_burst((volatile uint64_t *)(test_gva + p * PAGE_SIZE_4K), k, PAGE_SIZE_4K);
				WRITE_ONCE(nr_writes[id], nr_writes[id] + k);
			} else {
				write_page(id, first + next_random(&rng) % n);
			}
			if (sync_every && ++since_sync >= sync_every) {
				since_sync = 0;
				GUEST_SYNC(DIRTY_WRITER_PROGRESS, id, READ_ONCE(nr_writes[id]));
			}
		}
	}
	GUEST_DONE();
}
