"""The guest runtime end to end on /dev/kvm: C guests in long mode, ucalls, failures."""
from __future__ import annotations

import re
import struct
import threading
import time
from pathlib import Path

import pytest

from kvmpy.guest import programs, stages
from kvmpy.guest.errors import GuestAssertError, GuestCrashError, GuestExceptionError, GuestTimeoutError
from kvmpy.guest.ucall import MMIO, BadUcallError
from kvmpy.guest.vm import STACK_BLOCK, STACKS_GPA, GuestVm
from kvmpy.hostinfo import loaded_vendor_module
from kvmpy.memory import PAGE_1G, PAGE_2M, PAGE_4K
from kvmpy.x86.descriptors import SEL_CODE64, SEL_USER_CODE64

# The runtime at either privilege level: CPL0, or user mode (CPL3) -- valid on any KVM.
LEVELS = pytest.mark.parametrize("user_mode", [False, True], ids=["cpl0", "cpl3"])

GUESTS = Path(programs.__file__).resolve().parents[2] / "guests"


def guest_line(program: str, text: str) -> int:
    """Line number of ``text`` in guests/<program>.c (so tests don't hard-code lines)."""
    for n, line in enumerate((GUESTS / f"{program}.c").read_text().splitlines(), 1):
        if text in line:
            return n
    raise AssertionError(f"{text!r} not in {program}.c")


def vcpu_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kvmpy-vcpu")]


@pytest.mark.parametrize("user_mode,ucall", [(False, None), (False, MMIO), (True, None)],
                         ids=["cpl0", "cpl0-mmio", "cpl3"])
def test_hello_syncs_prints_and_finishes(kvm, user_mode, ucall):
    with GuestVm("hello", kvm=kvm, vcpu_args=[0x1234], user_mode=user_mode, ucall=ucall) as g:
        assert (g.ucall.mmio_gpa is not None) == (user_mode or ucall is MMIO)
        seen = []
        r = g.run(timeout=20, on_sync=lambda i, stage, args: seen.append((i, stage, args)))
    assert r.syncs == [(0, 1, ()), (0, 2, (0xDEADBEEFCAFE, 0x1234))]
    assert seen == r.syncs
    assert r.prints == [(0, "hello from vcpu 0, arg 1234")]


def test_sync_hook_acts_between_stages(kvm):
    # assert.c checks value == 42 after stage 1; the hook sets it while the guest waits.
    with GuestVm("assert", kvm=kvm) as g:
        def hook(i, stage, args):
            assert g.read_global("value") == 41
            g.write_global("value", 42)
        r = g.run(timeout=20, on_sync=hook)
    assert r.syncs == [(0, 1, ())]


def test_sync_hook_exception_ends_run(kvm):
    with GuestVm("hello", kvm=kvm) as g:
        def hook(i, stage, args):
            raise RuntimeError(f"hook saw stage {stage}")
        with pytest.raises(RuntimeError, match="hook saw stage 1"):
            g.run(timeout=20, on_sync=hook)
    assert vcpu_threads() == []


@LEVELS
@pytest.mark.parametrize("mode,expr,values,message", [
    (0, "value == 42", (41, 42), ""),
    (1, "value > 100", (), "value is only 41"),
    (2, "value != 41", (41, 41), ""),
])
def test_guest_assert_propagates(kvm, user_mode, mode, expr, values, message):
    with GuestVm("assert", kvm=kvm, user_mode=user_mode) as g:
        g.write_global("mode", mode)
        with pytest.raises(GuestAssertError) as ei:
            g.run(timeout=20)
    call = ei.value.call
    assert (call.file, call.expr, call.values, call.message) == ("guests/assert.c", expr, values, message)
    assert call.line == guest_line("assert", {0: "GUEST_ASSERT_EQ", 1: "GUEST_ASSERT_MSG", 2: "GUEST_ASSERT_NE"}[mode])
    assert f"guests/assert.c:{call.line}: {expr}" in str(ei.value)
    if values:
        assert f"left {values[0]:#x}" in str(ei.value) and f"right {values[1]:#x}" in str(ei.value)


@LEVELS
def test_page_fault_on_unmapped_address_is_reported(kvm, user_mode):
    with GuestVm("exception", kvm=kvm, user_mode=user_mode) as g:
        unmapped = g.read_global("unmapped_gva")
        assert g.pt.translate(unmapped) is None
        with pytest.raises(GuestExceptionError) as ei:
            g.run(timeout=20)
        e = ei.value
        # read, not present, by user (4) or supervisor (0) code
        assert (e.vector, e.cr2, e.error_code, e.call.cs) == (14, unmapped, 4 if user_mode else 0,
                                                              SEL_USER_CODE64 if user_mode else SEL_CODE64)
        main = g.elf.symbol("guest_main")
        assert main.addr <= e.rip < main.addr + main.size
    assert "#PF (vector 14)" in str(e) and f"CR2 {unmapped:#x}" in str(e) and "guest_main+" in str(e)


@LEVELS
def test_invalid_opcode_is_reported(kvm, user_mode):
    # At CPL3 a ud2 is also how kernel calls enter the kernel: one that is not must be reported.
    with GuestVm("exception", kvm=kvm, user_mode=user_mode) as g:
        g.write_global("mode", 1)
        with pytest.raises(GuestExceptionError) as ei:
            g.run(timeout=20)
        rip = ei.value.rip
        assert g.vm.read(rip, 2) == b"\x0f\x0b"  # it points at the ud2
    assert ei.value.vector == 6 and "#UD" in str(ei.value)


@LEVELS
def test_installed_handler_resumes_guest(kvm, user_mode):
    with GuestVm("exception", kvm=kvm, user_mode=user_mode) as g:
        g.write_global("mode", 2)
        g.run(timeout=20)
        assert g.read_global("ud_count") == 2


@LEVELS
def test_two_vcpus_run_concurrently(kvm, user_mode):
    # Each vCPU waits in the guest until both have arrived: only concurrent vCPUs finish.
    with GuestVm("multi_vcpu", kvm=kvm, nr_vcpus=2, vcpu_args=[0xA0, 0xB1], user_mode=user_mode) as g:
        g.write_global("nr_vcpus", 2)
        r = g.run(timeout=30)
        assert [g.read_global("seen_arg", offset=8 * i) for i in range(2)] == [0xA0, 0xB1]
        assert g.read_global("arrived") == 2
    assert sorted(i for i, _, _ in r.syncs) == [0, 1]
    for i, stage, (vcpu_id, stack_addr) in r.syncs:
        assert stage == 1 and vcpu_id == i
        # guest_main's argument lives on that vCPU's own stack
        assert STACKS_GPA + i * STACK_BLOCK < stack_addr < STACKS_GPA + (i + 1) * STACK_BLOCK


def test_vcpu_waiting_forever_is_stopped_on_timeout(kvm):
    # Three expected, two present: both vCPUs spin in the barrier until the timeout.
    with GuestVm("multi_vcpu", kvm=kvm, nr_vcpus=2) as g:
        g.write_global("nr_vcpus", 3)
        with pytest.raises(GuestTimeoutError, match="vCPU 0 at .*vCPU 1 at"):
            g.run(timeout=0.5)
    assert vcpu_threads() == []


def _check_mapping(kvm, page_size, regions, user_mode=False):
    """regions: list of (slot, slot_gpa, slot_size) backing a page at page_gpa; probe offsets."""
    gva, page_gpa, probes, slots = regions
    expect = 0x5A5A_0000_1234_0000 | page_size.bit_length()
    with GuestVm("mappings", kvm=kvm, user_mode=user_mode) as g:
        for slot, gpa, size in slots:
            g.add_memory(slot, gpa, size)
        g.map(gva, page_gpa, page_size, page_size)
        for off in probes:
            t = g.pt.translate(gva + off)
            assert (t.gpa, t.page_size) == (page_gpa + off, page_size)
            g.vm.write_u64(page_gpa + off, expect ^ off)
        g.write_global("nr_regions", 1)
        g.write_global("gva", gva)
        g.write_global("expect", expect)
        g.write_global("nr_offsets", len(probes))
        for j, off in enumerate(probes):
            g.write_global("offsets", off, offset=8 * j)
        r = g.run(timeout=30)
        assert r.syncs == [(0, 1, (0,))]
        for off in probes:
            assert g.vm.read_u64(page_gpa + off + 8) == ~(expect ^ off) & (2**64 - 1)


@LEVELS
def test_2m_mapping_reads_host_values(kvm, user_mode):
    gpa = 1 << 32
    _check_mapping(kvm, PAGE_2M, (0x40_0000_0000, gpa, [0, 0x1000, 0x1FFFF0],
                                  [(1, gpa, 4 << 20)]), user_mode)


def test_1g_mapping_reads_host_values(kvm):
    gpa = 2 << 30
    with GuestVm("hello", kvm=kvm) as g:
        g.map(0x80_0000_0000, gpa, PAGE_1G, PAGE_1G)   # no pdpe1gb in the vCPU's CPUID: a skip
    # Two small slots inside the 1G page: near its start and 768 MiB in.
    _check_mapping(kvm, PAGE_1G, (0x80_0000_0000, gpa, [0x10, 0x1FFFF0, 0x3000_0000 + 0x800],
                                  [(1, gpa, PAGE_2M), (2, gpa + 0x3000_0000, PAGE_2M)]))


def test_globals_both_ways(kvm):
    with GuestVm("globals", kvm=kvm) as g:
        g.write_global("in_value", 1_000_000_007)
        g.write_global("in_array", struct.pack("<4I", 1, 2, 3, 0xFFFFFFFF))
        assert g.read_global("out_value") == 0
        g.run(timeout=20)
        total = 3 * 1_000_000_007 + 1 + 2 + 3 + 0xFFFFFFFF
        assert g.read_global("out_value") == total
        assert g.read_global_bytes("out_text").split(b"\0")[0] == f"sum={total}".encode()


def test_triple_fault_raises_crash_with_registers(kvm):
    with GuestVm("triple_fault", kvm=kvm) as g:
        with pytest.raises(GuestCrashError) as ei:
            g.run(timeout=20)
    e = ei.value
    assert e.exit.name == "SHUTDOWN"
    assert "exit SHUTDOWN" in str(e)
    assert re.search(r"rip 0x[0-9a-f]{16}", e.regs_dump)
    if loaded_vendor_module() == "kvm_amd":
        # SVM leaves the VMCB undefined after a SHUTDOWN intercept, so KVM resets the
        # vCPU (INIT) before exiting to userspace: the dump shows the reset state.
        assert "rip 0x000000000000fff0" in e.regs_dump and "cs 0xf000" in e.regs_dump
    else:
        # Elsewhere the dump is the state that faulted: the guest's zero-limit IDT.
        assert "idt 0x0/0x0" in e.regs_dump


def test_timeout_stops_the_vcpu(kvm):
    with GuestVm("spin", kvm=kvm) as g:
        start = time.monotonic()
        with pytest.raises(GuestTimeoutError, match="did not reach GUEST_DONE within 0.5 s"):
            g.run(timeout=0.5)
        assert time.monotonic() - start < 5
        assert vcpu_threads() == []
        spins = g.read_global("spins")
        assert spins > 0  # it was running...
        time.sleep(0.1)
        assert g.read_global("spins") == spins  # ...and is not any more


@pytest.mark.parametrize("mode,bad_gpa,match", [
    (0, 0xFFFFF000, r"vCPU 0: ucall pointer 0xfffff000 .* outside guest memory"),
    (1, (64 << 20) - 100, r"ucall pointer 0x3ffff9c .* outside guest memory"),  # straddles the end
    (2, None, r"bad magic 0x12345678"),
    (3, None, r"len 513 exceeds"),
])
def test_bad_ucall_is_a_clear_error(kvm, mode, bad_gpa, match):
    with GuestVm("bad_ucall", kvm=kvm) as g:
        g.write_global("mode", mode)
        if bad_gpa is not None:
            g.write_global("bad_gpa", bad_gpa)
        with pytest.raises(BadUcallError, match=match):
            g.run(timeout=20)
    assert vcpu_threads() == []


FRAMES = (0x300_0000, 0x300_1000)     # two pages of memslot 0, far above the guest program
REMAP_GVA = 0x50_0000_0000


@LEVELS
def test_kernel_calls_run_privileged_steps(kvm, user_mode):
    """kernel_call() runs a function at CPL0 from either level; guest_read_cr3, guest_invlpg and
    guest_reload_cr3 work through it at CPL3 (a remapped page is seen after the flushes)."""
    with GuestVm("kernel_call", kvm=kvm, user_mode=user_mode) as g:
        g.map(REMAP_GVA, FRAMES[0], PAGE_4K)
        for name, value in (("arg", 0x1234_5678_9ABC), ("page_gva", REMAP_GVA)):
            g.write_global(name, value)
        for i, frame in enumerate(FRAMES):
            g.write_global("frame_gpa", frame, offset=8 * i)
            g.vm.write_u64(frame, 0xF0 + i)
        r = g.run(timeout=20)
        syncs = {stage: args for _, stage, args in r.syncs}
        assert syncs[stages.KERNEL_CALL_WHERE] == ((SEL_USER_CODE64, 1) if user_mode else (SEL_CODE64, 0))
        assert syncs[stages.KERNEL_CALL_CR3] == (g.pt.cr3,)
        assert syncs[stages.KERNEL_CALL_RESULT] == (0x1234_5678_9ABC ^ stages.KERNEL_CALL_TEST_MAGIC, SEL_CODE64)
        assert syncs[stages.KERNEL_CALL_FLUSHED] == (stages.KERNEL_CALL_TEST_MAGIC,)
        assert [g.vm.read_u64(f) for f in FRAMES] == [0xF0, stages.KERNEL_CALL_TEST_MAGIC]
        assert stages.KERNEL_CALL_RAW_CR3 not in syncs


@LEVELS
def test_privileged_instruction_needs_a_kernel_call_at_cpl3(kvm, user_mode):
    """A plain mov from CR3: fine at CPL0, a #GP at CPL3 -- the guest really runs at CPL3."""
    with GuestVm("kernel_call", kvm=kvm, user_mode=user_mode) as g:
        g.map(REMAP_GVA, FRAMES[0], PAGE_4K)
        for name, value in (("page_gva", REMAP_GVA), ("raw_cr3", 1)):
            g.write_global(name, value)
        for i, frame in enumerate(FRAMES):
            g.write_global("frame_gpa", frame, offset=8 * i)
        if not user_mode:
            r = g.run(timeout=20)
            assert r.syncs[-1][1:] == (stages.KERNEL_CALL_RAW_CR3, (g.pt.cr3,))
            return
        with pytest.raises(GuestExceptionError) as ei:
            g.run(timeout=20)
    assert (ei.value.vector, ei.value.error_code, ei.value.call.cs) == (13, 0, SEL_USER_CODE64)
    assert "guest_main+" in str(ei.value) and "CPL3" in str(ei.value)
