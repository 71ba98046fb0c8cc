// SPDX-License-Identifier: GPL-2.0-only
/*
 * L1 runs a 64-bit L2 under VMX and checks each VM exit.
 *
 * With EPT (when the VMX capability MSRs offer it), L2 GPAs [0, NESTED_SMOKE_IDENT_END)
 * are identity mapped to L1 GPAs with 2M EPT pages and the 2M above is a hole;
 * without EPT, L2 uses L1's physical memory directly.  L2 then
 *   1. VMCALLs with rax = NESTED_SMOKE_CALL_MAGIC, rdi = NESTED_SMOKE_ARG_MAGIC, rsi = its arg; L1 answers in rax
 *   2. sends a GUEST_SYNC itself (L1 does not exit on I/O)
 *   3. with EPT only: writes into the EPT hole: EPT violation; L1 maps that 4K
 *      page to its own `target` page, INVEPTs and resumes, L2's write retries
 *   4. HLTs
 *   5. says done with a second VMCALL
 * L1 reports every exit with GUEST_SYNC(stage, exit reason, ...), so the host
 * can check the whole sequence; stage 0 says whether EPT is in use.
 */
#include "lib/guest.h"
#include "lib/vmx.h"

/* The identity map (62 MiB of the runner's 64 MiB slot 0), the hole and the magic values: NESTED_SMOKE_* in lib/stages.h */

_Static_assert(NESTED_SMOKE_HOLE_GPA >= NESTED_SMOKE_IDENT_END && NESTED_SMOKE_HOLE_GPA < NESTED_SMOKE_IDENT_END + PAGE_SIZE_2M, "hole: the 2M above the identity map");
#define VMCALL_LEN     3                    /* 0f 01 c1 */
#define HLT_LEN        1                    /* f4 */

static struct vmx_ctx vmx;
static struct vmx_pages vmx_pages;
static uint8_t ept_pool[16][4096] __attribute__((aligned(4096)));
static struct ept ept;
static uint8_t l2_stack[16384] __attribute__((aligned(16)));
static uint8_t target[4096] __attribute__((aligned(4096)));
static volatile bool use_ept;               /* read by L2 too: same memory */

static void l2_main(uint64_t arg)
{
	uint64_t r = vmx_vmcall(NESTED_SMOKE_CALL_MAGIC, NESTED_SMOKE_ARG_MAGIC, arg, 0, 0);

	GUEST_ASSERT_EQ(r, NESTED_SMOKE_REPLY_MAGIC);
	GUEST_SYNC(NESTED_SMOKE_FROM_L2, arg);  /* straight from L2 to the host */
	if (use_ept) {
		WRITE_ONCE(*(volatile uint64_t *)(NESTED_SMOKE_HOLE_GPA + 8), NESTED_SMOKE_WRITE_MAGIC);
		GUEST_ASSERT_EQ(READ_ONCE(*(volatile uint64_t *)(NESTED_SMOKE_HOLE_GPA + 8)), NESTED_SMOKE_WRITE_MAGIC);
	}
	halt();
	vmx_vmcall(NESTED_SMOKE_DONE_MAGIC, 0, 0, 0, 0);
	GUEST_ASSERT_MSG(0, "L1 resumed L2 after done");
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	uint32_t reason;

	GUEST_ASSERT(NESTED_SMOKE_IDENT_END > (uint64_t)(uintptr_t)&target[4096]);
	vmx_enable(&vmx, &vmx_pages);
	vmx_vmcs_init(&vmx, l2_main, l2_stack + sizeof(l2_stack), NESTED_SMOKE_L2_ARG);
	use_ept = vmx_ept_supported();
	if (use_ept) {
		ept_init(&ept, ept_pool, 16, false);
		ept_map(&ept, 0, 0, NESTED_SMOKE_IDENT_END, PAGE_SIZE_2M);
		vmx_enable_ept(&vmx, &ept);
	}
	GUEST_SYNC(NESTED_SMOKE_SETUP, use_ept, vmx.basic & VMX_BASIC_REVISION_MASK);

	/* 1: L2's VMCALL, with its arguments in L2's saved registers. */
	reason = vmx_run(&vmx);
	VMX_ASSERT_EXIT(VMX_EXIT_VMCALL);
	GUEST_SYNC(NESTED_SMOKE_CALL, reason, vmx.gprs.rax, vmx.gprs.rdi, vmx.gprs.rsi, vmx_exit_insn_len());
	GUEST_ASSERT_EQ(vmx.gprs.rax, NESTED_SMOKE_CALL_MAGIC);
	GUEST_ASSERT_EQ(vmx.gprs.rdi, NESTED_SMOKE_ARG_MAGIC);
	GUEST_ASSERT_EQ(vmx_exit_insn_len(), VMCALL_LEN);
	vmx.gprs.rax = NESTED_SMOKE_REPLY_MAGIC;
	vmx_skip_insn(&vmx);

	/* 3: the write into the hole is an EPT violation at exactly that L2 GPA. */
	if (use_ept) {
		uint64_t qual, gpa;

		reason = vmx_run(&vmx);
		VMX_ASSERT_EXIT(VMX_EXIT_EPT_VIOLATION);
		qual = vmx_exit_qual();
		gpa = vmreadz(GUEST_PHYSICAL_ADDRESS);
		GUEST_SYNC(NESTED_SMOKE_FAULT, reason, qual, gpa, vmreadz(GUEST_LINEAR_ADDRESS));
		GUEST_ASSERT_EQ(gpa, NESTED_SMOKE_HOLE_GPA + 8);
		GUEST_ASSERT_EQ(qual & (EPT_VIOL_READ | EPT_VIOL_WRITE | EPT_VIOL_FETCH), EPT_VIOL_WRITE);
		GUEST_ASSERT(!ept_leaf(&ept, NESTED_SMOKE_HOLE_GPA, NULL));
		ept_map(&ept, NESTED_SMOKE_HOLE_GPA & ~0xffful, (uint64_t)(uintptr_t)target, PAGE_SIZE_4K, PAGE_SIZE_4K);
		vmx_invept(&vmx);
		/* An EPT violation is not an instruction exit: L2 retries the write. */
	}

	/* 4: HLT; with EPT, L2's retried write must have landed in `target` by now. */
	reason = vmx_run(&vmx);
	VMX_ASSERT_EXIT(VMX_EXIT_HLT);
	GUEST_SYNC(NESTED_SMOKE_HLT, reason, vmx_exit_insn_len(), READ_ONCE(*(volatile uint64_t *)(target + 8)));
	GUEST_ASSERT_EQ(vmx_exit_insn_len(), HLT_LEN);
	if (use_ept)
		GUEST_ASSERT_EQ(READ_ONCE(*(volatile uint64_t *)(target + 8)), NESTED_SMOKE_WRITE_MAGIC);
	vmx_skip_insn(&vmx);

	/* 5: the second VMCALL says done. */
	reason = vmx_run(&vmx);
	VMX_ASSERT_EXIT(VMX_EXIT_VMCALL);
	GUEST_ASSERT_EQ(vmx.gprs.rax, NESTED_SMOKE_DONE_MAGIC);
	GUEST_SYNC(NESTED_SMOKE_DONE, reason, vmx.gprs.rax, vmx.nr_runs);
}
