/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * L1 runs an L2 under either vendor's virtualization: AMD SVM with nested
 * paging (NPT) or Intel VMX with EPT.  A program written on this header runs
 * unchanged on both, so a selftest is written once and parametrised by vendor.
 * The host picks the vendor by setting the global `nested_vendor` before the
 * run; nested_init() asserts that this (L1) CPU offers it.
 *
 *     static struct nested n;
 *     static uint8_t pool[16][4096] __attribute__((aligned(4096)));
 *     static uint8_t l2_stack[16384] __attribute__((aligned(16)));
 *
 *     nested_init(&n, &(struct nested_config){
 *             .l2_main = l2_main, .l2_stack_top = l2_stack + sizeof(l2_stack),
 *             .tdp_pool = pool, .tdp_pool_pages = 16 });
 *     nested_map(&n, 0, 0, l1_mem_size, PAGE_SIZE_2M);   // L2 GPA == L1 GPA
 *     while (nested_run(&n) == NESTED_EXIT_CALL && nested_forward_l2_call(&n) != NESTED_CALL_DONE)
 *             ;
 *
 * L2 shares L1's page tables, GDT and IDT (svm.h, vmx.h); with L1's memory
 * identity mapped by NPT/EPT it reads L1's globals and can GUEST_SYNC to the
 * host directly.  nested_l2_sync() instead goes through L1, which forwards it.
 */
#ifndef KVMPY_NESTED_H
#define KVMPY_NESTED_H

#include "guest.h"
#include "svm.h"
#include "vmx.h"

enum nested_vendor {
	NESTED_SVM = NESTED_VENDOR_SVM,		/* AMD SVM + NPT */
	NESTED_VMX = NESTED_VENDOR_VMX,		/* Intel VMX + EPT */
};

/* Set by the host before the run; read by L2's calls too (same memory). */
extern volatile uint64_t nested_vendor;

/* The pages KVM reads and writes as L1's VMCB / VMXON region and VMCS. */
union nested_pages {
	struct svm_pages svm;
	struct vmx_pages vmx;
};

struct nested_config {
	void (*l2_main)(uint64_t);
	void *l2_stack_top;
	uint64_t l2_arg;		/* L2's rdi */
	void *tdp_pool;			/* pages for the NPT/EPT tables (4K aligned) */
	size_t tdp_pool_pages;
	union nested_pages *pages;	/* NULL: nested.c's own */
};

struct nested {
	enum nested_vendor vendor;
	struct svm_ctx svm;
	struct vmx_ctx vmx;
	struct npt npt;
	struct ept ept;
	struct tdp *tdp;		/* &npt.tdp or &ept.tdp */
	union nested_pages *pages;
	uint64_t exit_code;		/* the last exit: SVM exit code or VMX basic exit reason */
};

/* What an L2 exit was, in either vendor's terms. */
enum nested_exit {
	NESTED_EXIT_CALL = 1,		/* VMMCALL / VMCALL */
	NESTED_EXIT_HLT,
	NESTED_EXIT_TDP_FAULT,		/* nested page fault / EPT violation */
	NESTED_EXIT_OTHER,
};

/*
 * Enter SVM or VMX operation as nested_vendor says, prepare a 64-bit L2 at
 * cfg->l2_main and empty NPT/EPT tables (with EPT accessed/dirty flags where
 * offered, as NPT always has them) that L2 runs on once mapped.
 */
void nested_init(struct nested *n, const struct nested_config *cfg);

/* Map [l2_gpa, +size) to L1 GPAs [l1_gpa, ...) with page_size pages (4K, 2M, 1G), RWX. */
void nested_map(struct nested *n, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, uint64_t page_size);

/* The NPT/EPT leaf mapping l2_gpa and its level (1 = 4K), or NULL. */
uint64_t *nested_leaf(struct nested *n, uint64_t l2_gpa, int *level);

/* VMRUN / VMLAUNCH / VMRESUME until L2's next exit (asserting the entry worked). */
enum nested_exit nested_run(struct nested *n);

/* Assert the last exit was `want`, naming it in the vendor's terms otherwise. */
void nested_assert_exit(struct nested *n, enum nested_exit want);

/*
 * Tell the CPU that L1 changed NPT/EPT entries: SVM flushes L2's ASID at the
 * next VMRUN (TLB_CONTROL), VMX executes INVEPT (single-context) now.
 */
void nested_flush_tdp(struct nested *n);

/* ---- L2 -> L1 calls ------------------------------------------------------ */

enum nested_call {
	NESTED_CALL_SYNC = 1,	/* L1 does GUEST_SYNC(a0, a1, a2, a3) for L2 */
	NESTED_CALL_DONE = 2,	/* L2 has finished */
};

/* From L2: VMMCALL or VMCALL with rax = nr, rdi/rsi/rdx/rcx = a0..a3; L1's answer in rax. */
static inline uint64_t nested_l2_call(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3)
{
	if (nested_vendor == NESTED_SVM)
		return svm_vmmcall(nr, a0, a1, a2, a3);
	return vmx_vmcall(nr, a0, a1, a2, a3);
}

#define nested_l2_sync(stage, a1, a2, a3) nested_l2_call(NESTED_CALL_SYNC, stage, a1, a2, a3)
#define nested_l2_done() nested_l2_call(NESTED_CALL_DONE, 0, 0, 0, 0)

/*
 * In L1, after a CALL exit: do what L2 asked (GUEST_SYNC for a sync), step L2
 * over the VMMCALL/VMCALL and return the call number.
 */
uint64_t nested_forward_l2_call(struct nested *n);

#endif
