// SPDX-License-Identifier: GPL-2.0-only
/*
 * Edit the guest's own last-level page tables, for the unsync selftest.
 *
 * The host maps the test region with 4K pages, so each 2M of it has its own
 * page table (PT) page, and writes into the first 8 bytes of pages 0 and 1
 * of every 2M the page's GPA.  With shadow paging KVM shadows each PT the
 * guest walks and write-protects it; the first guest write to such a PT
 * makes KVM mark the shadow page unsync instead of emulating the write.
 *
 *   UNSYNC_READY:        the leaf PTEs of pages 0 and 1 of every 2M looked up
 *   UNSYNC_SHADOWED:     read pages 0 and 1 of every 2M (KVM now shadows every PT)
 *   UNSYNC_EDITED:       in the first nr_unsync PTs, swap the frames of the PTEs
 *                        of pages 0 and 1 -- no TLB flush yet
 *   UNSYNC_INVLPG:       invlpg both pages of each edited PT, check the guest sees
 *                        the swapped frames (and the other PTs are unchanged)
 *   UNSYNC_CR3:          reload CR3 (a full flush: KVM syncs every unsync page)
 *                        and check again
 *   UNSYNC_SWAPPED_BACK: swap the frames back, no flush yet
 *   UNSYNC_RESTORED:     reload CR3, check the original frames
 *
 * In user mode the privileged steps (CR3 read, invlpg, CR3 reload) are kernel
 * calls, which KVM may emulate; the steps that KVM must see as native guest
 * accesses (SHADOWED, EDITED, SWAPPED_BACK) make none, so the host can check
 * from insn_emulation that each of those ran natively.
 */
#include "lib/guest.h"

#define MAX_TABLES 64

/* Set by the host. */
uint64_t test_gva;
uint64_t test_gpa;
uint64_t nr_tables;
uint64_t nr_unsync;

/* The leaf PTEs of pages 0 and 1 of each table. */
static uint64_t *ptes[MAX_TABLES][2];

static uint64_t page_gva(uint64_t table, uint64_t page)
{
	return test_gva + table * PAGE_SIZE_2M + page * PAGE_SIZE_4K;
}

static uint64_t page_gpa(uint64_t table, uint64_t page)
{
	return test_gpa + table * PAGE_SIZE_2M + page * PAGE_SIZE_4K;
}

static uint64_t *leaf(uint64_t *root, uint64_t gva)
{
	int level = 0;
	uint64_t *pte = pt_walk(root, gva, PTE_PRESENT, &level);

	GUEST_ASSERT(pte != NULL);
	GUEST_ASSERT_EQ(level, 1);
	return pte;
}

static void swap_frames(uint64_t table)
{
	uint64_t *a = ptes[table][0], *b = ptes[table][1];
	uint64_t ea = READ_ONCE(*a), eb = READ_ONCE(*b);

	WRITE_ONCE(*a, (ea & ~PTE_ADDR_MASK) | (eb & PTE_ADDR_MASK));
	WRITE_ONCE(*b, (eb & ~PTE_ADDR_MASK) | (ea & PTE_ADDR_MASK));
}

/* What the guest reads at page `page` of `table`, given whether it is swapped. */
static void check(uint64_t table, bool swapped)
{
	for (uint64_t page = 0; page < 2; page++) {
		uint64_t seen = READ_ONCE(*(volatile uint64_t *)page_gva(table, page));
		uint64_t want = page_gpa(table, swapped ? 1 - page : page);

		GUEST_ASSERT_EQ(seen, want);
	}
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	uint64_t *root = (uint64_t *)(guest_read_cr3() & PTE_ADDR_MASK);
	uint64_t t;

	GUEST_ASSERT(nr_tables <= MAX_TABLES && nr_unsync <= nr_tables);
	for (t = 0; t < nr_tables; t++) {
		ptes[t][0] = leaf(root, page_gva(t, 0));
		ptes[t][1] = leaf(root, page_gva(t, 1));
	}
	GUEST_SYNC(UNSYNC_READY);

	for (t = 0; t < nr_tables; t++)
		check(t, false);
	GUEST_SYNC(UNSYNC_SHADOWED);

	for (t = 0; t < nr_unsync; t++)
		swap_frames(t);
	GUEST_SYNC(UNSYNC_EDITED);

	for (t = 0; t < nr_unsync; t++) {
		guest_invlpg(page_gva(t, 0));
		guest_invlpg(page_gva(t, 1));
	}
	for (t = 0; t < nr_tables; t++)
		check(t, t < nr_unsync);
	GUEST_SYNC(UNSYNC_INVLPG);

	guest_reload_cr3();
	for (t = 0; t < nr_tables; t++)
		check(t, t < nr_unsync);
	GUEST_SYNC(UNSYNC_CR3);

	for (t = 0; t < nr_unsync; t++)
		swap_frames(t);
	GUEST_SYNC(UNSYNC_SWAPPED_BACK);

	guest_reload_cr3();
	for (t = 0; t < nr_tables; t++)
		check(t, false);
	GUEST_SYNC(UNSYNC_RESTORED);
	GUEST_DONE();
}
