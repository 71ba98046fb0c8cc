/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Guest entry and exception stubs.
 *
 * The host starts each vCPU at _start in 64-bit mode with
 *   rsp = top of that vCPU's stack (16-byte aligned)
 *   rdi = vCPU id, rsi = entry argument
 * and builds the IDT from exc_stub_table (32 gate addresses).
 */
	.section .text.entry, "ax"
	.globl _start
_start:
	xor %ebp, %ebp
	call guest_start
1:	hlt
	jmp 1b

/* Vectors for which the CPU pushes an error code. */
#define HAS_ERRCODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)

	.text
	.altmacro
.macro EXC_STUB vec
	.align 16
exc_stub_\vec:
	.if !HAS_ERRCODE(\vec)
	pushq $0
	.endif
	pushq $\vec
	jmp exc_common
.endm

.set vec, 0
.rept 32
	EXC_STUB %vec
	.set vec, vec + 1
.endr

/* Frame: GPRs (struct ex_regs order), vector, error code, CPU frame. */
exc_common:
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rbx
	pushq %rbp
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	mov %rsp, %rdi
	call exception_dispatch
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rbp
	popq %rbx
	popq %rdx
	popq %rcx
	popq %rax
	add $16, %rsp
	iretq

.macro STUB_ADDR vec
	.quad exc_stub_\vec
.endm

	.section .rodata
	.align 8
	.globl exc_stub_table
exc_stub_table:
.set vec, 0
.rept 32
	STUB_ADDR %vec
	.set vec, vec + 1
.endr
	.size exc_stub_table, . - exc_stub_table

	.section .note.GNU-stack, "", @progbits
