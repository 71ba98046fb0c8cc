/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The kvmpy guest runtime API.  A guest program includes this header and
 * defines
 *
 *     void guest_main(uint32_t vcpu_id, uint64_t arg);
 *
 * which every vCPU enters on its own stack, in 64-bit mode, at CPL0 with
 * interrupts disabled, or at CPL3 in user mode (see kernel_call below).
 * Returning from guest_main is GUEST_DONE().  Memory below the end
 * of the first memslot is identity mapped (GVA == GPA) except page 0 and the
 * stack guard pages; the page tables themselves live in that identity map, so
 * the pte helpers below can edit them directly.
 */
#ifndef KVMPY_GUEST_H
#define KVMPY_GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#include "ucall_abi.h"
#include "stages.h"
#include "processor.h"

void guest_main(uint32_t vcpu_id, uint64_t arg);

/* ---- ucalls ------------------------------------------------------------ */

void ucall_send(struct ucall *uc);
void __guest_sync(uint32_t n, const uint64_t *vals);
void __guest_done(void) __attribute__((noreturn));
void __guest_assert_fail(const char *file, uint32_t line, const char *expr,
			 uint32_t op, uint64_t a, uint64_t b,
			 const char *fmt, ...) __attribute__((noreturn, format(printf, 7, 8)));
void guest_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* GUEST_SYNC(stage [, v1 ... v5]): report a stage and up to five values. */
#define GUEST_SYNC(...) ({						\
	const uint64_t __v[] = { __VA_ARGS__ };				\
	_Static_assert(sizeof(__v) <= UCALL_MAX_ARGS * 8,		\
		       "GUEST_SYNC takes a stage and at most 5 values"); \
	__guest_sync(sizeof(__v) / 8, __v);				\
})

#define GUEST_DONE() __guest_done()

#define GUEST_PRINTF(...) guest_printf(__VA_ARGS__)

#define GUEST_ASSERT(cond) do {						\
	if (!(cond))							\
		__guest_assert_fail(__FILE__, __LINE__, #cond, 0, 0, 0, NULL); \
} while (0)

#define GUEST_ASSERT_MSG(cond, ...) do {				\
	if (!(cond))							\
		__guest_assert_fail(__FILE__, __LINE__, #cond, 0, 0, 0, __VA_ARGS__); \
} while (0)

#define __GUEST_ASSERT_CMP(a, b, op, flag) do {				\
	uint64_t __a = (uint64_t)(a), __b = (uint64_t)(b);		\
	if (!(__a op __b))						\
		__guest_assert_fail(__FILE__, __LINE__, #a " " #op " " #b, \
				    flag, __a, __b, NULL);		\
} while (0)

#define GUEST_ASSERT_EQ(a, b) __GUEST_ASSERT_CMP(a, b, ==, UCALL_F_EQ)
#define GUEST_ASSERT_NE(a, b) __GUEST_ASSERT_CMP(a, b, !=, UCALL_F_NE)

/* ---- exceptions -------------------------------------------------------- */

/* Saved state on exception entry; the layout matches lib/entry.S. */
struct ex_regs {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rdi, rsi, rbp, rbx, rdx, rcx, rax;
	uint64_t vector, error_code;
	uint64_t rip, cs, rflags, rsp, ss;
};

typedef void (*exception_handler_t)(struct ex_regs *regs);

/*
 * Install a handler for an exception vector (0-31).  The handler may change
 * regs (e.g. advance rip); returning resumes the guest with iretq.  Vectors
 * without a handler are reported to the host as UCALL_EXCEPTION and the vCPU
 * stops.  NULL uninstalls.
 */
void guest_install_handler(unsigned int vector, exception_handler_t handler);

/* ---- privilege: user-mode guests and kernel calls ------------------------ */

/*
 * A guest runs guest_main at CPL0, or at CPL3 when the host built it in user
 * mode (GuestVm(user_mode=True)).  Code that must run at CPL0 (a privileged
 * step) goes through kernel_call(fn, arg): at CPL0 it is fn(arg); at CPL3 a ud2
 * traps to the runtime's #UD handler, which runs fn(arg) at CPL0 on the
 * kernel stack and returns to the instruction after the ud2.  The helpers
 * below work at either level.
 */
typedef uint64_t (*kernel_fn_t)(uint64_t arg);

static inline bool guest_user_mode(void) { return (read_cs() & 3) == 3; }

uint64_t kernel_call(kernel_fn_t fn, uint64_t arg);
uint64_t guest_read_cr3(void);
void guest_write_cr3(uint64_t cr3);
void guest_invlpg(uint64_t gva);

/* Writing CR3 flushes all non-global TLB entries (and makes KVM sync unsync shadow pages). */
static inline void guest_reload_cr3(void) { guest_write_cr3(guest_read_cr3()); }

/* ---- page tables ------------------------------------------------------- */

#define PAGE_SIZE_4K (1ul << 12)
#define PAGE_SIZE_2M (1ul << 21)
#define PAGE_SIZE_1G (1ul << 30)

#define PTE_PRESENT  (1ul << 0)
#define PTE_WRITABLE (1ul << 1)
#define PTE_USER     (1ul << 2)
#define PTE_ACCESSED (1ul << 5)
#define PTE_DIRTY    (1ul << 6)
#define PTE_HUGE     (1ul << 7)
#define PTE_GLOBAL   (1ul << 8)
#define PTE_NX       (1ul << 63)
#define PTE_ADDR_MASK 0x000ffffffffff000ul

/* Index of addr's entry in a table of `level` (1 = PT, 2 = PD, 3 = PDPT, 4 = PML4). */
static inline unsigned int pt_index(uint64_t addr, int level)
{
	return (addr >> (12 + 9 * (level - 1))) & 511;
}

/*
 * The one page-table walker: x86 page tables, NPT and EPT share the 4-level
 * shape, with bit 7 (PTE_HUGE) marking a 2M/1G leaf.  Walks the tables at root
 * (identity mapped) for addr; an entry is present when any bit of `present` is
 * set.  Returns the leaf entry and stores its level (1 = 4K, 2 = 2M, 3 = 1G) in
 * *level, or returns NULL at the first non-present entry.
 */
uint64_t *pt_walk(uint64_t *root, uint64_t addr, uint64_t present, int *level);

/* The leaf entry mapping gva in the current page tables (see pt_walk), or NULL. */
uint64_t *guest_pte(uint64_t gva, int *level);

/* Set and clear bits in gva's leaf entry, then invlpg gva.  Asserts it exists. */
void guest_pte_update(uint64_t gva, uint64_t set, uint64_t clear);

/* ---- small libc -------------------------------------------------------- */

void *memset(void *s, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strnlen(const char *s, size_t max);
int guest_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int guest_snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

#endif
