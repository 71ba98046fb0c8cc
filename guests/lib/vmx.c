// SPDX-License-Identifier: GPL-2.0-only
/* Intel VMX helpers for L1 guests: VMXON, a VMCS for a 64-bit L2, EPT, VMLAUNCH/VMRESUME. */
#include "vmx.h"

/* ---- VMX instructions with their results checked ----------------------- */

#define RFLAGS_CF (1ul << 0)
#define RFLAGS_ZF (1ul << 6)

static const char *vm_insn_error_name(uint64_t err)
{
	/* SDM vol. 3C 31.4, "VM instruction error numbers". */
	switch (err) {
	case 1: return "VMCALL executed in VMX root operation";
	case 2: return "VMCLEAR with invalid physical address";
	case 3: return "VMCLEAR with VMXON pointer";
	case 4: return "VMLAUNCH with non-clear VMCS";
	case 5: return "VMRESUME with non-launched VMCS";
	case 7: return "VM entry with invalid control field(s)";
	case 8: return "VM entry with invalid host-state field(s)";
	case 9: return "VMPTRLD with invalid physical address";
	case 10: return "VMPTRLD with VMXON pointer";
	case 11: return "VMPTRLD with incorrect VMCS revision identifier";
	case 12: return "VMREAD/VMWRITE from/to unsupported VMCS component";
	case 13: return "VMWRITE to read-only VMCS component";
	case 15: return "VMXON executed in VMX root operation";
	case 26: return "VM entry with events blocked by MOV SS";
	case 28: return "invalid operand to INVEPT/INVVPID";
	default: return "?";
	}
}

/*
 * Turn the RFLAGS a VMX instruction left into a verdict: VMfailInvalid (CF,
 * no current VMCS to hold an error number) or VMfailValid (ZF, the error is in
 * the current VMCS's VM-instruction error field).
 */
static void check_vmx_insn(const char *insn, uint64_t operand, uint64_t rflags)
{
	uint64_t err = 0;

	GUEST_ASSERT_MSG(!(rflags & RFLAGS_CF), "%s %#lx: VMfailInvalid (CF=1, no current VMCS)",
			 insn, operand);
	if (rflags & RFLAGS_ZF) {
		__asm__ volatile("vmread %1, %0" : "=r"(err) : "r"((uint64_t)VM_INSTRUCTION_ERROR) : "cc");
		GUEST_ASSERT_MSG(0, "%s %#lx: VMfailValid, VM-instruction error %lu (%s)",
				 insn, operand, err, vm_insn_error_name(err));
	}
}

static void vmxon(uint64_t pa)
{
	uint64_t rflags;

	__asm__ volatile("vmxon %1; pushfq; popq %0" : "=r"(rflags) : "m"(pa) : "cc", "memory");
	check_vmx_insn("VMXON", pa, rflags);
}

static void vmclear(uint64_t pa)
{
	uint64_t rflags;

	__asm__ volatile("vmclear %1; pushfq; popq %0" : "=r"(rflags) : "m"(pa) : "cc", "memory");
	check_vmx_insn("VMCLEAR", pa, rflags);
}

static void vmptrld(uint64_t pa)
{
	uint64_t rflags;

	__asm__ volatile("vmptrld %1; pushfq; popq %0" : "=r"(rflags) : "m"(pa) : "cc", "memory");
	check_vmx_insn("VMPTRLD", pa, rflags);
}

uint64_t vmreadz(enum vmcs_field field)
{
	uint64_t value = 0, rflags;

	__asm__ volatile("vmread %2, %0; pushfq; popq %1"
			 : "=r"(value), "=r"(rflags) : "r"((uint64_t)field) : "cc", "memory");
	check_vmx_insn("VMREAD", field, rflags);
	return value;
}

void vmwritez(enum vmcs_field field, uint64_t value)
{
	uint64_t rflags;

	__asm__ volatile("vmwrite %1, %2; pushfq; popq %0"
			 : "=r"(rflags) : "r"(value), "r"((uint64_t)field) : "cc", "memory");
	check_vmx_insn("VMWRITE", field, rflags);
}

/* ---- capabilities ------------------------------------------------------ */

bool vmx_supported(void)
{
	return cpuid(1, 0).ecx & CPUID_1_ECX_VMX;
}

/* The allowed-1 half (bits 63:32) of a control MSR; 0 for a control the CPU lacks. */
static uint32_t secondary_allowed1(void)
{
	uint64_t basic = rdmsr(MSR_IA32_VMX_BASIC);
	uint32_t msr = (basic & VMX_BASIC_TRUE_CTLS) ? MSR_IA32_VMX_TRUE_PROCBASED_CTLS
						      : MSR_IA32_VMX_PROCBASED_CTLS;

	if (!((rdmsr(msr) >> 32) & CPU_BASED_ACTIVATE_SECONDARY))
		return 0;
	return rdmsr(MSR_IA32_VMX_PROCBASED_CTLS2) >> 32;
}

bool vmx_ept_supported(void)
{
	if (!vmx_supported() || !(secondary_allowed1() & SECONDARY_EXEC_ENABLE_EPT))
		return false;
	uint64_t cap = rdmsr(MSR_IA32_VMX_EPT_VPID_CAP);

	return (cap & VMX_EPT_CAP_WALK4) && (cap & VMX_EPT_CAP_WB);
}

/*
 * A control value with `want` set, adjusted to the capability MSR: bits 31:0
 * are the allowed-0 settings (must be 1), bits 63:32 the allowed-1 settings
 * (may be 1).  `optional` bits are added where allowed.  Asserts every wanted
 * bit is allowed.
 */
static uint32_t adjust_controls(const char *what, uint32_t msr, uint32_t want, uint32_t optional)
{
	uint64_t cap = rdmsr(msr);
	uint32_t must = (uint32_t)cap, may = (uint32_t)(cap >> 32);

	GUEST_ASSERT_MSG((want & may) == want, "%s controls %#x not allowed by MSR %#x = %#lx (missing %#x)",
			 what, want, msr, cap, want & ~may);
	return (want | (optional & may) | must) & may;
}

/* ---- VMXON ------------------------------------------------------------- */

void vmx_enable(struct vmx_ctx *vmx, struct vmx_pages *pages)
{
	uint64_t fc, cr0, cr4;

	GUEST_ASSERT_MSG(vmx_supported(), "CPUID.1:ECX lacks VMX: the host KVM does not expose it "
			 "(kvm_intel nested=0, or not an Intel host)");
	GUEST_ASSERT(((uintptr_t)pages & 4095) == 0);
	vmx->pages = pages;
	vmx->basic = rdmsr(MSR_IA32_VMX_BASIC);

	/*
	 * VMXON #GPs unless IA32_FEATURE_CONTROL is locked with VMXON outside SMX
	 * enabled.  KVM leaves the MSR as userspace set it (kvmpy: 0, unlocked), so
	 * L1 plays firmware here; if someone locked it already, it must allow VMXON.
	 */
	fc = rdmsr(MSR_IA32_FEATURE_CONTROL);
	if (!(fc & FEATURE_CONTROL_LOCKED)) {
		fc |= FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMXON_OUTSIDE_SMX;
		wrmsr(MSR_IA32_FEATURE_CONTROL, fc);
		fc = rdmsr(MSR_IA32_FEATURE_CONTROL);
	}
	GUEST_ASSERT_MSG((fc & (FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMXON_OUTSIDE_SMX)) ==
			 (FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMXON_OUTSIDE_SMX),
			 "IA32_FEATURE_CONTROL = %#lx: locked without VMXON-outside-SMX, VMXON would #GP", fc);

	/* In VMX operation CR0/CR4 bits set in FIXED0 must be 1 and bits clear in FIXED1 must be 0. */
	cr0 = (read_cr0() | rdmsr(MSR_IA32_VMX_CR0_FIXED0)) & rdmsr(MSR_IA32_VMX_CR0_FIXED1);
	write_cr0(cr0);
	cr4 = (read_cr4() | X86_CR4_VMXE | rdmsr(MSR_IA32_VMX_CR4_FIXED0)) & rdmsr(MSR_IA32_VMX_CR4_FIXED1);
	GUEST_ASSERT_MSG(cr4 & X86_CR4_VMXE, "IA32_VMX_CR4_FIXED1 = %#lx forbids CR4.VMXE",
			 rdmsr(MSR_IA32_VMX_CR4_FIXED1));
	write_cr4(cr4);

	memset(pages->vmxon_region, 0, sizeof(pages->vmxon_region));
	*(uint32_t *)pages->vmxon_region = vmx->basic & VMX_BASIC_REVISION_MASK;
	vmxon((uint64_t)(uintptr_t)pages->vmxon_region);
}

/* ---- VMCS -------------------------------------------------------------- */

struct __attribute__((packed)) dtr {
	uint16_t limit;
	uint64_t base;
};

#define READ_SEL(seg) ({ uint16_t __s; __asm__ volatile("mov %%" #seg ", %0" : "=r"(__s)); __s; })

/* A 64-bit system descriptor's base and limit, read from the GDT. */
static void gdt_system_desc(uint64_t gdt_base, uint16_t sel, uint64_t *base, uint32_t *limit)
{
	const uint8_t *d = (const uint8_t *)(uintptr_t)(gdt_base + (sel & ~7u));
	uint32_t lim = d[0] | d[1] << 8 | (d[6] & 0xfu) << 16;

	*base = (uint64_t)d[2] | (uint64_t)d[3] << 8 | (uint64_t)d[4] << 16 | (uint64_t)d[7] << 24 |
		(uint64_t)*(const uint32_t *)(d + 8) << 32;
	*limit = (d[6] & 0x80) ? (lim << 12 | 0xfffu) : lim;   /* G: 4K granularity */
}

/* Where L2's VM exits land in L1 (vmx.c's assembly below). */
extern char vmx_exit_guest[];

static void guest_data_seg(enum vmcs_field sel_field, uint16_t sel)
{
	/* Encodings are laid out in parallel: selector 0x08xx, limit 0x48xx, AR 0x4814+, base 0x68xx. */
	unsigned int idx = (sel_field - GUEST_ES_SELECTOR) / 2;

	vmwritez(sel_field, sel);
	vmwritez(GUEST_ES_LIMIT + 2 * idx, 0xffffffffu);
	vmwritez(GUEST_ES_BASE + 2 * idx, 0);
	/* A null data selector is unusable; in 64-bit mode that is fine for ES/DS/FS/GS. */
	vmwritez(GUEST_ES_AR_BYTES + 2 * idx, sel ? (VMX_AR_TYPE_DATA_RWA | VMX_AR_S | VMX_AR_P |
						     VMX_AR_DB | VMX_AR_G) : VMX_AR_UNUSABLE);
}

void vmx_vmcs_init(struct vmx_ctx *vmx, void (*rip)(uint64_t), void *rsp, uint64_t arg)
{
	uint64_t vmcs_pa = (uint64_t)(uintptr_t)vmx->pages->vmcs;
	bool true_ctls = vmx->basic & VMX_BASIC_TRUE_CTLS;
	uint32_t pin, proc, exit, entry;
	struct dtr gdt, idt;
	uint64_t tr_base;
	uint32_t tr_limit;
	uint16_t tr;

	GUEST_ASSERT_MSG(vmx->basic, "vmx_vmcs_init before vmx_enable");
	memset(vmx->pages->vmcs, 0, sizeof(vmx->pages->vmcs));
	*(uint32_t *)vmx->pages->vmcs = vmx->basic & VMX_BASIC_REVISION_MASK;
	vmclear(vmcs_pa);
	vmptrld(vmcs_pa);
	memset(&vmx->gprs, 0, sizeof(vmx->gprs));
	vmx->gprs.rdi = arg;
	vmx->eptp = 0;
	vmx->nr_runs = 0;
	vmx->launched = false;
	vmx->secondary_allowed1 = secondary_allowed1();
	vmx->ept_vpid_cap = (vmx->secondary_allowed1 & SECONDARY_EXEC_ENABLE_EPT) ?
			    rdmsr(MSR_IA32_VMX_EPT_VPID_CAP) : 0;

	/*
	 * Controls.  With the TRUE MSRs, default-1 controls such as CR3-load/store
	 * exiting may be cleared.  No I/O or MSR bitmaps and no unconditional I/O
	 * exiting: L2's ucalls go straight to the host, its RDMSR/WRMSR would exit.
	 */
	pin = adjust_controls("pin-based", true_ctls ? MSR_IA32_VMX_TRUE_PINBASED_CTLS :
			      MSR_IA32_VMX_PINBASED_CTLS, 0, 0);
	proc = adjust_controls("primary processor-based", true_ctls ? MSR_IA32_VMX_TRUE_PROCBASED_CTLS :
			       MSR_IA32_VMX_PROCBASED_CTLS, CPU_BASED_HLT_EXITING, CPU_BASED_ACTIVATE_SECONDARY);
	/* L1 is a 64-bit host; loading EFER/PAT keeps NXE and PAT exact on both sides. */
	exit = adjust_controls("VM-exit", true_ctls ? MSR_IA32_VMX_TRUE_EXIT_CTLS : MSR_IA32_VMX_EXIT_CTLS,
			       VM_EXIT_HOST_ADDR_SPACE_SIZE,
			       VM_EXIT_LOAD_IA32_EFER | VM_EXIT_SAVE_IA32_EFER |
			       VM_EXIT_LOAD_IA32_PAT | VM_EXIT_SAVE_IA32_PAT);
	entry = adjust_controls("VM-entry", true_ctls ? MSR_IA32_VMX_TRUE_ENTRY_CTLS : MSR_IA32_VMX_ENTRY_CTLS,
				VM_ENTRY_IA32E_MODE, VM_ENTRY_LOAD_IA32_EFER | VM_ENTRY_LOAD_IA32_PAT);
	vmwritez(PIN_BASED_VM_EXEC_CONTROL, pin);
	vmwritez(CPU_BASED_VM_EXEC_CONTROL, proc);
	if (proc & CPU_BASED_ACTIVATE_SECONDARY)
		vmwritez(SECONDARY_VM_EXEC_CONTROL,
			 adjust_controls("secondary processor-based", MSR_IA32_VMX_PROCBASED_CTLS2, 0, 0));
	vmwritez(VM_EXIT_CONTROLS, exit);
	vmwritez(VM_ENTRY_CONTROLS, entry);
	vmwritez(EXCEPTION_BITMAP, 0);
	vmwritez(PAGE_FAULT_ERROR_CODE_MASK, 0);
	vmwritez(PAGE_FAULT_ERROR_CODE_MATCH, 0);
	vmwritez(CR3_TARGET_COUNT, 0);
	vmwritez(VM_EXIT_MSR_STORE_COUNT, 0);
	vmwritez(VM_EXIT_MSR_LOAD_COUNT, 0);
	vmwritez(VM_ENTRY_MSR_LOAD_COUNT, 0);
	vmwritez(VM_ENTRY_INTR_INFO_FIELD, 0);
	/* L2 owns CR0/CR4 outright: no guest/host mask bits, no CR exits. */
	vmwritez(CR0_GUEST_HOST_MASK, 0);
	vmwritez(CR4_GUEST_HOST_MASK, 0);
	vmwritez(CR0_READ_SHADOW, read_cr0());
	vmwritez(CR4_READ_SHADOW, read_cr4());

	__asm__ volatile("sgdt %0" : "=m"(gdt));
	__asm__ volatile("sidt %0" : "=m"(idt));
	__asm__ volatile("str %0" : "=r"(tr));
	GUEST_ASSERT_MSG(tr, "L1 has no TR loaded; VM exit needs a host TR selector");
	gdt_system_desc(gdt.base, tr, &tr_base, &tr_limit);

	/* ---- host state: L1 as it is now; RSP is written by __vmx_enter ---- */
	vmwritez(HOST_CR0, read_cr0());
	vmwritez(HOST_CR3, read_cr3());
	vmwritez(HOST_CR4, read_cr4());
	/* Host selectors need RPL = TI = 0. */
	vmwritez(HOST_CS_SELECTOR, READ_SEL(cs) & ~7u);
	vmwritez(HOST_SS_SELECTOR, READ_SEL(ss) & ~7u);
	vmwritez(HOST_DS_SELECTOR, READ_SEL(ds) & ~7u);
	vmwritez(HOST_ES_SELECTOR, READ_SEL(es) & ~7u);
	vmwritez(HOST_FS_SELECTOR, READ_SEL(fs) & ~7u);
	vmwritez(HOST_GS_SELECTOR, READ_SEL(gs) & ~7u);
	vmwritez(HOST_TR_SELECTOR, tr & ~7u);
	vmwritez(HOST_FS_BASE, rdmsr(MSR_FS_BASE));
	vmwritez(HOST_GS_BASE, rdmsr(MSR_GS_BASE));
	vmwritez(HOST_TR_BASE, tr_base);
	vmwritez(HOST_GDTR_BASE, gdt.base);
	vmwritez(HOST_IDTR_BASE, idt.base);
	vmwritez(HOST_IA32_SYSENTER_CS, rdmsr(MSR_IA32_SYSENTER_CS));
	vmwritez(HOST_IA32_SYSENTER_ESP, rdmsr(MSR_IA32_SYSENTER_ESP));
	vmwritez(HOST_IA32_SYSENTER_EIP, rdmsr(MSR_IA32_SYSENTER_EIP));
	if (exit & VM_EXIT_LOAD_IA32_EFER)
		vmwritez(HOST_IA32_EFER, rdmsr(MSR_EFER));
	if (exit & VM_EXIT_LOAD_IA32_PAT)
		vmwritez(HOST_IA32_PAT, rdmsr(MSR_IA32_CR_PAT));
	vmwritez(HOST_RIP, (uint64_t)(uintptr_t)vmx_exit_guest);

	/* ---- guest state: a 64-bit L2 on L1's page tables and descriptor tables ---- */
	vmwritez(GUEST_CR0, read_cr0());
	vmwritez(GUEST_CR3, read_cr3());
	vmwritez(GUEST_CR4, read_cr4());
	vmwritez(GUEST_CS_SELECTOR, READ_SEL(cs));
	vmwritez(GUEST_CS_LIMIT, 0xffffffffu);
	vmwritez(GUEST_CS_BASE, 0);
	vmwritez(GUEST_CS_AR_BYTES, VMX_AR_TYPE_CODE_XRA | VMX_AR_S | VMX_AR_P | VMX_AR_L | VMX_AR_G);
	guest_data_seg(GUEST_SS_SELECTOR, READ_SEL(ss));
	guest_data_seg(GUEST_DS_SELECTOR, READ_SEL(ds));
	guest_data_seg(GUEST_ES_SELECTOR, READ_SEL(es));
	guest_data_seg(GUEST_FS_SELECTOR, READ_SEL(fs));
	guest_data_seg(GUEST_GS_SELECTOR, READ_SEL(gs));
	vmwritez(GUEST_FS_BASE, rdmsr(MSR_FS_BASE));
	vmwritez(GUEST_GS_BASE, rdmsr(MSR_GS_BASE));
	vmwritez(GUEST_LDTR_SELECTOR, 0);
	vmwritez(GUEST_LDTR_LIMIT, 0);
	vmwritez(GUEST_LDTR_BASE, 0);
	vmwritez(GUEST_LDTR_AR_BYTES, VMX_AR_UNUSABLE);
	/* VM entry to 64-bit mode needs a usable TR holding a busy 64-bit TSS. */
	vmwritez(GUEST_TR_SELECTOR, tr);
	vmwritez(GUEST_TR_LIMIT, tr_limit);
	vmwritez(GUEST_TR_BASE, tr_base);
	vmwritez(GUEST_TR_AR_BYTES, VMX_AR_TYPE_TSS64_BUSY | VMX_AR_P);
	vmwritez(GUEST_GDTR_BASE, gdt.base);
	vmwritez(GUEST_GDTR_LIMIT, gdt.limit);
	vmwritez(GUEST_IDTR_BASE, idt.base);
	vmwritez(GUEST_IDTR_LIMIT, idt.limit);
	vmwritez(GUEST_IA32_DEBUGCTL, 0);
	vmwritez(GUEST_DR7, 0x400);
	vmwritez(GUEST_SYSENTER_CS, rdmsr(MSR_IA32_SYSENTER_CS));
	vmwritez(GUEST_SYSENTER_ESP, rdmsr(MSR_IA32_SYSENTER_ESP));
	vmwritez(GUEST_SYSENTER_EIP, rdmsr(MSR_IA32_SYSENTER_EIP));
	if (entry & VM_ENTRY_LOAD_IA32_EFER)
		vmwritez(GUEST_IA32_EFER, rdmsr(MSR_EFER));
	if (entry & VM_ENTRY_LOAD_IA32_PAT)
		vmwritez(GUEST_IA32_PAT, rdmsr(MSR_IA32_CR_PAT));
	vmwritez(VMCS_LINK_POINTER, ~0ul);     /* no shadow VMCS */
	vmwritez(GUEST_ACTIVITY_STATE, 0);     /* active */
	vmwritez(GUEST_INTERRUPTIBILITY_INFO, 0);
	vmwritez(GUEST_PENDING_DBG_EXCEPTIONS, 0);
	vmwritez(GUEST_RFLAGS, 0x2);           /* IF=0: L1 takes no interrupts either */
	vmwritez(GUEST_RIP, (uint64_t)(uintptr_t)rip);
	vmwritez(GUEST_RSP, (uint64_t)(uintptr_t)rsp);
}

/*
 * uint64_t __vmx_enter(struct vmx_gprs *gprs, uint64_t launched)
 *
 * VM entry/exit switch only RSP, RIP, RFLAGS, segments and control registers,
 * so L1's callee-saved registers are kept on the stack, L2's GPRs are swapped
 * in from / out to *gprs, and HOST_RSP is set to this frame right before the
 * entry.  Returns 0 after a VM exit (landing at vmx_exit_guest), or the RFLAGS
 * VMLAUNCH/VMRESUME left when it failed (CF or ZF set; bit 1 makes it nonzero).
 */
__asm__(
	"	.text\n"
	"	.globl __vmx_enter\n"
	"__vmx_enter:\n"
	"	push %rbp\n"
	"	push %rbx\n"
	"	push %r12\n"
	"	push %r13\n"
	"	push %r14\n"
	"	push %r15\n"
	"	push %rdi\n"                /* gprs, needed again after the VM exit */
	"	mov $0x6c14, %eax\n"        /* HOST_RSP */
	"	vmwrite %rsp, %rax\n"
	"	test %rsi, %rsi\n"          /* launched?  MOVs below keep the flags */
	"	mov 0x00(%rdi), %rax\n"
	"	mov 0x08(%rdi), %rbx\n"
	"	mov 0x10(%rdi), %rcx\n"
	"	mov 0x18(%rdi), %rdx\n"
	"	mov 0x20(%rdi), %rsi\n"
	"	mov 0x30(%rdi), %rbp\n"
	"	mov 0x38(%rdi), %r8\n"
	"	mov 0x40(%rdi), %r9\n"
	"	mov 0x48(%rdi), %r10\n"
	"	mov 0x50(%rdi), %r11\n"
	"	mov 0x58(%rdi), %r12\n"
	"	mov 0x60(%rdi), %r13\n"
	"	mov 0x68(%rdi), %r14\n"
	"	mov 0x70(%rdi), %r15\n"
	"	mov 0x28(%rdi), %rdi\n"
	"	jnz 1f\n"
	"	vmlaunch\n"
	"	jmp 2f\n"
	"1:	vmresume\n"
	/* Only a failed VMLAUNCH/VMRESUME gets here. */
	"2:	pushfq\n"
	"	pop %rax\n"
	"	add $8, %rsp\n"
	"	pop %r15\n"
	"	pop %r14\n"
	"	pop %r13\n"
	"	pop %r12\n"
	"	pop %rbx\n"
	"	pop %rbp\n"
	"	ret\n"
	"	.globl vmx_exit_guest\n"
	"vmx_exit_guest:\n"
	/* VM exit: RSP = HOST_RSP (gprs on top), RIP here, the GPRs are L2's. */
	"	push %rdi\n"
	"	mov 8(%rsp), %rdi\n"
	"	mov %rax, 0x00(%rdi)\n"
	"	mov %rbx, 0x08(%rdi)\n"
	"	mov %rcx, 0x10(%rdi)\n"
	"	mov %rdx, 0x18(%rdi)\n"
	"	mov %rsi, 0x20(%rdi)\n"
	"	mov %rbp, 0x30(%rdi)\n"
	"	mov %r8,  0x38(%rdi)\n"
	"	mov %r9,  0x40(%rdi)\n"
	"	mov %r10, 0x48(%rdi)\n"
	"	mov %r11, 0x50(%rdi)\n"
	"	mov %r12, 0x58(%rdi)\n"
	"	mov %r13, 0x60(%rdi)\n"
	"	mov %r14, 0x68(%rdi)\n"
	"	mov %r15, 0x70(%rdi)\n"
	"	pop %rax\n"
	"	mov %rax, 0x28(%rdi)\n"
	"	add $8, %rsp\n"
	"	pop %r15\n"
	"	pop %r14\n"
	"	pop %r13\n"
	"	pop %r12\n"
	"	pop %rbx\n"
	"	pop %rbp\n"
	"	xor %eax, %eax\n"
	"	ret\n"
);

uint64_t __vmx_enter(struct vmx_gprs *gprs, uint64_t launched);

_Static_assert(__builtin_offsetof(struct vmx_gprs, rdi) == 0x28, "vmx_gprs layout used by __vmx_enter");
_Static_assert(__builtin_offsetof(struct vmx_gprs, rbp) == 0x30, "vmx_gprs layout used by __vmx_enter");
_Static_assert(__builtin_offsetof(struct vmx_gprs, r15) == 0x70, "vmx_gprs layout used by __vmx_enter");
_Static_assert(HOST_RSP == 0x6c14, "HOST_RSP encoding used by __vmx_enter");

uint32_t vmx_run(struct vmx_ctx *vmx)
{
	uint64_t failed = __vmx_enter(&vmx->gprs, vmx->launched);
	uint32_t reason;

	if (failed)
		check_vmx_insn(vmx->launched ? "VMRESUME" : "VMLAUNCH", (uint64_t)(uintptr_t)vmx->pages->vmcs, failed);
	reason = vmx_exit_reason();
	/* A VM-entry failure (bit 31) leaves the VMCS clear: the next try is VMLAUNCH again. */
	if (!(reason & VMX_EXIT_REASON_ENTRY_FAIL))
		vmx->launched = true;
	vmx->nr_runs++;
	return reason;
}

void vmx_skip_insn(struct vmx_ctx *vmx)
{
	vmwritez(GUEST_RIP, vmreadz(GUEST_RIP) + vmx_exit_insn_len());
}

void vmx_reload_vmcs(struct vmx_ctx *vmx)
{
	uint64_t vmcs_pa = (uint64_t)(uintptr_t)vmx->pages->vmcs;

	vmclear(vmcs_pa);
	vmptrld(vmcs_pa);
	vmx->launched = false;
}

const char *vmx_exit_name(uint32_t reason)
{
	switch (reason) {
	case VMX_EXIT_EXCEPTION_NMI: return "EXCEPTION_NMI";
	case VMX_EXIT_EXTERNAL_INTERRUPT: return "EXTERNAL_INTERRUPT";
	case VMX_EXIT_TRIPLE_FAULT: return "TRIPLE_FAULT";
	case VMX_EXIT_INIT: return "INIT";
	case VMX_EXIT_CPUID: return "CPUID";
	case VMX_EXIT_HLT: return "HLT";
	case VMX_EXIT_INVLPG: return "INVLPG";
	case VMX_EXIT_RDTSC: return "RDTSC";
	case VMX_EXIT_VMCALL: return "VMCALL";
	case VMX_EXIT_CR_ACCESS: return "CR_ACCESS";
	case VMX_EXIT_IO_INSTRUCTION: return "IO_INSTRUCTION";
	case VMX_EXIT_MSR_READ: return "MSR_READ";
	case VMX_EXIT_MSR_WRITE: return "MSR_WRITE";
	case VMX_EXIT_INVALID_GUEST_STATE: return "INVALID_GUEST_STATE";
	case VMX_EXIT_MSR_LOAD_FAIL: return "MSR_LOAD_FAIL";
	case VMX_EXIT_MCE_DURING_VMENTRY: return "MCE_DURING_VMENTRY";
	case VMX_EXIT_EPT_VIOLATION: return "EPT_VIOLATION";
	case VMX_EXIT_EPT_MISCONFIG: return "EPT_MISCONFIG";
	default: return "?";
	}
}

/* ---- extended page tables ---------------------------------------------- */

void ept_init(struct ept *ept, void *pool, size_t pool_pages, bool ad)
{
	GUEST_ASSERT_MSG(vmx_ept_supported(), "ept_init: this CPU offers no usable EPT");
	ept->cap = rdmsr(MSR_IA32_VMX_EPT_VPID_CAP);
	GUEST_ASSERT_MSG(!ad || (ept->cap & VMX_EPT_CAP_AD), "EPT accessed/dirty flags not offered "
			 "(EPT_VPID_CAP %#lx)", ept->cap);
	ept->ad = ad;
	if (ad)
		tdp_init(&ept->tdp, "EPT", pool, pool_pages, EPT_RWX, EPT_RWX | EPT_A,
			 EPT_RWX | EPT_MT_WB | EPT_A | EPT_D, EPT_A, EPT_D);
	else
		tdp_init(&ept->tdp, "EPT", pool, pool_pages, EPT_RWX, EPT_RWX, EPT_RWX | EPT_MT_WB, 0, 0);
}

static int ept_size_level(const struct ept *ept, uint64_t page_size)
{
	uint64_t cap = ept->cap;

	switch (page_size) {
	case PAGE_SIZE_4K:
		return 1;
	case PAGE_SIZE_2M:
		GUEST_ASSERT_MSG(cap & VMX_EPT_CAP_2M, "EPT 2M pages not offered (EPT_VPID_CAP %#lx)", cap);
		return 2;
	case PAGE_SIZE_1G:
		GUEST_ASSERT_MSG(cap & VMX_EPT_CAP_1G, "EPT 1G pages not offered (EPT_VPID_CAP %#lx)", cap);
		return 3;
	}
	GUEST_ASSERT_MSG(0, "bad EPT page size %#lx", page_size);
	return 0;
}

void ept_map(struct ept *ept, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, uint64_t page_size)
{
	tdp_map(&ept->tdp, l2_gpa, l1_gpa, size, ept_size_level(ept, page_size));
}

uint64_t *ept_leaf(struct ept *ept, uint64_t l2_gpa, int *level)
{
	return tdp_leaf(&ept->tdp, l2_gpa, level);
}

void vmx_enable_ept(struct vmx_ctx *vmx, struct ept *ept)
{
	GUEST_ASSERT_MSG(vmx_ept_supported(), "IA32_VMX_PROCBASED_CTLS2 / EPT_VPID_CAP offer no EPT with a "
			 "4-level WB walk: the host KVM does not expose nested EPT (kvm_intel ept=0?)");
	GUEST_ASSERT_MSG(vmreadz(CPU_BASED_VM_EXEC_CONTROL) & CPU_BASED_ACTIVATE_SECONDARY,
			 "secondary controls not activated");
	/* EPTP: memory type WB (bits 2:0), page-walk length - 1 = 3 (bits 5:3), A/D (bit 6). */
	vmx->eptp = (uint64_t)(uintptr_t)ept->tdp.pml4 | 6 | (3 << 3) | (ept->ad ? 1 << 6 : 0);
	vmwritez(EPT_POINTER, vmx->eptp);
	vmwritez(SECONDARY_VM_EXEC_CONTROL, vmreadz(SECONDARY_VM_EXEC_CONTROL) | SECONDARY_EXEC_ENABLE_EPT);
}

void vmx_invept(struct vmx_ctx *vmx)
{
	struct { uint64_t eptp, rsvd; } desc = { vmx->eptp, 0 };
	uint64_t cap = vmx->ept_vpid_cap, type, rflags;

	GUEST_ASSERT_MSG(cap & VMX_EPT_CAP_INVEPT, "INVEPT not offered (EPT_VPID_CAP %#lx)", cap);
	type = (cap & VMX_EPT_CAP_INVEPT_SINGLE) ? 1 : 2;
	GUEST_ASSERT_MSG(type == 1 || (cap & VMX_EPT_CAP_INVEPT_ALL),
			 "neither single-context nor global INVEPT offered (EPT_VPID_CAP %#lx)", cap);
	__asm__ volatile("invept %1, %2; pushfq; popq %0"
			 : "=r"(rflags) : "m"(desc), "r"(type) : "cc", "memory");
	check_vmx_insn("INVEPT", type, rflags);
}
