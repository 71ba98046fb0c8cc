// SPDX-License-Identifier: GPL-2.0-only
/* L1 runs an L2 under SVM+NPT or VMX+EPT behind one interface: see nested.h. */
#include "nested.h"

volatile uint64_t nested_vendor;

static union nested_pages own_pages;

void nested_init(struct nested *n, const struct nested_config *cfg)
{
	union nested_pages *pages = cfg->pages ? cfg->pages : &own_pages;

	memset(n, 0, sizeof(*n));
	n->vendor = nested_vendor;
	n->pages = pages;
	switch (n->vendor) {
	case NESTED_SVM:
		svm_enable(&n->svm, &pages->svm);
		svm_vmcb_init(&n->svm, cfg->l2_main, cfg->l2_stack_top, cfg->l2_arg);
		npt_init(&n->npt, cfg->tdp_pool, cfg->tdp_pool_pages);
		svm_enable_npt(&n->svm, &n->npt);
		n->tdp = &n->npt.tdp;
		break;
	case NESTED_VMX:
		vmx_enable(&n->vmx, &pages->vmx);
		vmx_vmcs_init(&n->vmx, cfg->l2_main, cfg->l2_stack_top, cfg->l2_arg);
		ept_init(&n->ept, cfg->tdp_pool, cfg->tdp_pool_pages,
			 rdmsr(MSR_IA32_VMX_EPT_VPID_CAP) & VMX_EPT_CAP_AD);
		vmx_enable_ept(&n->vmx, &n->ept);
		n->tdp = &n->ept.tdp;
		break;
	default:
		GUEST_ASSERT_MSG(0, "nested_vendor = %lu: the host sets it to %d (SVM) or %d (VMX)",
				 (uint64_t)nested_vendor, NESTED_SVM, NESTED_VMX);
	}
}

void nested_map(struct nested *n, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, uint64_t page_size)
{
	if (n->vendor == NESTED_SVM)
		npt_map(&n->npt, l2_gpa, l1_gpa, size, page_size);
	else
		ept_map(&n->ept, l2_gpa, l1_gpa, size, page_size);
}

uint64_t *nested_leaf(struct nested *n, uint64_t l2_gpa, int *level)
{
	return tdp_leaf(n->tdp, l2_gpa, level);
}

static enum nested_exit svm_kind(uint64_t code)
{
	switch (code) {
	case SVM_EXIT_VMMCALL: return NESTED_EXIT_CALL;
	case SVM_EXIT_HLT: return NESTED_EXIT_HLT;
	case SVM_EXIT_NPF: return NESTED_EXIT_TDP_FAULT;
	default: return NESTED_EXIT_OTHER;
	}
}

static enum nested_exit vmx_kind(uint64_t reason)
{
	switch (reason) {
	case VMX_EXIT_VMCALL: return NESTED_EXIT_CALL;
	case VMX_EXIT_HLT: return NESTED_EXIT_HLT;
	case VMX_EXIT_EPT_VIOLATION: return NESTED_EXIT_TDP_FAULT;
	default: return NESTED_EXIT_OTHER;
	}
}

enum nested_exit nested_run(struct nested *n)
{
	if (n->vendor == NESTED_SVM) {
		n->exit_code = svm_run(&n->svm);
		GUEST_ASSERT_MSG(n->exit_code != SVM_EXIT_INVALID, "VMRUN failed its consistency checks");
		return svm_kind(n->exit_code);
	}
	uint32_t reason = vmx_run(&n->vmx);

	GUEST_ASSERT_MSG(!(reason & VMX_EXIT_REASON_ENTRY_FAIL), "VM entry failed: exit reason %#x", reason);
	n->exit_code = VMX_EXIT_REASON_BASIC(reason);
	return vmx_kind(n->exit_code);
}

static const char *const kind_names[] = {
	[NESTED_EXIT_CALL] = "VMMCALL/VMCALL", [NESTED_EXIT_HLT] = "HLT",
	[NESTED_EXIT_TDP_FAULT] = "NPF/EPT violation", [NESTED_EXIT_OTHER] = "another exit",
};

void nested_assert_exit(struct nested *n, enum nested_exit want)
{
	if (n->vendor == NESTED_SVM) {
		GUEST_ASSERT_MSG(svm_kind(n->exit_code) == want, "L2 exit %s (%#lx), wanted %s: exit_info_1 %#lx "
				 "exit_info_2 %#lx L2 rip %#lx", svm_exit_name(n->exit_code), n->exit_code,
				 kind_names[want], n->svm.vmcb->control.exit_info_1,
				 n->svm.vmcb->control.exit_info_2, n->svm.vmcb->save.rip);
		return;
	}
	GUEST_ASSERT_MSG(vmx_kind(n->exit_code) == want, "L2 exit %s (reason %lu), wanted %s: qualification "
			 "%#lx GPA %#lx L2 rip %#lx", vmx_exit_name(n->exit_code), n->exit_code, kind_names[want],
			 vmx_exit_qual(), vmreadz(GUEST_PHYSICAL_ADDRESS), vmreadz(GUEST_RIP));
}

void nested_flush_tdp(struct nested *n)
{
	if (n->vendor == NESTED_SVM)
		svm_flush_asid(&n->svm);
	else
		vmx_invept(&n->vmx);
}

uint64_t nested_forward_l2_call(struct nested *n)
{
	struct svm_gprs *sg = &n->svm.gprs;
	struct vmx_gprs *vg = &n->vmx.gprs;
	bool svm = n->vendor == NESTED_SVM;
	uint64_t nr = svm ? n->svm.vmcb->save.rax : vg->rax;

	nested_assert_exit(n, NESTED_EXIT_CALL);
	switch (nr) {
	case NESTED_CALL_SYNC:
		if (svm)
			GUEST_SYNC(sg->rdi, sg->rsi, sg->rdx, sg->rcx);
		else
			GUEST_SYNC(vg->rdi, vg->rsi, vg->rdx, vg->rcx);
		break;
	case NESTED_CALL_DONE:
		break;
	default:
		GUEST_ASSERT_MSG(0, "unknown L2 call %lu", nr);
	}
	if (svm) {
		n->svm.vmcb->save.rax = 0;
		svm_skip_insn(&n->svm, 3);	/* vmmcall is 0f 01 d9 */
	} else {
		vg->rax = 0;
		vmx_skip_insn(&n->vmx);
	}
	return nr;
}
