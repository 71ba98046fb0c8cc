// SPDX-License-Identifier: GPL-2.0-only
/*
 * Which pages of L1's nested state KVM writes on L1's behalf, for a dirty-log
 * selftest (SVM or VMX, nested.h).
 *
 * The host gives L1 a memslot of its own at state_gpa (KVM_WRITES_PAGES pages)
 * and L1 keeps there, and nowhere else: its VMCB (with host save area and
 * bitmaps) or VMXON region and VMCS, from page 0; its NPT/EPT tables, from page
 * KVM_WRITES_POOL; and two data pages, KVM_WRITES_READ and KVM_WRITES_WRITE,
 * that L2 reaches at KVM_WRITES_L2_GPA (+4K) through NPT/EPT entries created
 * with the accessed (leaves: and dirty) flags clear, in a PDPT entry of their
 * own.  L1 writes the slot only before SETUP and when stepping L2 over its
 * VMMCALL/VMCALL, between EXITED and READY, so the host harvests around:
 *
 *   SETUP    (VMCB12/VMCS12 page, PDPT, PD and PT of the data pages, A/D in use)
 *   READY    round 1: L2 reads the READ page, writes the WRITE page, VMMCALLs
 *   EXITED   (exit code)
 *   READY    round 2: L2 only VMMCALLs
 *   EXITED   (exit code)
 *   READY, CLEARED  VMX only: L1 VMCLEARs and VMPTRLDs its VMCS
 */
#include "lib/guest.h"
#include "lib/nested.h"

#define L2_GPA ((uint64_t)KVM_WRITES_L2_GPA)

uint64_t l1_mem_size = 64ul << 20;
uint64_t state_gpa;

static struct nested n;
static uint8_t l2_stack[16384] __attribute__((aligned(16)));

static uint64_t state_page(uint64_t i)
{
	return state_gpa + i * PAGE_SIZE_4K;
}

static void l2_main(uint64_t arg)
{
	(void)READ_ONCE(*(volatile uint64_t *)L2_GPA);
	WRITE_ONCE(*(volatile uint64_t *)(L2_GPA + PAGE_SIZE_4K), 0x1234);
	nested_l2_call(0, 0, 0, 0, 0);		/* exits; L1 only steps over it */
	nested_l2_call(0, 0, 0, 0, 0);
	nested_l2_done();
}

/* One harvest window: READY, enter L2 until it VMMCALLs, EXITED (L1 only reads), step over the call. */
static void round_trip(void)
{
	GUEST_SYNC(KVM_WRITES_READY);
	nested_run(&n);
	nested_assert_exit(&n, NESTED_EXIT_CALL);
	GUEST_SYNC(KVM_WRITES_EXITED, n.exit_code);
	if (n.vendor == NESTED_SVM)
		svm_skip_insn(&n.svm, 3);
	else
		vmx_skip_insn(&n.vmx);
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	union nested_pages *pages = (union nested_pages *)(uintptr_t)state_page(0);
	uint64_t vmcb;

	_Static_assert(sizeof(union nested_pages) <= KVM_WRITES_POOL * 4096, "VMCB/VMCS pages fit");
	GUEST_ASSERT(state_gpa >= l1_mem_size);
	nested_init(&n, &(struct nested_config){
		.l2_main = l2_main, .l2_stack_top = l2_stack + sizeof(l2_stack),
		.tdp_pool = (void *)(uintptr_t)state_page(KVM_WRITES_POOL),
		.tdp_pool_pages = KVM_WRITES_READ - KVM_WRITES_POOL, .pages = pages });
	nested_map(&n, 0, 0, l1_mem_size, PAGE_SIZE_2M);
	if (n.tdp->accessed)
		tdp_map_unaccessed(n.tdp, L2_GPA, state_page(KVM_WRITES_READ), 2 * PAGE_SIZE_4K, 1);
	else
		nested_map(&n, L2_GPA, state_page(KVM_WRITES_READ), 2 * PAGE_SIZE_4K, PAGE_SIZE_4K);
	vmcb = n.vendor == NESTED_SVM ? (uint64_t)(uintptr_t)&pages->svm.vmcb
				      : (uint64_t)(uintptr_t)pages->vmx.vmcs;
	GUEST_SYNC(KVM_WRITES_SETUP, vmcb, (uint64_t)(uintptr_t)tdp_table(n.tdp, L2_GPA, 3),
		   (uint64_t)(uintptr_t)tdp_table(n.tdp, L2_GPA, 2),
		   (uint64_t)(uintptr_t)tdp_table(n.tdp, L2_GPA, 1), n.tdp->accessed != 0);

	round_trip();
	round_trip();
	if (n.vendor == NESTED_VMX) {
		GUEST_SYNC(KVM_WRITES_READY);
		vmx_reload_vmcs(&n.vmx);
		GUEST_SYNC(KVM_WRITES_CLEARED);
	}
	nested_run(&n);
	GUEST_ASSERT_EQ(nested_forward_l2_call(&n), NESTED_CALL_DONE);
}
