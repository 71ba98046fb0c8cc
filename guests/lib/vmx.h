/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Intel VMX helpers for an L1 guest that runs an L2 guest (Intel SDM vol. 3C,
 * chapters 24-28 and appendix A/B).  The shape follows svm.h.  A program
 * includes it (it includes guest.h) and owns the memory:
 *
 *     #include "lib/vmx.h"
 *
 *     static struct vmx_ctx vmx;
 *     static struct vmx_pages vmx_pages;      // VMXON region, VMCS
 *     static uint8_t ept_pool[16][4096] __attribute__((aligned(4096)));
 *     static struct ept ept;
 *
 *     vmx_enable(&vmx, &vmx_pages);           // feature control, CR0/CR4, VMXON
 *     vmx_vmcs_init(&vmx, l2_main, l2_stack_top, arg);  // 64-bit L2 sharing L1's CR3/GDT/IDT
 *     if (vmx_ept_supported()) {
 *             ept_init(&ept, ept_pool, 16, false);
 *             ept_map(&ept, 0, 0, 64 << 20, PAGE_SIZE_2M);  // identity, L2 GPA == L1 GPA
 *             vmx_enable_ept(&vmx, &ept);
 *     }
 *     while (vmx_run(&vmx) == VMX_EXIT_VMCALL) { ... vmx_skip_insn(&vmx); }
 *
 * All of L1's memory is identity mapped (GVA == GPA), so a pointer in L1 is
 * also the physical address VMXON, VMPTRLD and the EPT entries want.
 *
 * L2 shares L1's page tables, GDT, IDT and TSS.  L1 does not exit on I/O, so
 * L2 can use GUEST_ASSERT / GUEST_SYNC directly: its OUT to the ucall port
 * goes from L2 straight to the host (KVM handles I/O that L1 does not
 * intercept itself), and with an identity EPT (or none) the ucall struct's L2
 * GPA is the same number as its L1 GPA.
 *
 * Every VMX instruction's result is checked: VMfailInvalid (CF) and
 * VMfailValid (ZF, with the VM-instruction error field) end the guest through
 * GUEST_ASSERT naming the instruction, the field and the error.
 */
#ifndef KVMPY_VMX_H
#define KVMPY_VMX_H

#include "guest.h"
#include "tdp.h"

/* ---- CPUID / MSRs / CR bits ------------------------------------------- */

#define CPUID_1_ECX_VMX                 (1u << 5)

#define MSR_IA32_FEATURE_CONTROL        0x0000003au
#define FEATURE_CONTROL_LOCKED          (1ul << 0)
#define FEATURE_CONTROL_VMXON_IN_SMX    (1ul << 1)
#define FEATURE_CONTROL_VMXON_OUTSIDE_SMX (1ul << 2)

#define MSR_IA32_SYSENTER_CS            0x00000174u
#define MSR_IA32_SYSENTER_ESP           0x00000175u
#define MSR_IA32_SYSENTER_EIP           0x00000176u
#define MSR_IA32_DEBUGCTL               0x000001d9u
#define MSR_IA32_CR_PAT                 0x00000277u
#define MSR_FS_BASE                     0xc0000100u
#define MSR_GS_BASE                     0xc0000101u

#define MSR_IA32_VMX_BASIC              0x00000480u
#define MSR_IA32_VMX_PINBASED_CTLS      0x00000481u
#define MSR_IA32_VMX_PROCBASED_CTLS     0x00000482u
#define MSR_IA32_VMX_EXIT_CTLS          0x00000483u
#define MSR_IA32_VMX_ENTRY_CTLS         0x00000484u
#define MSR_IA32_VMX_MISC               0x00000485u
#define MSR_IA32_VMX_CR0_FIXED0         0x00000486u
#define MSR_IA32_VMX_CR0_FIXED1         0x00000487u
#define MSR_IA32_VMX_CR4_FIXED0         0x00000488u
#define MSR_IA32_VMX_CR4_FIXED1         0x00000489u
#define MSR_IA32_VMX_PROCBASED_CTLS2    0x0000048bu
#define MSR_IA32_VMX_EPT_VPID_CAP       0x0000048cu
#define MSR_IA32_VMX_TRUE_PINBASED_CTLS 0x0000048du
#define MSR_IA32_VMX_TRUE_PROCBASED_CTLS 0x0000048eu
#define MSR_IA32_VMX_TRUE_EXIT_CTLS     0x0000048fu
#define MSR_IA32_VMX_TRUE_ENTRY_CTLS    0x00000490u

#define VMX_BASIC_REVISION_MASK         0x7ffffffful
#define VMX_BASIC_TRUE_CTLS             (1ul << 55)  /* the TRUE_*_CTLS MSRs exist */

#define X86_CR0_NE                      (1ul << 5)
#define X86_CR4_VMXE                    (1ul << 13)

/* ---- VMCS field encodings (SDM vol. 3D appendix B) --------------------- */

enum vmcs_field {
	/* 16-bit */
	VIRTUAL_PROCESSOR_ID            = 0x0000,
	GUEST_ES_SELECTOR               = 0x0800,
	GUEST_CS_SELECTOR               = 0x0802,
	GUEST_SS_SELECTOR               = 0x0804,
	GUEST_DS_SELECTOR               = 0x0806,
	GUEST_FS_SELECTOR               = 0x0808,
	GUEST_GS_SELECTOR               = 0x080a,
	GUEST_LDTR_SELECTOR             = 0x080c,
	GUEST_TR_SELECTOR               = 0x080e,
	HOST_ES_SELECTOR                = 0x0c00,
	HOST_CS_SELECTOR                = 0x0c02,
	HOST_SS_SELECTOR                = 0x0c04,
	HOST_DS_SELECTOR                = 0x0c06,
	HOST_FS_SELECTOR                = 0x0c08,
	HOST_GS_SELECTOR                = 0x0c0a,
	HOST_TR_SELECTOR                = 0x0c0c,
	/* 64-bit */
	IO_BITMAP_A                     = 0x2000,
	IO_BITMAP_B                     = 0x2002,
	MSR_BITMAP                      = 0x2004,
	VM_EXIT_MSR_STORE_ADDR          = 0x2006,
	VM_EXIT_MSR_LOAD_ADDR           = 0x2008,
	VM_ENTRY_MSR_LOAD_ADDR          = 0x200a,
	TSC_OFFSET                      = 0x2010,
	EPT_POINTER                     = 0x201a,
	GUEST_PHYSICAL_ADDRESS          = 0x2400,
	VMCS_LINK_POINTER               = 0x2800,
	GUEST_IA32_DEBUGCTL             = 0x2802,
	GUEST_IA32_PAT                  = 0x2804,
	GUEST_IA32_EFER                 = 0x2806,
	HOST_IA32_PAT                   = 0x2c00,
	HOST_IA32_EFER                  = 0x2c02,
	/* 32-bit */
	PIN_BASED_VM_EXEC_CONTROL       = 0x4000,
	CPU_BASED_VM_EXEC_CONTROL       = 0x4002,
	EXCEPTION_BITMAP                = 0x4004,
	PAGE_FAULT_ERROR_CODE_MASK      = 0x4006,
	PAGE_FAULT_ERROR_CODE_MATCH     = 0x4008,
	CR3_TARGET_COUNT                = 0x400a,
	VM_EXIT_CONTROLS                = 0x400c,
	VM_EXIT_MSR_STORE_COUNT         = 0x400e,
	VM_EXIT_MSR_LOAD_COUNT          = 0x4010,
	VM_ENTRY_CONTROLS               = 0x4012,
	VM_ENTRY_MSR_LOAD_COUNT         = 0x4014,
	VM_ENTRY_INTR_INFO_FIELD        = 0x4016,
	SECONDARY_VM_EXEC_CONTROL       = 0x401e,
	VM_INSTRUCTION_ERROR            = 0x4400,
	VM_EXIT_REASON                  = 0x4402,
	VM_EXIT_INTR_INFO               = 0x4404,
	VM_EXIT_INTR_ERROR_CODE         = 0x4406,
	IDT_VECTORING_INFO_FIELD        = 0x4408,
	VM_EXIT_INSTRUCTION_LEN         = 0x440c,
	VMX_INSTRUCTION_INFO            = 0x440e,
	GUEST_ES_LIMIT                  = 0x4800,
	GUEST_CS_LIMIT                  = 0x4802,
	GUEST_SS_LIMIT                  = 0x4804,
	GUEST_DS_LIMIT                  = 0x4806,
	GUEST_FS_LIMIT                  = 0x4808,
	GUEST_GS_LIMIT                  = 0x480a,
	GUEST_LDTR_LIMIT                = 0x480c,
	GUEST_TR_LIMIT                  = 0x480e,
	GUEST_GDTR_LIMIT                = 0x4810,
	GUEST_IDTR_LIMIT                = 0x4812,
	GUEST_ES_AR_BYTES               = 0x4814,
	GUEST_CS_AR_BYTES               = 0x4816,
	GUEST_SS_AR_BYTES               = 0x4818,
	GUEST_DS_AR_BYTES               = 0x481a,
	GUEST_FS_AR_BYTES               = 0x481c,
	GUEST_GS_AR_BYTES               = 0x481e,
	GUEST_LDTR_AR_BYTES             = 0x4820,
	GUEST_TR_AR_BYTES               = 0x4822,
	GUEST_INTERRUPTIBILITY_INFO     = 0x4824,
	GUEST_ACTIVITY_STATE            = 0x4826,
	GUEST_SYSENTER_CS               = 0x482a,
	HOST_IA32_SYSENTER_CS           = 0x4c00,
	/* natural width */
	CR0_GUEST_HOST_MASK             = 0x6000,
	CR4_GUEST_HOST_MASK             = 0x6002,
	CR0_READ_SHADOW                 = 0x6004,
	CR4_READ_SHADOW                 = 0x6006,
	EXIT_QUALIFICATION              = 0x6400,
	GUEST_LINEAR_ADDRESS            = 0x640a,
	GUEST_CR0                       = 0x6800,
	GUEST_CR3                       = 0x6802,
	GUEST_CR4                       = 0x6804,
	GUEST_ES_BASE                   = 0x6806,
	GUEST_CS_BASE                   = 0x6808,
	GUEST_SS_BASE                   = 0x680a,
	GUEST_DS_BASE                   = 0x680c,
	GUEST_FS_BASE                   = 0x680e,
	GUEST_GS_BASE                   = 0x6810,
	GUEST_LDTR_BASE                 = 0x6812,
	GUEST_TR_BASE                   = 0x6814,
	GUEST_GDTR_BASE                 = 0x6816,
	GUEST_IDTR_BASE                 = 0x6818,
	GUEST_DR7                       = 0x681a,
	GUEST_RSP                       = 0x681c,
	GUEST_RIP                       = 0x681e,
	GUEST_RFLAGS                    = 0x6820,
	GUEST_PENDING_DBG_EXCEPTIONS    = 0x6822,
	GUEST_SYSENTER_ESP              = 0x6824,
	GUEST_SYSENTER_EIP              = 0x6826,
	HOST_CR0                        = 0x6c00,
	HOST_CR3                        = 0x6c02,
	HOST_CR4                        = 0x6c04,
	HOST_FS_BASE                    = 0x6c06,
	HOST_GS_BASE                    = 0x6c08,
	HOST_TR_BASE                    = 0x6c0a,
	HOST_GDTR_BASE                  = 0x6c0c,
	HOST_IDTR_BASE                  = 0x6c0e,
	HOST_IA32_SYSENTER_ESP          = 0x6c10,
	HOST_IA32_SYSENTER_EIP          = 0x6c12,
	HOST_RSP                        = 0x6c14,
	HOST_RIP                        = 0x6c16,
};

/* ---- VM-execution, exit and entry controls (SDM vol. 3C 25.6-25.8) ----- */

#define PIN_BASED_EXT_INTR_MASK         (1u << 0)
#define PIN_BASED_NMI_EXITING           (1u << 3)

#define CPU_BASED_HLT_EXITING           (1u << 7)
#define CPU_BASED_CR3_LOAD_EXITING      (1u << 15)
#define CPU_BASED_CR3_STORE_EXITING     (1u << 16)
#define CPU_BASED_UNCOND_IO_EXITING     (1u << 24)
#define CPU_BASED_USE_IO_BITMAPS        (1u << 25)
#define CPU_BASED_USE_MSR_BITMAPS       (1u << 28)
#define CPU_BASED_ACTIVATE_SECONDARY    (1u << 31)

#define SECONDARY_EXEC_ENABLE_EPT       (1u << 1)
#define SECONDARY_EXEC_ENABLE_VPID      (1u << 5)
#define SECONDARY_EXEC_UNRESTRICTED     (1u << 7)

#define VM_EXIT_SAVE_DEBUG_CONTROLS     (1u << 2)
#define VM_EXIT_HOST_ADDR_SPACE_SIZE    (1u << 9)
#define VM_EXIT_SAVE_IA32_PAT           (1u << 18)
#define VM_EXIT_LOAD_IA32_PAT           (1u << 19)
#define VM_EXIT_SAVE_IA32_EFER          (1u << 20)
#define VM_EXIT_LOAD_IA32_EFER          (1u << 21)

#define VM_ENTRY_LOAD_DEBUG_CONTROLS    (1u << 2)
#define VM_ENTRY_IA32E_MODE             (1u << 9)
#define VM_ENTRY_LOAD_IA32_PAT          (1u << 14)
#define VM_ENTRY_LOAD_IA32_EFER         (1u << 15)

/* Segment access rights in the VMCS format (type, S, DPL, P, AVL, L, D/B, G, unusable). */
#define VMX_AR_TYPE_CODE_XRA            0xbu
#define VMX_AR_TYPE_DATA_RWA            0x3u
#define VMX_AR_TYPE_TSS64_BUSY          0xbu
#define VMX_AR_S                        (1u << 4)
#define VMX_AR_P                        (1u << 7)
#define VMX_AR_L                        (1u << 13)
#define VMX_AR_DB                       (1u << 14)
#define VMX_AR_G                        (1u << 15)
#define VMX_AR_UNUSABLE                 (1u << 16)

/* ---- exit reasons (SDM vol. 3D appendix C) ----------------------------- */

#define VMX_EXIT_EXCEPTION_NMI          0
#define VMX_EXIT_EXTERNAL_INTERRUPT     1
#define VMX_EXIT_TRIPLE_FAULT           2
#define VMX_EXIT_INIT                   3
#define VMX_EXIT_CPUID                  10
#define VMX_EXIT_HLT                    12
#define VMX_EXIT_INVLPG                 14
#define VMX_EXIT_RDTSC                  16
#define VMX_EXIT_VMCALL                 18
#define VMX_EXIT_CR_ACCESS              28
#define VMX_EXIT_IO_INSTRUCTION         30
#define VMX_EXIT_MSR_READ               31
#define VMX_EXIT_MSR_WRITE              32
#define VMX_EXIT_INVALID_GUEST_STATE    33
#define VMX_EXIT_MSR_LOAD_FAIL          34
#define VMX_EXIT_MCE_DURING_VMENTRY     41
#define VMX_EXIT_EPT_VIOLATION          48
#define VMX_EXIT_EPT_MISCONFIG          49

#define VMX_EXIT_REASON_BASIC(r)        ((r) & 0xffffu)
#define VMX_EXIT_REASON_ENTRY_FAIL      (1u << 31)   /* VM entry failed after loading guest state checks */

/* EPT-violation exit qualification (SDM vol. 3C table 28-7). */
#define EPT_VIOL_READ                   (1ul << 0)
#define EPT_VIOL_WRITE                  (1ul << 1)
#define EPT_VIOL_FETCH                  (1ul << 2)
#define EPT_VIOL_READABLE               (1ul << 3)
#define EPT_VIOL_WRITABLE               (1ul << 4)
#define EPT_VIOL_EXECUTABLE             (1ul << 5)
#define EPT_VIOL_GLA_VALID              (1ul << 7)
#define EPT_VIOL_GLA_TRANSLATED         (1ul << 8)   /* the final access, not a paging-structure read */

/* ---- L1 side ----------------------------------------------------------- */

/* L2's general-purpose registers (VMX switches only RSP, RIP and RFLAGS,
 * which live in the VMCS).  The layout is used by vmx.c's assembly. */
struct vmx_gprs {
	uint64_t rax, rbx, rcx, rdx, rsi, rdi, rbp;
	uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
};

/*
 * The memory VMX uses on L1's behalf, separate from vmx_ctx so that a program
 * can place it (e.g. in a memslot of its own, to see in its dirty log what KVM
 * wrote).  KVM keeps L1's VMCS (vmcs12) cached while it is current and writes
 * the page only when L1 VMCLEARs it or makes another VMCS current.
 */
struct vmx_pages {
	uint8_t vmxon_region[4096];
	uint8_t vmcs[4096];             /* VMCS12 */
} __attribute__((aligned(4096)));

struct vmx_ctx {
	struct vmx_pages *pages;
	uint64_t basic;                 /* IA32_VMX_BASIC */
	uint64_t ept_vpid_cap;          /* IA32_VMX_EPT_VPID_CAP, 0 without secondary controls/EPT */
	uint32_t secondary_allowed1;    /* secondary controls L1 may set */
	struct vmx_gprs gprs;           /* L2's, between runs */
	uint64_t eptp;                  /* 0 while EPT is off */
	uint64_t nr_runs;
	bool launched;                  /* VMLAUNCH done; next entry is VMRESUME */
};

/* CPUID.1:ECX.VMX[bit 5] is set for this (L1) guest. */
bool vmx_supported(void);

/* The VMX capability MSRs offer EPT with a 4-level walk and write-back memory type. */
bool vmx_ept_supported(void);

/*
 * Make VMX usable and enter VMX operation: check CPUID, lock
 * IA32_FEATURE_CONTROL with VMXON-outside-SMX if the firmware (here: nobody)
 * has not, apply the IA32_VMX_CR{0,4}_FIXED{0,1} bits, set CR4.VMXE and
 * VMXON with the revision id from IA32_VMX_BASIC.  GUEST_ASSERTs the reason
 * if any step is impossible.
 */
void vmx_enable(struct vmx_ctx *vmx, struct vmx_pages *pages);

/*
 * VMCLEAR + VMPTRLD vmx->vmcs and fill it for a 64-bit L2 entering at rip
 * with rsp: L1's CR0/CR3/CR4/EFER/PAT, GDT, IDT, TR and flat segments for both
 * L2 (guest state) and L1 (host state), controls adjusted by the (TRUE) control
 * MSRs: HLT exiting, no I/O or MSR bitmaps (so I/O goes to the host), exits to
 * 64-bit mode.  EPT is off until vmx_enable_ept().  L2's GPRs start at zero,
 * rdi = arg.
 */
void vmx_vmcs_init(struct vmx_ctx *vmx, void (*rip)(uint64_t), void *rsp, uint64_t arg);

/* VMLAUNCH (first time) or VMRESUME until the next VM exit; returns the exit reason. */
uint32_t vmx_run(struct vmx_ctx *vmx);

/* Advance L2's RIP by the VM-exit instruction length (exits caused by an instruction). */
void vmx_skip_insn(struct vmx_ctx *vmx);

/*
 * VMCLEAR the VMCS (KVM writes vmcs12 back to its page and marks it clear),
 * VMPTRLD it again; the next vmx_run() is a VMLAUNCH.
 */
void vmx_reload_vmcs(struct vmx_ctx *vmx);

/* VMREAD / VMWRITE of the current VMCS; a failure is a GUEST_ASSERT naming the field. */
uint64_t vmreadz(enum vmcs_field field);
void vmwritez(enum vmcs_field field, uint64_t value);

/* Exit information of the last VM exit. */
static inline uint32_t vmx_exit_reason(void) { return (uint32_t)vmreadz(VM_EXIT_REASON); }
static inline uint64_t vmx_exit_qual(void) { return vmreadz(EXIT_QUALIFICATION); }
static inline uint32_t vmx_exit_insn_len(void) { return (uint32_t)vmreadz(VM_EXIT_INSTRUCTION_LEN); }

/* A short name for a basic exit reason ("VMCALL", "HLT", "EPT_VIOLATION", ...). */
const char *vmx_exit_name(uint32_t reason);

/* Assert the last exit's basic reason was `want` (and no VM-entry failure), reporting it otherwise. */
#define VMX_ASSERT_EXIT(want) do {					\
	uint32_t __r = vmx_exit_reason();				\
	GUEST_ASSERT_MSG(__r == (uint32_t)(want),			\
			 "L2 exit %s (reason %#x%s), wanted %s: qualification %#lx L2 rip %#lx", \
			 vmx_exit_name(VMX_EXIT_REASON_BASIC(__r)), __r,	\
			 (__r & VMX_EXIT_REASON_ENTRY_FAIL) ? ", VM-entry failure" : "", \
			 vmx_exit_name(want), vmx_exit_qual(), vmreadz(GUEST_RIP)); \
} while (0)

/* ---- extended page tables ---------------------------------------------- */

/*
 * EPT tables built by L1 in a pool of identity-mapped pages (SDM vol. 3C
 * 29.3.2).  Leaves are RWX with memory type WB.  With accessed/dirty flags
 * enabled (ept_init's `ad`, EPTP bit 6) entries are created with A (leaves A
 * and D) set, so the nested MMU writes them only where a program clears them.
 */
struct ept {
	struct tdp tdp;
	uint64_t cap;           /* IA32_VMX_EPT_VPID_CAP, read once by ept_init */
	bool ad;                /* accessed/dirty flags enabled */
};

#define EPT_R          (1ul << 0)
#define EPT_W          (1ul << 1)
#define EPT_X          (1ul << 2)
#define EPT_RWX        (EPT_R | EPT_W | EPT_X)
#define EPT_MT_WB      (6ul << 3)   /* leaf memory type */
#define EPT_PS         TDP_PS
#define EPT_A          (1ul << 8)   /* with EPTP A/D enabled */
#define EPT_D          (1ul << 9)

/* IA32_VMX_EPT_VPID_CAP bits (SDM vol. 3D A.10). */
#define VMX_EPT_CAP_WALK4       (1ul << 6)
#define VMX_EPT_CAP_WB          (1ul << 14)
#define VMX_EPT_CAP_2M          (1ul << 16)
#define VMX_EPT_CAP_1G          (1ul << 17)
#define VMX_EPT_CAP_INVEPT      (1ul << 20)
#define VMX_EPT_CAP_AD          (1ul << 21)
#define VMX_EPT_CAP_INVEPT_SINGLE (1ul << 25)
#define VMX_EPT_CAP_INVEPT_ALL  (1ul << 26)

/* Start empty EPT tables in pool (4K-aligned pages); needs vmx_ept_supported(), and
 * VMX_EPT_CAP_AD for ad (accessed/dirty flags). */
void ept_init(struct ept *ept, void *pool, size_t pool_pages, bool ad);

/*
 * Map [l2_gpa, l2_gpa + size) to [l1_gpa, ...) with page_size pages (4K, 2M
 * or 1G; 2M/1G asserted offered by EPT_VPID_CAP), RWX write-back.  Asserts
 * alignment and that no mapping of another size is in the way.
 */
void ept_map(struct ept *ept, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, uint64_t page_size);

/* The leaf mapping l2_gpa and its level (1 = 4K, 2 = 2M, 3 = 1G), or NULL. */
uint64_t *ept_leaf(struct ept *ept, uint64_t l2_gpa, int *level);

/* Turn on EPT (secondary controls) with ept as the root, 4-level walk, WB, A/D as ept_init chose. */
void vmx_enable_ept(struct vmx_ctx *vmx, struct ept *ept);

/* INVEPT (single-context if offered, else global) after changing EPT entries. */
void vmx_invept(struct vmx_ctx *vmx);

/* ---- L2 -> L1 calls ---------------------------------------------------- */

/* L2 asks L1 something with VMCALL: rax = number, rdi/rsi/rdx/rcx = arguments, answer in rax. */
static inline uint64_t vmx_vmcall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3)
{
	uint64_t ret = nr;

	__asm__ volatile("vmcall" : "+a"(ret) : "D"(a0), "S"(a1), "d"(a2), "c"(a3) : "memory");
	return ret;
}

#endif
