/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Numbers a guest program and the host must agree on: GUEST_SYNC stages,
 * commands, addresses and magic values.  One section per program, each line
 * `#define NAME literal  [comment]`.  build_guest.sh generates the host's copy,
 * kvmpy/guest/stages.py, from this file (tests/test_stages.py checks that the
 * two agree): edit here, rebuild, commit both.
 */
#ifndef KVMPY_STAGES_H
#define KVMPY_STAGES_H

/* dirty_writer.c: stamps pages in rounds; the host holds each vCPU at PARKED between them */
#define DIRTY_WRITER_PARKED    1  /* GUEST_SYNC(PARKED, vcpu, writes): between rounds */
#define DIRTY_WRITER_PROGRESS  2  /* GUEST_SYNC(PROGRESS, vcpu, writes): every sync_every writes */

/* mmu_touch.c: one pass over the test region per host command */
#define MMU_TOUCH_PARKED    1  /* GUEST_SYNC(PARKED, passes, sum): between passes */
#define MMU_TOUCH_OP_QUIT   0  /* values of the global `op` */
#define MMU_TOUCH_OP_READ   1
#define MMU_TOUCH_OP_WRITE  2
#define MMU_TOUCH_OP_RELOAD_CR3  3  /* no pass: reload CR3 (the host changed the guest's page tables) */
#define MMU_TOUCH_OP_EXEC   4  /* call the RET the host put at exec_offset past each address */

/* svm_l2_smoke.c, vmx_probe.c: L1 reports each exit of its L2 in a GUEST_SYNC of this stage */
#define NESTED_SMOKE_SETUP      0  /* vmx_probe.c only: (EPT in use, VMCS revision id) */
#define NESTED_SMOKE_CALL       1  /* L2's VMMCALL/VMCALL */
#define NESTED_SMOKE_FAULT      2  /* L2's write into the hole: NPF / EPT violation */
#define NESTED_SMOKE_HLT        3  /* L2's HLT, after its retried write landed */
#define NESTED_SMOKE_DONE       4  /* L2 said done */
#define NESTED_SMOKE_FROM_L2    100  /* L2's own GUEST_SYNC, straight to the host */
#define NESTED_SMOKE_IDENT_END  0x3e00000  /* L2 GPAs below are identity mapped (2M NPT/EPT pages) */
#define NESTED_SMOKE_HOLE_GPA   0x3f23000  /* an unmapped L2 GPA above them; L2 writes at +8 */
#define NESTED_SMOKE_CALL_MAGIC   0x1234  /* L2's rax at its first call */
#define NESTED_SMOKE_ARG_MAGIC    0xabcdef01  /* L2's rdi at its first call */
#define NESTED_SMOKE_REPLY_MAGIC  0x5678  /* L1's answer in L2's rax */
#define NESTED_SMOKE_DONE_MAGIC   0x600d  /* L2's rax at its last VMMCALL/VMCALL */
#define NESTED_SMOKE_L2_ARG       0x42  /* L2's argument (rsi at its first call) */
#define NESTED_SMOKE_WRITE_MAGIC  0x5eed5eed5eed5eed  /* what L2 writes into the hole */

/* kernel_call.c: the privilege helpers of guest.h at CPL0 or CPL3 */
#define KERNEL_CALL_WHERE    1  /* GUEST_SYNC(WHERE, cs, user mode) */
#define KERNEL_CALL_CR3      2  /* GUEST_SYNC(CR3, guest_read_cr3()) */
#define KERNEL_CALL_RESULT   3  /* GUEST_SYNC(RESULT, kernel_call's result, CS of the called function) */
#define KERNEL_CALL_FLUSHED  4  /* GUEST_SYNC(FLUSHED, value read through the remapped page) */
#define KERNEL_CALL_RAW_CR3  5  /* GUEST_SYNC(RAW_CR3, mov %cr3 without a kernel call) */
#define KERNEL_CALL_TEST_MAGIC    0x600dca11  /* the called function returns arg ^ MAGIC; written through the remap */

/* unsync.c: edits its own last-level page tables under shadow paging */
#define UNSYNC_READY        1  /* leaf PTEs looked up (CR3 read: a kernel call at CPL3) */
#define UNSYNC_SHADOWED     2  /* every page table read: KVM shadows them all */
#define UNSYNC_EDITED       3  /* PTEs swapped in the first nr_unsync tables, no flush */
#define UNSYNC_INVLPG       4  /* both edited pages of each table flushed with INVLPG */
#define UNSYNC_CR3          5  /* CR3 reloaded: a full flush */
#define UNSYNC_SWAPPED_BACK 6  /* the edited PTEs swapped back, no flush */
#define UNSYNC_RESTORED     7  /* CR3 reloaded again */

/* nested.h: which extension L1 uses (the global nested_vendor, set by the host) */
#define NESTED_VENDOR_SVM  1  /* AMD SVM with NPT */
#define NESTED_VENDOR_VMX  2  /* Intel VMX with EPT */

/* nested_unsync.c: L1 edits leaf entries of NPT/EPT tables that KVM shadows */
#define NESTED_UNSYNC_TABLES    4  /* last-level tables, each mapping one 2M range of L2 GPAs */
#define NESTED_UNSYNC_PAGES     8  /* pages mapped (and read by L2) in each table */
#define NESTED_UNSYNC_L2_GPA    0x40000000  /* L2 GPA (= L2 GVA) of table 0's range */
#define NESTED_UNSYNC_SHADOWED  1  /* L2 read every page: KVM shadows each table */
#define NESTED_UNSYNC_EDITED    2  /* L1 swapped the frames of entries 1 and 2 of each table, no flush */
#define NESTED_UNSYNC_NOFLUSH   3  /* (new, old): what L2 saw in the edited pages, entered without a flush */
#define NESTED_UNSYNC_FLUSHED   4  /* L1 flushed: SVM INVLPGA (TLB_CONTROL at the next VMRUN), VMX INVEPT */
#define NESTED_UNSYNC_REREAD    5  /* (new, old): what L2 saw in the edited pages after the flush */

/* nested_split_unsync.c: L1's last-level NPT/EPT tables inside a range L2 maps huge */
#define SPLIT_UNSYNC_START      1  /* L1 built its tables, L2 has not run yet */
#define SPLIT_UNSYNC_HUGE       2  /* L2 read the huge range: one huge nested SPTE */
#define SPLIT_UNSYNC_SHADOWED   3  /* L2 read every page behind the tables: KVM shadows them */
#define SPLIT_UNSYNC_EDITED     4  /* L1 swapped the frames of entries 0 and 1 of each table: unsync */
#define SPLIT_UNSYNC_WRITTEN    5  /* after L1's flush, L2 checked the swap and wrote its pages: (count) */
#define SPLIT_UNSYNC_FRAME_SEED 0x5eed0000  /* a frame's stamp: seed | table << 12 | entry */

/* nested_kvm_writes.c: what KVM writes into L1's nested state, in a memslot of its own */
#define KVM_WRITES_SETUP    1  /* (VMCB12/VMCS12, PDPT, PD, PT of the test pages, EPT/NPT A/D in use) */
#define KVM_WRITES_READY    2  /* L1 about to VMRUN/VMRESUME, nothing of the state slot written since */
#define KVM_WRITES_EXITED   3  /* L2 exited (exit code); L1 has only read since the entry */
#define KVM_WRITES_CLEARED  4  /* VMX: L1 did VMCLEAR + VMPTRLD of its VMCS */
#define KVM_WRITES_PAGES    32  /* pages of the state slot: VMCB/VMCS pages, NPT/EPT pool, data */
#define KVM_WRITES_POOL     8  /* first page of the NPT/EPT pool in the slot */
#define KVM_WRITES_READ     24  /* the page L2 reads, then ... */
#define KVM_WRITES_WRITE    25  /* ... the page L2 writes, through entries with A/D clear */
#define KVM_WRITES_L2_GPA   0x80000000  /* L2 GPA (= L2 GVA) of the test pages: a PDPT entry of their own */

/* nested_memslot.c: L1's last-level NPT/EPT table for L2's data in a memslot the host replaces */
#define NESTED_MEMSLOT_START  1  /* GUEST_SYNC(START): L1 built its tables, L2 has not run yet */
#define NESTED_MEMSLOT_PASS   2  /* GUEST_SYNC(PASS, pass, pages written): L2 stamped every data page */

/* exit_loop.c: exits forever (the KVM_RUN round-trip benchmark) */
#define EXIT_LOOP_PORT  0xe0  /* the port of its OUTs at CPL0 */

/* memstress.c: the `kvmpy perf dirty-log` guest, one pass over its pages per host iteration */
#define MEMSTRESS_PASS_DONE  1  /* GUEST_SYNC(PASS_DONE, pass): a pass over the vCPU's pages is done */

#endif
