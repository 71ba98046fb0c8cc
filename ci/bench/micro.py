#!/usr/bin/env python3
"""The kvmpy side of the side-by-side benchmark: each row of peer.c done with kvmpy.

usage: micro.py ROW SAMPLES|serve BATCH   (run with the interpreter kvmpy is installed in)
Prints one line per sample: nanoseconds per operation, as peer.c does ("serve": one
sample per line read from stdin, until EOF). The set-up of each row mirrors peer.c's;
only what peer.c times is timed.
"""
from __future__ import annotations

import sys
import time

from kvmpy.abi import ioctl_int, lib
from kvmpy.bitmap import DirtyBitmap
from kvmpy.guest.vm import GuestVm
from kvmpy.kvm import Kvm
from kvmpy.memory import PAGE_4K
from kvmpy.stats import Stats
from kvmpy.x86.paging import PageTableBuilder

TEST_GPA = 4 << 30
SLOT_PAGES_1G = 262144
BITMAP_SET = 26000
RING_ENTRIES = 65536
PT_PAGES = 70000
SLOT_64M = 64 << 20
PT_POOL_GPA, PT_POOL_SIZE = 0x10000, 1 << 20     # as a GuestVm's, in a 2 MiB slot 0

now = time.perf_counter_ns
SERVE = False
COUNT = 0


def samples():
    """One iteration per sample to take: per line on stdin (serve), or COUNT of them."""
    if SERVE:
        while sys.stdin.readline():
            yield
    else:
        yield from range(COUNT)


def report(t0: int, batch: int) -> None:
    print(f"{(now() - t0) / batch:.1f}", flush=True)


def row_exit(batch: int) -> None:
    with GuestVm("exit_loop") as g:
        run = g.vcpus[0].run
        for _ in samples():
            t0 = now()
            for _ in range(batch):
                ex = run()
                if ex.reason != lib.KVM_EXIT_IO:
                    raise SystemExit(f"unexpected exit {ex}")
            report(t0, batch)


def row_vm_cycle(batch: int) -> None:
    for _ in samples():
        t0 = now()
        for _ in range(batch):
            # As vm_create_barebones(): /dev/kvm opened for each VM.
            with Kvm() as kvm, kvm.create_vm() as vm:
                vm.add_memory(1, TEST_GPA, SLOT_64M)
                vm.create_vcpu(0)
        report(t0, batch)


def row_get_dirty_log(batch: int) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(1, TEST_GPA, SLOT_PAGES_1G * PAGE_4K, flags=lib.KVM_MEM_LOG_DIRTY_PAGES)
        bm = DirtyBitmap(SLOT_PAGES_1G)
        get = vm.get_dirty_log
        for _ in samples():
            t0 = now()
            for _ in range(batch):
                get(1, bm)
            report(t0, batch)


def bench_bitmap() -> DirtyBitmap:
    """peer.c's bitmap: BITMAP_SET bits from xorshift64 with seed 1."""
    bm, x, mask = DirtyBitmap(SLOT_PAGES_1G), 1, (1 << 64) - 1
    n = 0
    while n < BITMAP_SET:
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        bit = x % SLOT_PAGES_1G
        if bit not in bm:
            bm.set(bit)
            n += 1
    return bm


def row_bitmap_pages(batch: int) -> None:
    bm = bench_bitmap()
    for _ in samples():
        t0 = now()
        for _ in range(batch):
            pages = bm.pages_array()
        report(t0, batch)
    assert len(pages) == BITMAP_SET


def row_ring_harvest(batch: int) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.enable_dirty_ring(RING_ENTRIES * 16)
        ring = vm.create_vcpu(0).dirty_ring
        full = b"".join(lib.KVM_DIRTY_GFN_F_DIRTY.to_bytes(4, "little") + (1).to_bytes(4, "little")
                        + i.to_bytes(8, "little") for i in range(RING_ENTRIES))
        for _ in samples():
            total = 0
            for _ in range(batch):
                ring.mapping.write(0, full)        # the host fills the ring, as peer.c does
                start = now()
                got = ring.harvest_arrays()
                vm.reset_dirty_rings()
                total += now() - start
                assert len(got) == RING_ENTRIES
            print(f"{total / batch:.1f}", flush=True)


def row_stats_open(batch: int) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        owners = ((vm.fd, vm.name, "remote_tlb_flush"), (vcpu.fd, vcpu.name, "exits"))
        for _ in samples():
            t0 = now()
            for _ in range(batch):
                for fd, name, stat in owners:
                    with Stats(ioctl_int(fd, "KVM_GET_STATS_FD", 0, name), name) as st:
                        st.read(stat)
            report(t0, batch)


def row_stats_read(batch: int) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        read = vm.stats.read
        read("pages_4k")
        for _ in samples():
            t0 = now()
            for _ in range(batch):
                read("pages_4k")
            report(t0, batch)


def row_stats_reread(batch: int) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        stats = vm.create_vcpu(0).stats
        snap = stats.snapshot
        snap()
        for _ in samples():
            t0 = now()
            for _ in range(batch):
                snap()
            report(t0, batch)


def row_page_tables(batch: int) -> None:
    with Kvm() as kvm:
        for _ in samples():
            total = 0
            for _ in range(batch):
                with kvm.create_vm() as vm:
                    vm.add_memory(0, 0, 2 << 20)
                    vm.add_memory(1, TEST_GPA, PT_PAGES * PAGE_4K)
                    pt = PageTableBuilder(vm, PT_POOL_GPA, PT_POOL_SIZE)
                    start = now()
                    pt.map(TEST_GPA, TEST_GPA, PT_PAGES * PAGE_4K)
                    total += now() - start
            print(f"{total / batch:.1f}", flush=True)


def row_exit_bare(batch: int) -> None:
    """The floor of row_exit: KVM_RUN through the binding alone, no exit object."""
    with GuestVm("exit_loop") as g:
        v = g.vcpus[0]
        fd, rs, run = v.fd, v._kvm_run, lib.kvmpy_vcpu_run_reason     # the raw page: a floor, not API
        for _ in samples():
            t0 = now()
            for _ in range(batch):
                if run(fd, rs) != lib.KVM_EXIT_IO:
                    raise SystemExit("unexpected exit")
            report(t0, batch)


ROWS = {name[4:]: fn for name, fn in globals().items() if name.startswith("row_")}

if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ROWS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(ROWS)}}} SAMPLES|serve BATCH")
    SERVE = sys.argv[2] == "serve"
    COUNT = 0 if SERVE else int(sys.argv[2])
    ROWS[sys.argv[1]](int(sys.argv[3]))
