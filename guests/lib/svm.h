/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * AMD SVM helpers for an L1 guest that runs an L2 guest (AMD APM vol. 2,
 * chapter 15).  A program includes it (it includes guest.h) and owns the memory:
 *
 *     #include "lib/svm.h"
 *
 *     static struct svm_ctx svm;
 *     static struct svm_pages svm_pages;      // VMCB, host save area, bitmaps
 *     static uint8_t npt_pool[32][4096] __attribute__((aligned(4096)));
 *     static struct npt npt;
 *
 *     svm_enable(&svm, &svm_pages);           // EFER.SVME, VM_HSAVE_PA
 *     npt_init(&npt, npt_pool, 32);
 *     npt_map(&npt, 0, 0, 64 << 20, PAGE_SIZE_2M);   // identity, L2 GPA == L1 GPA
 *     svm_vmcb_init(&svm, l2_main, l2_stack_top, arg); // 64-bit L2 sharing L1's CR3/GDT/IDT
 *     svm_enable_npt(&svm, &npt);
 *     while (svm_run(&svm) == SVM_EXIT_VMMCALL) { ... svm_skip_insn(&svm, 3); }
 *
 * All of L1's memory is identity mapped (GVA == GPA), so a pointer in L1 is
 * also the L1 guest physical address VMRUN and the NPT entries want.
 *
 * L2 shares L1's page tables, GDT, IDT and TSS.  L1 does not intercept I/O,
 * so an L2 that identity-maps L1's memory through NPT can use GUEST_ASSERT /
 * GUEST_PRINTF directly: the OUT to the ucall port exits from L2 straight to
 * the host (KVM handles un-intercepted L2 I/O itself), and the ucall struct's
 * L2 GPA is the same number as its L1 GPA.  Calls from L2 to L1 that work on
 * both vendors are in nested.h.
 */
#ifndef KVMPY_SVM_H
#define KVMPY_SVM_H

#include "guest.h"
#include "tdp.h"

/* ---- CPUID / MSRs ------------------------------------------------------ */

#define CPUID_SVM_LEAF         0x8000000au  /* edx: SVM features */
#define CPUID_EXT_ECX_SVM      (1u << 2)    /* leaf 0x80000001 ecx */
#define SVM_FEATURE_NPT        (1u << 0)
#define SVM_FEATURE_NRIPS      (1u << 3)

#define MSR_VM_CR              0xc0010114u
#define MSR_VM_HSAVE_PA        0xc0010117u
#define MSR_IA32_CR_PAT        0x00000277u
#define EFER_SVME              (1ul << 12)
#define VM_CR_SVMDIS           (1ul << 4)

/* ---- VMCB layout ------------------------------------------------------- */

/* Intercept bits of the 64-bit vector at control offset 0x00c (vectors 3 and 4). */
enum svm_intercept {
	SVM_INTERCEPT_INTR = 0,
	SVM_INTERCEPT_NMI = 1,
	SVM_INTERCEPT_CPUID = 18,
	SVM_INTERCEPT_HLT = 24,
	SVM_INTERCEPT_INVLPG = 25,
	SVM_INTERCEPT_IOIO_PROT = 27,
	SVM_INTERCEPT_MSR_PROT = 28,
	SVM_INTERCEPT_SHUTDOWN = 31,
	SVM_INTERCEPT_VMRUN = 32,
	SVM_INTERCEPT_VMMCALL = 33,
	SVM_INTERCEPT_VMLOAD = 34,
	SVM_INTERCEPT_VMSAVE = 35,
	SVM_INTERCEPT_STGI = 36,
	SVM_INTERCEPT_CLGI = 37,
};

/* #VMEXIT codes (APM vol. 2, appendix C) used by kvmpy guests. */
#define SVM_EXIT_EXCP_BASE     0x040ul  /* + vector */
#define SVM_EXIT_INTR          0x060ul
#define SVM_EXIT_NMI           0x061ul
#define SVM_EXIT_CPUID         0x072ul
#define SVM_EXIT_HLT           0x078ul
#define SVM_EXIT_INVLPG        0x079ul
#define SVM_EXIT_IOIO          0x07bul
#define SVM_EXIT_MSR           0x07cul
#define SVM_EXIT_SHUTDOWN      0x07ful
#define SVM_EXIT_VMRUN         0x080ul
#define SVM_EXIT_VMMCALL       0x081ul
#define SVM_EXIT_NPF           0x400ul
#define SVM_EXIT_INVALID       ((uint64_t)-1)  /* VMRUN's consistency checks failed */

/* EXITINFO1 of an NPF: a #PF-style error code plus where the walk failed. */
#define SVM_NPF_PRESENT        (1ul << 0)
#define SVM_NPF_WRITE          (1ul << 1)
#define SVM_NPF_USER           (1ul << 2)
#define SVM_NPF_FETCH          (1ul << 4)
#define SVM_NPF_FINAL_GPA      (1ul << 32)  /* faulted translating the final L2 GPA */
#define SVM_NPF_PT_WALK        (1ul << 33)  /* faulted on an L2 page-table access */

#define SVM_NESTED_CTL_NP_ENABLE (1ul << 0)
#define SVM_TLB_CONTROL_DO_NOTHING 0
#define SVM_TLB_CONTROL_FLUSH_ASID 3

#define SVM_IOPM_SIZE  (3 * 4096)
#define SVM_MSRPM_SIZE (2 * 4096)

/* Segment attribute bits (the descriptor's type..G packed into 12 bits). */
#define SVM_SEG_S   (1u << 4)
#define SVM_SEG_P   (1u << 7)
#define SVM_SEG_L   (1u << 9)
#define SVM_SEG_DB  (1u << 10)
#define SVM_SEG_G   (1u << 11)
#define SVM_SEG_CODE64 (0xbu | SVM_SEG_S | SVM_SEG_P | SVM_SEG_L | SVM_SEG_G)   /* exec/read, accessed */
#define SVM_SEG_DATA   (0x3u | SVM_SEG_S | SVM_SEG_P | SVM_SEG_DB | SVM_SEG_G)  /* read/write, accessed */

struct vmcb_seg {
	uint16_t selector;
	uint16_t attrib;
	uint32_t limit;
	uint64_t base;
} __attribute__((packed));

struct vmcb_control {
	uint32_t intercept_cr;          /* 0x000 */
	uint32_t intercept_dr;          /* 0x004 */
	uint32_t intercept_exceptions;  /* 0x008 */
	uint64_t intercept;             /* 0x00c: enum svm_intercept bits */
	uint8_t  rsvd1[0x03c - 0x014];
	uint16_t pause_filter_thresh;   /* 0x03c */
	uint16_t pause_filter_count;    /* 0x03e */
	uint64_t iopm_base_pa;          /* 0x040 */
	uint64_t msrpm_base_pa;         /* 0x048 */
	uint64_t tsc_offset;            /* 0x050 */
	uint32_t asid;                  /* 0x058 */
	uint8_t  tlb_ctl;               /* 0x05c */
	uint8_t  rsvd2[3];
	uint32_t int_ctl;               /* 0x060 */
	uint32_t int_vector;            /* 0x064 */
	uint32_t int_state;             /* 0x068 */
	uint8_t  rsvd3[4];
	uint64_t exit_code;             /* 0x070 */
	uint64_t exit_info_1;           /* 0x078 */
	uint64_t exit_info_2;           /* 0x080 */
	uint32_t exit_int_info;         /* 0x088 */
	uint32_t exit_int_info_err;     /* 0x08c */
	uint64_t nested_ctl;            /* 0x090: SVM_NESTED_CTL_NP_ENABLE */
	uint64_t avic_vapic_bar;        /* 0x098 */
	uint64_t ghcb_gpa;              /* 0x0a0 */
	uint32_t event_inj;             /* 0x0a8 */
	uint32_t event_inj_err;         /* 0x0ac */
	uint64_t nested_cr3;            /* 0x0b0: n_cr3, the NPT root */
	uint64_t virt_ext;              /* 0x0b8 */
	uint32_t clean;                 /* 0x0c0 */
	uint32_t rsvd5;
	uint64_t next_rip;              /* 0x0c8: with NRIPS */
	uint8_t  insn_len;              /* 0x0d0 */
	uint8_t  insn_bytes[15];
	uint8_t  rsvd6[0x400 - 0x0e0];
} __attribute__((packed));

struct vmcb_save {
	struct vmcb_seg es, cs, ss, ds, fs, gs;   /* 0x400.. */
	struct vmcb_seg gdtr, ldtr, idtr, tr;     /* 0x460.. */
	uint8_t  rsvd1[0x4cb - 0x4a0];
	uint8_t  cpl;                   /* 0x4cb */
	uint8_t  rsvd2[4];
	uint64_t efer;                  /* 0x4d0 */
	uint8_t  rsvd3[0x548 - 0x4d8];
	uint64_t cr4;                   /* 0x548 */
	uint64_t cr3;                   /* 0x550 */
	uint64_t cr0;                   /* 0x558 */
	uint64_t dr7;                   /* 0x560 */
	uint64_t dr6;                   /* 0x568 */
	uint64_t rflags;                /* 0x570 */
	uint64_t rip;                   /* 0x578 */
	uint8_t  rsvd4[0x5d8 - 0x580];
	uint64_t rsp;                   /* 0x5d8 */
	uint8_t  rsvd5[0x5f8 - 0x5e0];
	uint64_t rax;                   /* 0x5f8 */
	uint64_t star, lstar, cstar, sfmask, kernel_gs_base;  /* 0x600.. */
	uint64_t sysenter_cs, sysenter_esp, sysenter_eip;     /* 0x628.. */
	uint64_t cr2;                   /* 0x640 */
	uint8_t  rsvd6[0x668 - 0x648];
	uint64_t g_pat;                 /* 0x668 */
	uint64_t dbgctl;                /* 0x670 */
	uint8_t  rsvd7[0x1000 - 0x678];
} __attribute__((packed));

struct vmcb {
	struct vmcb_control control;
	struct vmcb_save save;
} __attribute__((packed));

_Static_assert(sizeof(struct vmcb) == 4096, "VMCB is one page");
_Static_assert(__builtin_offsetof(struct vmcb, control.nested_cr3) == 0x0b0, "n_cr3 offset");
_Static_assert(__builtin_offsetof(struct vmcb, control.exit_code) == 0x070, "exit_code offset");
_Static_assert(__builtin_offsetof(struct vmcb, save.efer) == 0x4d0, "efer offset");
_Static_assert(__builtin_offsetof(struct vmcb, save.rip) == 0x578, "rip offset");
_Static_assert(__builtin_offsetof(struct vmcb, save.rax) == 0x5f8, "rax offset");
_Static_assert(__builtin_offsetof(struct vmcb, save.g_pat) == 0x668, "g_pat offset");

/* ---- L1 side ----------------------------------------------------------- */

/* L2's general-purpose registers that VMRUN/#VMEXIT do not switch (RAX, RSP
 * and RIP live in the VMCB).  The layout is used by svm.c's assembly. */
struct svm_gprs {
	uint64_t rbx, rcx, rdx, rsi, rdi, rbp;
	uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
};

/*
 * The memory SVM reads and writes on L1's behalf (KVM, for an L1 guest),
 * separate from svm_ctx so that a program can place it, e.g. in a memslot of
 * its own whose dirty log then shows exactly what KVM wrote.
 */
struct svm_pages {
	struct vmcb vmcb;               /* VMCB12: KVM writes it at VMRUN and #VMEXIT */
	uint8_t hsave[4096];            /* VM_HSAVE_PA */
	uint8_t iopm[SVM_IOPM_SIZE];
	uint8_t msrpm[SVM_MSRPM_SIZE];
} __attribute__((aligned(4096)));

struct svm_ctx {
	struct vmcb *vmcb;              /* &pages->vmcb */
	struct svm_pages *pages;
	struct svm_gprs gprs;           /* L2's, between runs */
	uint64_t nr_runs;
	bool nrips;                     /* next_rip is filled on intercepts */
};

/* CPUID says SVM (and NPT) are available to this (L1) guest. */
bool svm_supported(void);
bool svm_npt_supported(void);

/* Check SVM is usable (GUEST_ASSERTs with the reason if not), set EFER.SVME and VM_HSAVE_PA. */
void svm_enable(struct svm_ctx *svm, struct svm_pages *pages);

/*
 * Fill svm->vmcb for a 64-bit L2 entering at rip with rsp: L1's current CR0,
 * CR3, CR4, EFER, GDT, IDT and flat segments, ASID 1, PAT, intercepts of
 * VMRUN (architecturally required), VMMCALL, HLT and SHUTDOWN.  NPT is off
 * until svm_enable_npt().  L2 GPRs start at zero, rdi = arg.
 */
void svm_vmcb_init(struct svm_ctx *svm, void (*rip)(uint64_t), void *rsp, uint64_t arg);

/*
 * VMRUN until the next #VMEXIT; returns the exit code (also in vmcb->control.exit_code).
 * L1 writes the VMCB here only to reset a TLB_CONTROL flush request, so the
 * VMCB12 page's dirty bit after a round trip is KVM's doing.
 */
uint64_t svm_run(struct svm_ctx *svm);

/*
 * Step L2 over the intercepted instruction of insn_len bytes.  With NRIPS the
 * CPU reports next_rip; it is asserted to agree with insn_len.
 */
void svm_skip_insn(struct svm_ctx *svm, unsigned int insn_len);

/* A short name for an exit code ("VMMCALL", "NPF", "EXCP#14", ...). */
const char *svm_exit_name(uint64_t code);

/* Assert the last exit was `code`, reporting name, EXITINFO1/2 and L2 RIP otherwise. */
#define SVM_ASSERT_EXIT(svm, code) do {					\
	const struct vmcb_control *__c = &(svm)->vmcb->control;		\
	GUEST_ASSERT_MSG(__c->exit_code == (uint64_t)(code),		\
			 "L2 exit %s (%#lx), wanted %s: exit_info_1 %#lx exit_info_2 %#lx L2 rip %#lx", \
			 svm_exit_name(__c->exit_code), __c->exit_code,	\
			 svm_exit_name(code), __c->exit_info_1,		\
			 __c->exit_info_2, (svm)->vmcb->save.rip);	\
} while (0)

/* ---- nested page tables ------------------------------------------------ */

/*
 * NPT tables built by L1 in a pool of identity-mapped pages.  The format is
 * the long-mode page-table format; NPT walks count as user accesses, so every
 * entry has U/S set.  Leaves are created with A and D already set, so the
 * nested MMU never has to write them back.
 */
struct npt {
	struct tdp tdp;
};

#define NPT_P  (1ul << 0)
#define NPT_RW (1ul << 1)
#define NPT_US (1ul << 2)
#define NPT_A  (1ul << 5)
#define NPT_D  (1ul << 6)
#define NPT_PS TDP_PS
#define NPT_NX (1ul << 63)

void npt_init(struct npt *npt, void *pool, size_t pool_pages);

/*
 * Map [l2_gpa, l2_gpa + size) to [l1_gpa, ...) with page_size pages (4K, 2M
 * or 1G), writable.  Asserts alignment and that no mapping of another size is
 * in the way; remapping a range with the same page size overwrites it.
 */
void npt_map(struct npt *npt, uint64_t l2_gpa, uint64_t l1_gpa, uint64_t size, uint64_t page_size);

/* The leaf mapping l2_gpa and its level (1 = 4K, 2 = 2M, 3 = 1G), or NULL. */
uint64_t *npt_leaf(struct npt *npt, uint64_t l2_gpa, int *level);

/* Turn on NPT for the next VMRUN with npt as the root (n_cr3). */
void svm_enable_npt(struct svm_ctx *svm, struct npt *npt);

/* Flush L2's ASID on the next VMRUN (after changing or removing NPT entries). */
static inline void svm_flush_asid(struct svm_ctx *svm)
{
	svm->vmcb->control.tlb_ctl = SVM_TLB_CONTROL_FLUSH_ASID;
}

/* INVLPGA: invalidate the TLB entries of virtual address va in ASID asid. */
static inline void svm_invlpga(uint64_t va, uint32_t asid)
{
	__asm__ volatile("invlpga %%rax, %%ecx" :: "a"(va), "c"(asid) : "memory");
}

/* ---- L2 side ----------------------------------------------------------- */

/* VMMCALL with rax = nr, rdi/rsi/rdx/rcx = arguments; L1's answer comes back in rax. */
static inline uint64_t svm_vmmcall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3)
{
	uint64_t ret = nr;

	__asm__ volatile("vmmcall" : "+a"(ret) : "D"(a0), "S"(a1), "d"(a2), "c"(a3) : "memory");
	return ret;
}

#endif
