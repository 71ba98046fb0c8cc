// SPDX-License-Identifier: GPL-2.0-only
/*
 * L1 runs a 64-bit L2 under SVM with nested paging and checks each #VMEXIT.
 *
 * L2 GPAs [0, NESTED_SMOKE_IDENT_END) are identity mapped to L1 GPAs with 2M NPT
 * pages; the 2M above is a hole.  L2 then
 *   1. VMMCALLs with rax = NESTED_SMOKE_CALL_MAGIC, rdi = NESTED_SMOKE_ARG_MAGIC; L1 answers in rax
 *   2. sends a GUEST_SYNC itself (its I/O is not intercepted by L1)
 *   3. writes into the NPT hole: NPF; L1 maps that 4K page to its own
 *      `target` page (an offset mapping) and resumes, L2's write retries
 *   4. HLTs
 *   5. says done with VMMCALL
 * L1 reports every exit with GUEST_SYNC(stage, exit code, info...), so the
 * host can check the whole sequence.
 */
#include "lib/guest.h"
#include "lib/svm.h"

/* The identity map (62 MiB of the runner's 64 MiB slot 0), the hole and the magic values: NESTED_SMOKE_* in lib/stages.h */

_Static_assert(NESTED_SMOKE_HOLE_GPA >= NESTED_SMOKE_IDENT_END && NESTED_SMOKE_HOLE_GPA < NESTED_SMOKE_IDENT_END + PAGE_SIZE_2M, "hole: the 2M above the identity map");

static struct svm_ctx svm;
static struct svm_pages svm_pages;
static uint8_t npt_pool[16][4096] __attribute__((aligned(4096)));
static struct npt npt;
static uint8_t l2_stack[16384] __attribute__((aligned(16)));
static uint8_t target[4096] __attribute__((aligned(4096)));

static void l2_main(uint64_t arg)
{
	uint64_t r = svm_vmmcall(NESTED_SMOKE_CALL_MAGIC, NESTED_SMOKE_ARG_MAGIC, arg, 0, 0);

	GUEST_ASSERT_EQ(r, NESTED_SMOKE_REPLY_MAGIC);
	GUEST_SYNC(NESTED_SMOKE_FROM_L2, arg);  /* straight from L2 to the host */
	WRITE_ONCE(*(volatile uint64_t *)(NESTED_SMOKE_HOLE_GPA + 8), NESTED_SMOKE_WRITE_MAGIC);
	GUEST_ASSERT_EQ(READ_ONCE(*(volatile uint64_t *)(NESTED_SMOKE_HOLE_GPA + 8)), NESTED_SMOKE_WRITE_MAGIC);
	halt();
	svm_vmmcall(NESTED_SMOKE_DONE_MAGIC, 0, 0, 0, 0);
	GUEST_ASSERT_MSG(0, "L1 resumed L2 after done");
}

void guest_main(uint32_t vcpu_id, uint64_t arg)
{
	struct vmcb *vmcb;
	uint64_t code;

	GUEST_ASSERT(NESTED_SMOKE_IDENT_END > (uint64_t)(uintptr_t)&target[4096]);
	svm_enable(&svm, &svm_pages);
	vmcb = svm.vmcb;
	npt_init(&npt, npt_pool, 16);
	npt_map(&npt, 0, 0, NESTED_SMOKE_IDENT_END, PAGE_SIZE_2M);
	svm_vmcb_init(&svm, l2_main, l2_stack + sizeof(l2_stack), NESTED_SMOKE_L2_ARG);
	svm_enable_npt(&svm, &npt);

	/* 1: L2's VMMCALL, with its arguments in L2's saved registers. */
	code = svm_run(&svm);
	SVM_ASSERT_EXIT(&svm, SVM_EXIT_VMMCALL);
	GUEST_SYNC(NESTED_SMOKE_CALL, code, vmcb->save.rax, svm.gprs.rdi, svm.gprs.rsi);
	GUEST_ASSERT_EQ(vmcb->save.rax, NESTED_SMOKE_CALL_MAGIC);
	GUEST_ASSERT_EQ(svm.gprs.rdi, NESTED_SMOKE_ARG_MAGIC);
	vmcb->save.rax = NESTED_SMOKE_REPLY_MAGIC;
	svm_skip_insn(&svm, 3);

	/* 3: the write into the hole is a nested page fault at exactly that L2 GPA. */
	code = svm_run(&svm);
	SVM_ASSERT_EXIT(&svm, SVM_EXIT_NPF);
	GUEST_SYNC(NESTED_SMOKE_FAULT, code, vmcb->control.exit_info_1, vmcb->control.exit_info_2);
	GUEST_ASSERT_EQ(vmcb->control.exit_info_2, NESTED_SMOKE_HOLE_GPA + 8);
	GUEST_ASSERT_EQ(vmcb->control.exit_info_1 & (SVM_NPF_PRESENT | SVM_NPF_WRITE), SVM_NPF_WRITE);
	GUEST_ASSERT(vmcb->control.exit_info_1 & SVM_NPF_FINAL_GPA);
	GUEST_ASSERT(!npt_leaf(&npt, NESTED_SMOKE_HOLE_GPA, NULL));
	npt_map(&npt, NESTED_SMOKE_HOLE_GPA & ~0xffful, (uint64_t)(uintptr_t)target, PAGE_SIZE_4K, PAGE_SIZE_4K);

	/* 4: HLT; by now L2's retried write must have landed in `target`. */
	code = svm_run(&svm);
	SVM_ASSERT_EXIT(&svm, SVM_EXIT_HLT);
	GUEST_SYNC(NESTED_SMOKE_HLT, code, READ_ONCE(*(volatile uint64_t *)(target + 8)));
	GUEST_ASSERT_EQ(READ_ONCE(*(volatile uint64_t *)(target + 8)), NESTED_SMOKE_WRITE_MAGIC);
	svm_skip_insn(&svm, 1);

	/* 5: done. */
	code = svm_run(&svm);
	SVM_ASSERT_EXIT(&svm, SVM_EXIT_VMMCALL);
	GUEST_ASSERT_EQ(vmcb->save.rax, NESTED_SMOKE_DONE_MAGIC);
	GUEST_SYNC(NESTED_SMOKE_DONE, code, svm.nr_runs);
}
