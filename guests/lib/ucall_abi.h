/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The ucall ABI between a kvmpy guest and the host.  This header is the
 * single source of truth; kvmpy/guest/ucall.py mirrors it (and a unit test
 * checks that the two agree).
 *
 * Protocol
 * --------
 * 1. The guest fills a `struct ucall` in memory that is identity mapped
 *    (GVA == GPA) and lies below 4 GiB: its stack or its .data/.bss.
 * 2. It sets `magic` last and hands the struct's GPA over: a 32-bit OUT to
 *    port UCALL_PORT (`outl %eax, %dx`), or -- when the host set the runtime's
 *    `ucall_mmio_gpa`, as it does for a user-mode (CPL3) guest, where OUT
 *    faults -- an 8-byte store to that address, which no memslot backs.
 *    Either exits to the host (KVM_EXIT_IO / KVM_EXIT_MMIO).
 * 3. The host reads UCALL_SIZE bytes at that GPA.  A GPA whose struct is not
 *    wholly inside one memslot, a wrong magic, an unknown command, or a
 *    `len`/`nargs` above its bound is rejected (BadUcallError); the host
 *    never reads outside guest memory.
 * 4. For UCALL_SYNC and UCALL_PRINTF the host resumes the vCPU; the other
 *    commands end the run (DONE) or fail it (ASSERT, EXCEPTION).
 *
 * Layout (little endian, no padding):
 *   off  size  field
 *     0     4  magic   UCALL_MAGIC
 *     4     4  cmd     enum ucall_cmd
 *     8     4  line    UCALL_ASSERT: source line
 *    12     4  len     bytes of buf in use (<= UCALL_BUF_SIZE)
 *    16     4  nargs   entries of args in use (<= UCALL_MAX_ARGS)
 *    20     4  flags   UCALL_F_*
 *    24    48  args    u64[UCALL_MAX_ARGS]
 *    72   512  buf     text, see below
 *
 * Per command:
 *   SYNC       args[0] = stage, args[1..nargs-1] = extra values
 *   DONE       -
 *   ASSERT     buf = "file\0expression\0message"; nargs = 0, or 2 with the
 *              two compared values in args[0], args[1] and the operator in
 *              flags (UCALL_F_EQ / UCALL_F_NE)
 *   PRINTF     buf = formatted text (not NUL terminated, len bytes);
 *              UCALL_F_TRUNCATED if the text did not fit
 *   EXCEPTION  args = { vector, error_code, rip, cr2, rsp, cs }, nargs = 6
 */
#ifndef KVMPY_UCALL_ABI_H
#define KVMPY_UCALL_ABI_H

#include <stdint.h>

#define UCALL_PORT        0x1000
#define UCALL_MAGIC       0x4b564d55u /* "UMVK" in memory: 'U','M','V','K' */
#define UCALL_MAX_ARGS    6
#define UCALL_BUF_SIZE    512
#define UCALL_SIZE        584

enum ucall_cmd {
	UCALL_SYNC      = 1,
	UCALL_DONE      = 2,
	UCALL_ASSERT    = 3,
	UCALL_PRINTF    = 4,
	UCALL_EXCEPTION = 5,
};

#define UCALL_F_EQ        (1u << 0)
#define UCALL_F_NE        (1u << 1)
#define UCALL_F_TRUNCATED (1u << 2)

struct ucall {
	uint32_t magic;
	uint32_t cmd;
	uint32_t line;
	uint32_t len;
	uint32_t nargs;
	uint32_t flags;
	uint64_t args[UCALL_MAX_ARGS];
	char buf[UCALL_BUF_SIZE];
};

_Static_assert(sizeof(struct ucall) == UCALL_SIZE, "ucall ABI size");

#endif
