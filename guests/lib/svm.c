// SPDX-License-Identifier: GPL-2.0-only
/* AMD SVM helpers for L1 guests: enable, VMCB for a 64-bit L2, NPT, VMRUN. */
#include "svm.h"

bool svm_supported(void)
{
	return cpuid(0x80000000u, 0).eax >= 0x80000001u &&
	       (cpuid(0x80000001u, 0).ecx & CPUID_EXT_ECX_SVM);
}

static uint32_t svm_features(void)
{
	if (!svm_supported() || cpuid(0x80000000u, 0).eax < CPUID_SVM_LEAF)
		return 0;
	return cpuid(CPUID_SVM_LEAF, 0).edx;
}

bool svm_npt_supported(void)
{
	return svm_features() & SVM_FEATURE_NPT;
}

void svm_enable(struct svm_ctx *svm, struct svm_pages *pages)
{
	GUEST_ASSERT_MSG(svm_supported(), "CPUID 0x80000001 ecx lacks SVM: the host KVM "
			 "does not expose it (kvm_amd nested=0, or not an AMD host)");
	GUEST_ASSERT_MSG(!(rdmsr(MSR_VM_CR) & VM_CR_SVMDIS), "VM_CR.SVMDIS is set");
	GUEST_ASSERT(((uintptr_t)pages & 4095) == 0);
	svm->pages = pages;
	svm->vmcb = &pages->vmcb;
	svm->nrips = svm_features() & SVM_FEATURE_NRIPS;
	memset(pages->hsave, 0, sizeof(pages->hsave));
	wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
	wrmsr(MSR_VM_HSAVE_PA, (uint64_t)(uintptr_t)pages->hsave);
}

static void set_seg(struct vmcb_seg *seg, uint16_t sel, uint64_t base, uint32_t limit, uint16_t attrib)
{
	seg->selector = sel;
	seg->attrib = attrib;
	seg->limit = limit;
	seg->base = base;
}

struct __attribute__((packed)) dtr {
	uint16_t limit;
	uint64_t base;
};

#define READ_SEL(seg) ({ uint16_t __s; __asm__ volatile("mov %%" #seg ", %0" : "=r"(__s)); __s; })

void svm_vmcb_init(struct svm_ctx *svm, void (*rip)(uint64_t), void *rsp, uint64_t arg)
{
	struct vmcb *vmcb = svm->vmcb;
	struct vmcb_control *c = &vmcb->control;
	struct vmcb_save *s = &vmcb->save;
	struct dtr gdt, idt;
	uint64_t dr6, dr7;

	memset(vmcb, 0, sizeof(*vmcb));
	memset(svm->pages->iopm, 0, sizeof(svm->pages->iopm));
	memset(svm->pages->msrpm, 0, sizeof(svm->pages->msrpm));
	memset(&svm->gprs, 0, sizeof(svm->gprs));
	svm->gprs.rdi = arg;
	svm->nr_runs = 0;

	/* FS, GS, TR, LDTR and the syscall MSRs: L1's, so L2 has a usable TR too. */
	__asm__ volatile("vmsave %%rax" :: "a"((uint64_t)(uintptr_t)vmcb) : "memory");

	__asm__ volatile("sgdt %0" : "=m"(gdt));
	__asm__ volatile("sidt %0" : "=m"(idt));
	set_seg(&s->cs, READ_SEL(cs), 0, 0xffffffffu, SVM_SEG_CODE64);
	set_seg(&s->ss, READ_SEL(ss), 0, 0xffffffffu, SVM_SEG_DATA);
	set_seg(&s->ds, READ_SEL(ds), 0, 0xffffffffu, SVM_SEG_DATA);
	set_seg(&s->es, READ_SEL(es), 0, 0xffffffffu, SVM_SEG_DATA);
	set_seg(&s->gdtr, 0, gdt.base, gdt.limit, 0);
	set_seg(&s->idtr, 0, idt.base, idt.limit, 0);

	s->cpl = 0;
	s->efer = rdmsr(MSR_EFER);      /* VMRUN requires EFER.SVME in the guest's EFER too */
	s->cr0 = read_cr0();
	s->cr3 = read_cr3();
	s->cr4 = read_cr4();
	__asm__ volatile("mov %%dr6, %0" : "=r"(dr6));
	__asm__ volatile("mov %%dr7, %0" : "=r"(dr7));
	s->dr6 = dr6;
	s->dr7 = dr7;
	s->rflags = 0x2;
	s->rip = (uint64_t)(uintptr_t)rip;
	s->rsp = (uint64_t)(uintptr_t)rsp;
	s->g_pat = rdmsr(MSR_IA32_CR_PAT);   /* used by the NPT walk; must be a valid PAT */

	c->asid = 1;                    /* ASID 0 is the host's; VMRUN refuses it */
	c->intercept = (1ul << SVM_INTERCEPT_VMRUN) | (1ul << SVM_INTERCEPT_VMMCALL) |
		       (1ul << SVM_INTERCEPT_HLT) | (1ul << SVM_INTERCEPT_SHUTDOWN);
	c->iopm_base_pa = (uint64_t)(uintptr_t)svm->pages->iopm;
	c->msrpm_base_pa = (uint64_t)(uintptr_t)svm->pages->msrpm;
}

void svm_enable_npt(struct svm_ctx *svm, struct npt *npt)
{
	GUEST_ASSERT_MSG(svm_npt_supported(), "CPUID 0x8000000a edx lacks NPT: the host KVM "
			 "does not expose nested paging (kvm_amd npt=0?)");
	svm->vmcb->control.nested_ctl |= SVM_NESTED_CTL_NP_ENABLE;
	svm->vmcb->control.nested_cr3 = (uint64_t)(uintptr_t)npt->tdp.pml4;
}

/*
 * uint64_t __svm_vmrun(uint64_t vmcb_pa, struct svm_gprs *gprs)
 *
 * VMRUN saves and restores only RAX, RSP, RIP, RFLAGS, segments and control
 * registers, so L1's callee-saved registers are kept on the stack and L2's
 * other GPRs are swapped in from / out to *gprs around VMRUN.
 */
__asm__(
	"	.text\n"
	"	.globl __svm_vmrun\n"
	"__svm_vmrun:\n"
	"	push %rbp\n"
	"	push %rbx\n"
	"	push %r12\n"
	"	push %r13\n"
	"	push %r14\n"
	"	push %r15\n"
	"	push %rsi\n"                /* gprs, needed again after #VMEXIT */
	"	mov %rdi, %rax\n"
	"	mov 0x00(%rsi), %rbx\n"
	"	mov 0x08(%rsi), %rcx\n"
	"	mov 0x10(%rsi), %rdx\n"
	"	mov 0x20(%rsi), %rdi\n"
	"	mov 0x28(%rsi), %rbp\n"
	"	mov 0x30(%rsi), %r8\n"
	"	mov 0x38(%rsi), %r9\n"
	"	mov 0x40(%rsi), %r10\n"
	"	mov 0x48(%rsi), %r11\n"
	"	mov 0x50(%rsi), %r12\n"
	"	mov 0x58(%rsi), %r13\n"
	"	mov 0x60(%rsi), %r14\n"
	"	mov 0x68(%rsi), %r15\n"
	"	mov 0x18(%rsi), %rsi\n"
	"	vmrun %rax\n"
	/* #VMEXIT: RAX (= VMCB PA), RSP and RIP are L1's again, the rest is L2's. */
	"	xchg %rsi, (%rsp)\n"        /* rsi = gprs, L2's rsi on the stack */
	"	mov %rbx, 0x00(%rsi)\n"
	"	mov %rcx, 0x08(%rsi)\n"
	"	mov %rdx, 0x10(%rsi)\n"
	"	mov %rdi, 0x20(%rsi)\n"
	"	mov %rbp, 0x28(%rsi)\n"
	"	mov %r8,  0x30(%rsi)\n"
	"	mov %r9,  0x38(%rsi)\n"
	"	mov %r10, 0x40(%rsi)\n"
	"	mov %r11, 0x48(%rsi)\n"
	"	mov %r12, 0x50(%rsi)\n"
	"	mov %r13, 0x58(%rsi)\n"
	"	mov %r14, 0x60(%rsi)\n"
	"	mov %r15, 0x68(%rsi)\n"
	"	pop %rax\n"
	"	mov %rax, 0x18(%rsi)\n"
	"	pop %r15\n"
	"	pop %r14\n"
	"	pop %r13\n"
	"	pop %r12\n"
	"	pop %rbx\n"
	"	pop %rbp\n"
	"	ret\n"
);

uint64_t __svm_vmrun(uint64_t vmcb_pa, struct svm_gprs *gprs);

_Static_assert(__builtin_offsetof(struct svm_gprs, rsi) == 0x18, "svm_gprs layout used by __svm_vmrun");
_Static_assert(__builtin_offsetof(struct svm_gprs, r15) == 0x68, "svm_gprs layout used by __svm_vmrun");

uint64_t svm_run(struct svm_ctx *svm)
{
	struct vmcb *vmcb = svm->vmcb;

	/* A VMRUN that fails its consistency checks writes exit code VMEXIT_INVALID itself. */
	__svm_vmrun((uint64_t)(uintptr_t)vmcb, &svm->gprs);
	/* #VMEXIT leaves GIF clear; set it so L1 runs like a normal guest again. */
	__asm__ volatile("stgi" ::: "memory");
	if (vmcb->control.tlb_ctl != SVM_TLB_CONTROL_DO_NOTHING)
		vmcb->control.tlb_ctl = SVM_TLB_CONTROL_DO_NOTHING;
	svm->nr_runs++;
	return vmcb->control.exit_code;
}

void svm_skip_insn(struct svm_ctx *svm, unsigned int insn_len)
{
	struct vmcb *vmcb = svm->vmcb;

	if (svm->nrips && vmcb->control.next_rip)
		GUEST_ASSERT_EQ(vmcb->control.next_rip - vmcb->save.rip, insn_len);
	vmcb->save.rip += insn_len;
}

const char *svm_exit_name(uint64_t code)
{
	static const char *const excp[32] = {
		"EXCP#DE", "EXCP#DB", "EXCP#NMI", "EXCP#BP", "EXCP#OF", "EXCP#BR", "EXCP#UD", "EXCP#NM",
		"EXCP#DF", "EXCP#9", "EXCP#TS", "EXCP#NP", "EXCP#SS", "EXCP#GP", "EXCP#PF", "EXCP#15",
		"EXCP#MF", "EXCP#AC", "EXCP#MC", "EXCP#XM", "EXCP#VE", "EXCP#CP", "EXCP#22", "EXCP#23",
		"EXCP#24", "EXCP#25", "EXCP#26", "EXCP#27", "EXCP#28", "EXCP#VC", "EXCP#SX", "EXCP#31",
	};

	if (code >= SVM_EXIT_EXCP_BASE && code < SVM_EXIT_EXCP_BASE + 32)
		return excp[code - SVM_EXIT_EXCP_BASE];
	switch (code) {
	case SVM_EXIT_INTR: return "INTR";
	case SVM_EXIT_NMI: return "NMI";
	case SVM_EXIT_CPUID: return "CPUID";
	case SVM_EXIT_HLT: return "HLT";
	case SVM_EXIT_INVLPG: return "INVLPG";
	case SVM_EXIT_IOIO: return "IOIO";
	case SVM_EXIT_MSR: return "MSR";
	case SVM_EXIT_SHUTDOWN: return "SHUTDOWN";
	case SVM_EXIT_VMRUN: return "VMRUN";
	case SVM_EXIT_VMMCALL: return "VMMCALL";
	case SVM_EXIT_NPF: return "NPF";
	case SVM_EXIT_INVALID: return "INVALID (VMRUN consistency checks failed)";
	default: return "?";
	}
}

/* ---- nested page tables ------------------------------------------------ */

void npt_init(struct npt *npt, void *pool, size_t pool_pages)
{
	tdp_init(&npt->tdp, "NPT", pool, pool_pages, NPT_P,
		 NPT_P | NPT_RW | NPT_US | NPT_A, NPT_P | NPT_RW | NPT_US | NPT_A | NPT_D, NPT_A, NPT_D);
}

static int size_level(uint64_t page_size)
{
	switch (page_size) {
	case PAGE_SIZE_4K: return 1;
	case PAGE_SIZE_2M: return 2;
	case PAGE_SIZE_1G: return 3;
	}
	GUEST_ASSERT_MSG(0, "bad NPT page size %#lx", page_size);
	return 0;
}

void npt_map(struct npt *npt, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, uint64_t page_size)
{
	tdp_map(&npt->tdp, l2_gpa, l1_gpa, size, size_level(page_size));
}

uint64_t *npt_leaf(struct npt *npt, uint64_t l2_gpa, int *level)
{
	return tdp_leaf(&npt->tdp, l2_gpa, level);
}
