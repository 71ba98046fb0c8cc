"""cffi API-mode builder for the KVM ioctl ABI.

Struct layouts and ioctl numbers come from the C compiler reading <linux/kvm.h>:
cffi checks every declared field's offset and size against the header when the
extension is compiled, so a mismatch is a build error, not a silent bug.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from cffi import FFI

ffibuilder = FFI()

# Constants newer than the oldest uapi headers we support (Debian 12 ships 6.1)
# get #ifndef fallbacks carrying their ABI values from upstream <linux/kvm.h>.
FALLBACKS = {
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": 225,
    "KVM_CAP_USER_MEMORY2": 231,
    "KVM_CAP_MEMORY_ATTRIBUTES": 233,
    "KVM_CAP_GUEST_MEMFD": 234,
    "KVM_CAP_VM_TYPES": 235,
    "KVM_CAP_PRE_FAULT_MEMORY": 236,
    "KVM_EXIT_MEMORY_FAULT": 39,
    "KVM_SYSTEM_EVENT_SEV_TERM": 6,
    "KVM_SYSTEM_EVENT_WAKEUP": 4,
    "KVM_SYSTEM_EVENT_SUSPEND": 5,
    "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON": 5,
    "KVM_X86_DEFAULT_VM": 0,
    "KVM_X86_QUIRK_SLOT_ZAP_ALL": 1 << 7,       # uapi asm/kvm.h since v6.12
}

# Integer constants exported to Python (all verified by the compiler).
CONSTANTS = """
KVM_API_VERSION
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST KVM_GET_MSR_FEATURE_INDEX_LIST KVM_GET_MSRS KVM_SET_MSRS
KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_VCPU
KVM_GET_DIRTY_LOG KVM_CLEAR_DIRTY_LOG KVM_RESET_DIRTY_RINGS KVM_ENABLE_CAP KVM_GET_STATS_FD
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_GET_XSAVE KVM_SET_XSAVE KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_CREATE_IRQCHIP
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG KVM_EXIT_HLT
KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR
KVM_EXIT_SET_TPR KVM_EXIT_TPR_ACCESS KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT
KVM_EXIT_X86_RDMSR KVM_EXIT_X86_WRMSR KVM_EXIT_DIRTY_RING_FULL KVM_EXIT_MEMORY_FAULT
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX KVM_INTERNAL_ERROR_DELIVERY_EV
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_SYSTEM_EVENT_WAKEUP KVM_SYSTEM_EVENT_SUSPEND KVM_SYSTEM_EVENT_SEV_TERM
KVM_CAP_IRQCHIP KVM_CAP_HLT KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR KVM_CAP_EXT_CPUID
KVM_CAP_NR_VCPUS KVM_CAP_NR_MEMSLOTS KVM_CAP_MAX_VCPUS KVM_CAP_MAX_VCPU_ID
KVM_CAP_SET_IDENTITY_MAP_ADDR KVM_CAP_XSAVE KVM_CAP_XSAVE2 KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_READONLY_MEM KVM_CAP_GET_MSR_FEATURES KVM_CAP_NESTED_STATE
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 KVM_CAP_DIRTY_LOG_RING KVM_CAP_DIRTY_LOG_RING_ACQ_REL
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP KVM_CAP_BINARY_STATS_FD KVM_CAP_X86_DISABLE_EXITS
KVM_CAP_USER_MEMORY2 KVM_CAP_MEMORY_ATTRIBUTES KVM_CAP_GUEST_MEMFD KVM_CAP_VM_TYPES
KVM_CAP_PRE_FAULT_MEMORY KVM_CAP_SYNC_MMU KVM_CAP_MULTI_ADDRESS_SPACE KVM_CAP_DISABLE_QUIRKS2
KVM_X86_QUIRK_SLOT_ZAP_ALL
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE KVM_DIRTY_LOG_INITIALLY_SET
KVM_DIRTY_LOG_PAGE_OFFSET KVM_DIRTY_GFN_F_DIRTY KVM_DIRTY_GFN_F_RESET
KVM_STATS_TYPE_SHIFT KVM_STATS_TYPE_MASK KVM_STATS_TYPE_CUMULATIVE KVM_STATS_TYPE_INSTANT
KVM_STATS_TYPE_PEAK KVM_STATS_TYPE_LINEAR_HIST KVM_STATS_TYPE_LOG_HIST KVM_STATS_TYPE_MAX
KVM_STATS_UNIT_SHIFT KVM_STATS_UNIT_MASK KVM_STATS_UNIT_NONE KVM_STATS_UNIT_BYTES
KVM_STATS_UNIT_SECONDS KVM_STATS_UNIT_CYCLES KVM_STATS_UNIT_BOOLEAN KVM_STATS_UNIT_MAX
KVM_STATS_BASE_SHIFT KVM_STATS_BASE_MASK KVM_STATS_BASE_POW10 KVM_STATS_BASE_POW2 KVM_STATS_BASE_MAX
KVM_X86_DEFAULT_VM
"""

# libc constants used for guest memory mappings.
LIBC_CONSTANTS = """
PROT_READ PROT_WRITE PROT_NONE MAP_PRIVATE MAP_SHARED MAP_ANONYMOUS MAP_NORESERVE MAP_FIXED
MAP_POPULATE MADV_HUGEPAGE MADV_NOHUGEPAGE MADV_DONTNEED MADV_POPULATE_WRITE
"""

CONSTANT_NAMES = CONSTANTS.split() + LIBC_CONSTANTS.split()

CDEF = """
typedef unsigned char __u8; typedef unsigned short __u16; typedef unsigned int __u32;
typedef unsigned long long __u64; typedef short __s16; typedef int __s32;

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx; __u64 rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11; __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector;
    __u8 type; __u8 present, dpl, db, s, l, g, avl; __u8 unusable; __u8 padding;
};
struct kvm_dtable { __u64 base; __u16 limit; __u16 padding[3]; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss; struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8; __u64 efer; __u64 apic_base;
    __u64 interrupt_bitmap[4];
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u8 pad1; __u16 last_opcode;
    __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr; __u32 pad2;
};
struct kvm_xsave { __u32 region[1024]; ...; };
struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };
struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags;
    __u32 eax; __u32 ebx; __u32 ecx; __u32 edx; __u32 padding[3];
};
struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr;
};
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; __u8 pad[64]; };
struct kvm_dirty_log { __u32 slot; __u32 padding1; union { void *dirty_bitmap; __u64 padding2; }; };
struct kvm_clear_dirty_log {
    __u32 slot; __u32 num_pages; __u64 first_page;
    union { void *dirty_bitmap; __u64 padding2; };
};
struct kvm_dirty_gfn { __u32 flags; __u32 slot; __u64 offset; };
struct kvm_stats_header {
    __u32 flags; __u32 name_size; __u32 num_desc; __u32 id_offset; __u32 desc_offset; __u32 data_offset;
};
struct kvm_stats_desc {
    __u32 flags; __s16 exponent; __u16 size; __u32 offset; __u32 bucket_size; char name[];
};
struct kvm_run {
    __u8 request_interrupt_window; __u8 immediate_exit; __u8 padding1[6];
    __u32 exit_reason; __u8 ready_for_interrupt_injection; __u8 if_flag; __u16 flags;
    __u64 cr8; __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        char padding[256];
    };
    __u64 kvm_valid_regs; __u64 kvm_dirty_regs;
    ...;
};

int kvmpy_ioctl_ptr(int fd, unsigned long request, void *arg);
int kvmpy_ioctl_int(int fd, unsigned long request, unsigned long arg);
int kvmpy_vcpu_run(int fd);
int kvmpy_install_kick_handler(int signo);
void *kvmpy_mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int kvmpy_munmap(void *addr, size_t length);
int kvmpy_madvise(void *addr, size_t length, int advice);
size_t kvmpy_kvm_run_size(void);
"""

# The bulk helpers in _bulk.c (see its comments).
CDEF += """
int kvmpy_vcpu_run_reason(int fd, const struct kvm_run *run);
struct kvmpy_vcpu_state { int fd; int running; int closing; unsigned long tid; struct kvm_run *run; };
int kvmpy_vcpu_run_state(struct kvmpy_vcpu_state *s);
unsigned long kvmpy_vcpu_runner(struct kvmpy_vcpu_state *s);
unsigned long kvmpy_vcpu_stop_runs(struct kvmpy_vcpu_state *s);
unsigned long kvmpy_vcpu_kick(struct kvmpy_vcpu_state *s);
#define KVMPY_RUN_BUSY ...
#define KVMPY_RUN_CLOSED ...
int kvmpy_get_dirty_log(int fd, uint32_t slot, void *bitmap);
unsigned long kvmpy_popcount(const uint64_t *words, size_t n);
size_t kvmpy_set_bits(const uint64_t *words, size_t n, uint64_t *out, size_t out_len);
uint32_t kvmpy_ring_harvest(struct kvm_dirty_gfn *gfns, uint32_t mask, uint32_t fetch, uint32_t limit,
                            uint32_t *slots, uint64_t *offsets);
int kvmpy_stats_check_header(const char *buf, size_t len);
int64_t kvmpy_stats_locate(const char *buf, size_t len, const char *name);
uint64_t kvmpy_stats_read_u64(int fd, int64_t pos);
#define KVMPY_STATS_NOT_FOUND ...
#define KVMPY_STATS_BAD_HEADER ...
#define KVMPY_STATS_BAD_DESC ...
struct kvmpy_pt_pool { uint64_t gpa, size, hva; };
struct kvmpy_pt_req {
    uint64_t cr3, gva, gpa, npages, page_size, leaf_bits, table_bits;
    uint32_t npools, pool;
    uint64_t next;
    uint64_t allocated;
    uint64_t done;
    uint64_t fail_gva;
};
int kvmpy_pt_map(struct kvmpy_pt_req *req, const struct kvmpy_pt_pool *pools);
#define KVMPY_PT_OK ...
#define KVMPY_PT_EXHAUSTED ...
#define KVMPY_PT_IN_HUGE ...
#define KVMPY_PT_OVER_TABLE ...
#define KVMPY_PT_FOREIGN ...
"""

CDEF += "".join(f"#define {name} ...\n" for name in CONSTANT_NAMES)

SOURCE = """
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/kvm.h>
""" + "".join(
    f"#ifndef {name}\n#define {name} {value}\n#endif\n" for name, value in FALLBACKS.items()
) + """
/* An ioctl a caught signal interrupted is issued again, as Python does for its own system
   calls (PEP 475): KVM_CREATE_VM, for one, fails with EINTR when a signal with a handler
   arrives during it. Not KVM_RUN: its EINTR is a result (a kick, or a signal to act on). */
static int kvmpy_ioctl(int fd, unsigned long request, unsigned long arg)
{
    int r;

    do
        r = ioctl(fd, request, arg);
    while (r < 0 && errno == EINTR && request != KVM_RUN);
    return r;
}
int kvmpy_ioctl_ptr(int fd, unsigned long request, void *arg) { return kvmpy_ioctl(fd, request, (unsigned long)arg); }
int kvmpy_ioctl_int(int fd, unsigned long request, unsigned long arg) { return kvmpy_ioctl(fd, request, arg); }
/* KVM_RUN gets its own entry point so the GIL is released for the whole guest run. */
int kvmpy_vcpu_run(int fd) { return ioctl(fd, KVM_RUN, 0); }

/* The kick signal only has to interrupt KVM_RUN: no SA_RESTART, and a handler
   that does nothing (Python's own handlers run only on the main thread). */
static void kvmpy_kick_handler(int signo) { (void)signo; }
int kvmpy_install_kick_handler(int signo) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kvmpy_kick_handler;
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL);
}
void *kvmpy_mmap(void *addr, size_t length, int prot, int flags, int fd, long offset) {
    void *p = mmap(addr, length, prot, flags, fd, offset);
    return p == MAP_FAILED ? NULL : p;
}
int kvmpy_munmap(void *addr, size_t length) { return munmap(addr, length); }
int kvmpy_madvise(void *addr, size_t length, int advice) { return madvise(addr, length, advice); }
size_t kvmpy_kvm_run_size(void) { return sizeof(struct kvm_run); }
"""


SOURCE += (Path(__file__).resolve().parent / "_bulk.c").read_text()


def _check_toolchain() -> None:
    """Fail early with the Debian package to install, not a compiler traceback."""
    cc = os.environ.get("CC", "gcc").split()[0]
    if shutil.which(cc) is None and shutil.which("cc") is None:
        sys.exit("kvmpy: no C compiler found; install it with: apt-get install gcc")
    include_dirs = ["/usr/include", "/usr/local/include"]
    if not any(os.path.exists(os.path.join(d, "linux", "kvm.h")) for d in include_dirs):
        sys.exit("kvmpy: <linux/kvm.h> not found; install it with: apt-get install linux-libc-dev")


_check_toolchain()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmpy._kvm_abi", SOURCE, extra_compile_args=["-O2", "-std=gnu11"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
