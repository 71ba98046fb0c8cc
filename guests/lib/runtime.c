// SPDX-License-Identifier: GPL-2.0-only
/* The kvmpy guest runtime: start-up, ucalls, exceptions, pte helpers, libc. */
#include "guest.h"

void guest_start(uint32_t vcpu_id, uint64_t arg) __attribute__((noreturn));
void exception_dispatch(struct ex_regs *regs);

void guest_start(uint32_t vcpu_id, uint64_t arg)
{
	guest_main(vcpu_id, arg);
	__guest_done();
}

/* ---- ucalls ------------------------------------------------------------ */

/* Set by the host for the MMIO transport (user mode): the unbacked GPA (== GVA) to store to. */
uint64_t ucall_mmio_gpa;

void ucall_send(struct ucall *uc)
{
	uint64_t mmio = READ_ONCE(ucall_mmio_gpa);

	/* Everything else must be visible before the host sees the magic. */
	__atomic_store_n(&uc->magic, UCALL_MAGIC, __ATOMIC_RELEASE);
	if (mmio)
		WRITE_ONCE(*(volatile uint64_t *)mmio, (uint64_t)(uintptr_t)uc);
	else
		outl(UCALL_PORT, (uint32_t)(uintptr_t)uc);
}

/* Hand over a final ucall (the host never resumes after it) and stop here for good. */
static void __attribute__((noreturn)) ucall_final(struct ucall *uc)
{
	for (;;) {
		ucall_send(uc);
		if (!guest_user_mode())
			halt();
	}
}

static void ucall_init(struct ucall *uc, uint32_t cmd)
{
	memset(uc, 0, sizeof(*uc));
	uc->cmd = cmd;
}

void __guest_sync(uint32_t n, const uint64_t *vals)
{
	struct ucall uc;

	ucall_init(&uc, UCALL_SYNC);
	if (n > UCALL_MAX_ARGS)
		n = UCALL_MAX_ARGS;
	uc.nargs = n;
	for (uint32_t i = 0; i < n; i++)
		uc.args[i] = vals[i];
	ucall_send(&uc);
}

void __guest_done(void)
{
	struct ucall uc;

	ucall_init(&uc, UCALL_DONE);
	ucall_final(&uc);
}

/* Append a NUL-terminated string to uc->buf, truncating to what fits. */
static void buf_append(struct ucall *uc, const char *s, bool nul)
{
	size_t room = UCALL_BUF_SIZE - uc->len;
	size_t n = s ? strnlen(s, room) : 0;

	memcpy(uc->buf + uc->len, s, n);
	uc->len += n;
	if (n == room)
		uc->flags |= UCALL_F_TRUNCATED;
	if (nul && uc->len < UCALL_BUF_SIZE)
		uc->buf[uc->len++] = '\0';
}

void __guest_assert_fail(const char *file, uint32_t line, const char *expr,
			 uint32_t op, uint64_t a, uint64_t b, const char *fmt, ...)
{
	struct ucall uc;

	ucall_init(&uc, UCALL_ASSERT);
	uc.line = line;
	uc.flags = op;
	if (op) {
		uc.nargs = 2;
		uc.args[0] = a;
		uc.args[1] = b;
	}
	buf_append(&uc, file, true);
	buf_append(&uc, expr, true);
	if (fmt && uc.len < UCALL_BUF_SIZE) {
		va_list ap;
		int n;

		va_start(ap, fmt);
		n = guest_vsnprintf(uc.buf + uc.len, UCALL_BUF_SIZE - uc.len, fmt, ap);
		va_end(ap);
		if ((size_t)n >= UCALL_BUF_SIZE - uc.len) {
			uc.flags |= UCALL_F_TRUNCATED;
			n = UCALL_BUF_SIZE - uc.len - 1;
		}
		uc.len += n;
	}
	ucall_final(&uc);
}

void guest_printf(const char *fmt, ...)
{
	struct ucall uc;
	va_list ap;
	int n;

	ucall_init(&uc, UCALL_PRINTF);
	va_start(ap, fmt);
	n = guest_vsnprintf(uc.buf, UCALL_BUF_SIZE, fmt, ap);
	va_end(ap);
	if (n >= UCALL_BUF_SIZE) {
		uc.flags |= UCALL_F_TRUNCATED;
		n = UCALL_BUF_SIZE - 1;
	}
	uc.len = n;
	ucall_send(&uc);
}

/* ---- kernel calls: privileged steps of a user-mode guest ---------------- */

#define KERNEL_CALL_RAX 0x6b63616c6c4b564dul	/* in rax at a kernel call's ud2 */
#define UD2_BYTES 0x0b0f

/* Is this #UD the ud2 of kernel_call() at CPL3? Then run its function and return past it. */
static bool kernel_call_trap(struct ex_regs *regs)
{
	if (regs->vector != UD_VECTOR || (regs->cs & 3) != 3 || regs->rax != KERNEL_CALL_RAX ||
	    *(const uint16_t *)regs->rip != UD2_BYTES)
		return false;
	regs->rax = ((kernel_fn_t)regs->rdi)(regs->rsi);
	regs->rip += 2;
	return true;
}

uint64_t kernel_call(kernel_fn_t fn, uint64_t arg)
{
	uint64_t rax = KERNEL_CALL_RAX;

	if (!guest_user_mode())
		return fn(arg);
	/* The #UD handler (CPL0, on the TSS's RSP0 stack) puts fn(arg) in rax. */
	__asm__ volatile("ud2" : "+a"(rax) : "D"(fn), "S"(arg) : "memory");
	return rax;
}

static uint64_t k_read_cr3(uint64_t unused) { return read_cr3(); }
static uint64_t k_write_cr3(uint64_t cr3) { write_cr3(cr3); return 0; }
static uint64_t k_invlpg(uint64_t gva) { invlpg(gva); return 0; }

uint64_t guest_read_cr3(void) { return kernel_call(k_read_cr3, 0); }
void guest_write_cr3(uint64_t cr3) { kernel_call(k_write_cr3, cr3); }
void guest_invlpg(uint64_t gva) { kernel_call(k_invlpg, gva); }

/* ---- exceptions -------------------------------------------------------- */

static exception_handler_t handlers[32];

void guest_install_handler(unsigned int vector, exception_handler_t handler)
{
	GUEST_ASSERT(vector < 32);
	__atomic_store_n(&handlers[vector], handler, __ATOMIC_RELEASE);
}

void exception_dispatch(struct ex_regs *regs)
{
	exception_handler_t h = NULL;
	struct ucall uc;

	if (kernel_call_trap(regs))
		return;
	if (regs->vector < 32)
		h = __atomic_load_n(&handlers[regs->vector], __ATOMIC_ACQUIRE);
	if (h) {
		h(regs);
		return;
	}
	ucall_init(&uc, UCALL_EXCEPTION);
	uc.nargs = 6;
	uc.args[0] = regs->vector;
	uc.args[1] = regs->error_code;
	uc.args[2] = regs->rip;
	uc.args[3] = read_cr2();
	uc.args[4] = regs->rsp;
	uc.args[5] = regs->cs;
	ucall_final(&uc);
}

/* ---- page tables ------------------------------------------------------- */

uint64_t *pt_walk(uint64_t *root, uint64_t addr, uint64_t present, int *level)
{
	uint64_t *table = root;

	for (int lvl = 4; lvl >= 1; lvl--) {
		uint64_t *e = &table[pt_index(addr, lvl)];

		if (!(*e & present))
			return NULL;
		if (lvl == 1 || (lvl <= 3 && (*e & PTE_HUGE))) {
			if (level)
				*level = lvl;
			return e;
		}
		table = (uint64_t *)(*e & PTE_ADDR_MASK);
	}
	return NULL;
}

uint64_t *guest_pte(uint64_t gva, int *level)
{
	return pt_walk((uint64_t *)(guest_read_cr3() & PTE_ADDR_MASK), gva, PTE_PRESENT, level);
}

void guest_pte_update(uint64_t gva, uint64_t set, uint64_t clear)
{
	uint64_t *e = guest_pte(gva, NULL);

	GUEST_ASSERT_MSG(e, "no mapping for gva %lx", gva);
	*e = (*e & ~clear) | set;
	guest_invlpg(gva);
}

/* ---- small libc -------------------------------------------------------- */

/* gcc may emit calls to these for struct copies even when freestanding. */
void *memset(void *s, int c, size_t n)
{
	unsigned char *p = s;

	while (n--)
		*p++ = (unsigned char)c;
	return s;
}

void *memcpy(void *d, const void *s, size_t n)
{
	unsigned char *dp = d;
	const unsigned char *sp = s;

	while (n--)
		*dp++ = *sp++;
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strnlen(const char *s, size_t max)
{
	size_t n = 0;

	while (n < max && s[n])
		n++;
	return n;
}

struct out { char *buf; size_t size, pos; };

static void put(struct out *o, char c)
{
	if (o->pos + 1 < o->size)
		o->buf[o->pos] = c;
	o->pos++;
}

static void put_num(struct out *o, uint64_t v, unsigned int base, bool neg,
		    int width, char pad, bool upper)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	if (neg)
		width--;
	if (neg && pad == '0')
		put(o, '-');
	for (; width > n; width--)
		put(o, pad);
	if (neg && pad != '0')
		put(o, '-');
	while (n)
		put(o, tmp[--n]);
}

/*
 * A bounded vsnprintf: %d %i %u %x %X %p %s %c %%, the l/ll/z length
 * modifiers, a field width and the 0 flag.  Returns the length the full
 * output would have had, like C's.
 */
int guest_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct out o = { buf, size, 0 };

	for (; *fmt; fmt++) {
		char pad = ' ';
		int width = 0, lng = 0;

		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		fmt++;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case 'd':
		case 'i': {
			int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);

			put_num(&o, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0, width, pad, false);
			break;
		}
		case 'u':
			put_num(&o, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned int), 10, false, width, pad, false);
			break;
		case 'x':
		case 'X':
			put_num(&o, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned int), 16, false, width, pad, *fmt == 'X');
			break;
		case 'p':
			put(&o, '0');
			put(&o, 'x');
			put_num(&o, (uintptr_t)va_arg(ap, void *), 16, false, width, pad, false);
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);

			if (!s)
				s = "(null)";
			while (*s)
				put(&o, *s++);
			break;
		}
		case 'c':
			put(&o, (char)va_arg(ap, int));
			break;
		case '%':
			put(&o, '%');
			break;
		case '\0':
			fmt--;
			break;
		default:
			put(&o, '%');
			put(&o, *fmt);
		}
	}
	if (size)
		o.buf[o.pos < size ? o.pos : size - 1] = '\0';
	return (int)o.pos;
}

int guest_snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = guest_vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
