"""Nothing a Python user does may crash the interpreter: views after close, close during
KVM_RUN, stats parsing under the debug allocator (issue 13 items 4-6).

Each case runs in a child interpreter, so that a SIGSEGV fails the test instead of
ending pytest.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

# A real-mode VM: ``mem`` bytes at GPA 0, vCPU 0 at 0x1000 running ``code``.
PRELUDE = """
import gc, sys, threading, time, warnings
from kvmpy import Kvm, KvmError
from kvmpy.exits import InterruptedExit
from kvmpy.memory import PAGE_4K

OUT_HLT = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])        # mov al,0x42; out 0x10,al; hlt
MMIO_READ = bytes([0xA0, 0x00, 0x00])                   # mov al,[0]: with DS past the memory, MMIO
SPIN = bytes([0xEB, 0xFE])                              # jmp $

def real_mode_vm(code, ds_base=0, mem=1 << 20):
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    vm.add_memory(0, 0, mem)
    vm.write(0x1000, code)
    vcpu = vm.create_vcpu(0)
    s = vcpu.get_sregs()
    s.cs.base = s.cs.selector = 0
    s.ds.base, s.ds.selector = ds_base, ds_base >> 4
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rflags = 0x1000, 2
    vcpu.set_regs(r)
    return vm, vcpu
"""


# The window a big munmap opens in close(), made certain: each unmap first sleeps (GIL released).
SLOW_UNMAPS = """
def slow_unmaps(seconds):
    from kvmpy import memory
    unmap = memory.Mapping.close
    def slow_unmap(self):
        time.sleep(seconds)
        unmap(self)
    memory.Mapping.close = slow_unmap
"""


def run_child(body: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run PRELUDE + ``body`` in a fresh interpreter; fail the test if it died of a signal."""
    p = subprocess.run([sys.executable, "-X", "dev", "-c", PRELUDE + SLOW_UNMAPS + textwrap.dedent(body)],
                       capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
    if p.returncode < 0:
        pytest.fail(f"the child died of {signal.Signals(-p.returncode).name}:\n{p.stdout}\n{p.stderr}")
    return p


def expect_ok(body: str, env: dict | None = None) -> str:
    p = run_child(body, env)
    assert p.returncode == 0, p.stderr
    return p.stdout


# How each kind of exported view is obtained: (setup code leaving the view in ``v``, close code).
VIEWS = {
    "gpa_view": ("vm, vcpu = real_mode_vm(OUT_HLT); v = vm.gpa_view(0x1000, 16)", "vm.close()"),
    "Memslot.view": ("vm, vcpu = real_mode_vm(OUT_HLT); v = vm.memslots[0].view", "vm.close()"),
    "gpa_view, slot deleted": ("vm, vcpu = real_mode_vm(OUT_HLT); v = vm.gpa_view(0x1000, 16)",
                               "vm.delete_memory(0)"),
    "IoExit.data": ("vm, vcpu = real_mode_vm(OUT_HLT); v = vcpu.run().data; assert bytes(v) == b'B'",
                    "vm.close()"),
    "IoExit.data, vCPU closed": ("vm, vcpu = real_mode_vm(OUT_HLT); v = vcpu.run().data", "vcpu.close()"),
    "IoExit.data, next run": ("vm, vcpu = real_mode_vm(OUT_HLT); v = vcpu.run().data", "vcpu.run()"),
    "MmioExit.data": ("vm, vcpu = real_mode_vm(MMIO_READ, ds_base=0x80000, mem=0x80000); ex = vcpu.run(); "
                      "v = ex.data; assert ex.addr == 0x80000 and not ex.is_write, ex", "vm.close()"),
}
TOUCHES = {"read": "bytes(v)", "write": "v[0] = 1", "slice": "v[0:1]", "struct": "memoryview(v).tobytes()"}


@pytest.mark.parametrize("touch", TOUCHES)
@pytest.mark.parametrize("kind", VIEWS)
def test_a_view_used_after_close_raises(kvm, kind, touch):
    setup, close = VIEWS[kind]
    out = expect_ok(f"""
        {setup}
        {close}
        try:
            {TOUCHES[touch]}
        except ValueError as e:
            print("ValueError:", e)
        """)
    assert "ValueError: operation forbidden on released memoryview object" in out


def test_a_derived_view_keeps_the_memory_mapped_until_dropped(kvm):
    out = expect_ok("""
        vm, vcpu = real_mode_vm(OUT_HLT)
        ms = vm.memslots[0]
        page = vm.gpa_view(0x1000, 16)[0:5]        # a slice of a handed-out view
        addr = f"{ms.hva:x}-"
        mapped = lambda: any(line.startswith(addr) for line in open("/proc/self/maps"))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            vm.close()
        assert any(issubclass(x.category, ResourceWarning) for x in w), [str(x) for x in w]
        print("after close:", bytes(page), mapped())
        del page
        print("dropped:", mapped())
        """)
    assert "after close: b'\\xb0B\\xe6\\x10\\xf4' True" in out
    assert "dropped: False" in out


def test_memory_is_unmapped_on_close_without_derived_views(kvm):
    out = expect_ok("""
        vm, vcpu = real_mode_vm(OUT_HLT)
        v = vm.memslots[0].view
        addr = f"{vm.memslots[0].hva:x}-"
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # no ResourceWarning: nothing pinned it
            vm.close()
        print("mapped:", any(line.startswith(addr) for line in open("/proc/self/maps")))
        """)
    assert "mapped: False" in out


def test_close_during_kvm_run_stops_the_vcpu_first(kvm):
    out = expect_ok("""
        vm, vcpu = real_mode_vm(SPIN)
        seen = []
        def loop():
            while True:
                try:
                    seen.append(type(vcpu.run()).__name__)
                except Exception as e:
                    seen.append(f"{type(e).__name__}: {e}")
                    return
        t = threading.Thread(target=loop)
        t.start()
        time.sleep(0.3)                      # the thread is spinning inside KVM_RUN
        vm.close()
        t.join(10)
        print(seen)
        """)
    assert re.search(r"\['InterruptedExit', 'KvmError: vCPU 0 \(fd -?\d+\): run\(\) on a closed vCPU'\]", out), out


def test_close_refuses_while_a_vcpu_stays_in_kvm_run(kvm):
    out = expect_ok("""
        import kvmpy.vcpu
        kvmpy.vcpu.STOP_TIMEOUT = 0.5
        vm, vcpu = real_mode_vm(SPIN)
        t = threading.Thread(target=vcpu.run)
        t.start()
        time.sleep(0.3)
        vcpu.kick = lambda: None                  # a vCPU that kicks do not get out
        try:
            vm.close()
        except KvmError as e:
            print("refused:", e)
        print("still open:", vm.fd >= 0, vcpu.fd >= 0, vm.read(0x1000, 2) == SPIN)
        del vcpu.kick
        vm.close()
        t.join(10)
        print("closed:", vm.fd, t.is_alive())
        """)
    assert "refused: vCPU 0" in out and "still in KVM_RUN" in out
    assert "still open: True True True" in out
    assert "closed: -1 False" in out


def test_kick_after_close_does_nothing(kvm):
    expect_ok("""
        vm, vcpu = real_mode_vm(SPIN)
        vcpu.close()
        vcpu.kick()
        vm.close()
        vcpu.kick()
        """)


def test_kvm_run_is_read_as_an_owned_copy():
    """A cffi pointer into the run page (or a field of one, which does not keep its parent
    alive) read after close() was a SIGSEGV: ``get_kvm_run()`` hands out a copy."""
    out = expect_ok("""
        from kvmpy.exits import IoExit
        vm, vcpu = real_mode_vm(OUT_HLT)
        assert not hasattr(vcpu, "run_struct")
        assert isinstance(vcpu.run(), IoExit)
        run = vcpu.get_kvm_run()
        io = run.io
        run.immediate_exit = 1              # a copy: the next run is not cut short
        print("next run:", type(vcpu.run()).__name__)
        vm.close()
        print("after close", run.exit_reason, io.port, io.direction)
        try:
            vcpu.get_kvm_run()
        except KvmError as e:
            print("closed:", e)
        """)
    assert "after close 2 16 1" in out and "next run: InterruptedExit" not in out
    assert "closed: vCPU 0's kvm_run used after close" in out


def test_a_close_that_raises_midway_still_releases_everything():
    """Under ``-W error`` the ResourceWarning for a held derived view is raised from inside
    the release: it stopped there, the VM fd closed but ``vm.fd`` still naming it (the next
    VM reused the number and the old object drove it), other memslots and the vCPU fd kept."""
    out = expect_ok("""
        import os
        warnings.simplefilter("error")
        vm, vcpu = real_mode_vm(OUT_HLT)
        other_slot = vm.add_memory(1, 1 << 30, 1 << 20).hva
        held = vm.gpa_view(0x1000, 16)[0:4]          # a derived view keeps slot 0 mapped
        vcpu_fd, vm_fd = vcpu.fd, vm.fd
        try:
            vm.close()
        except ResourceWarning as e:
            print("close raised:", e)
        vm.close()                                   # a second close has nothing left to do
        with open("/proc/self/maps") as f:
            mapped = any(line.startswith(f"{other_slot:x}-") for line in f)
        print("fds", vm.fd, vcpu.fd, os.path.exists(f"/proc/self/fd/{vm_fd}"), os.path.exists(f"/proc/self/fd/{vcpu_fd}"),
              "slot 1 mapped", mapped)
        newer = Kvm().create_vm()
        try:
            vm.check_extension(1)
        except KvmError as e:
            print("old vm:", e)
        """)
    assert "close raised: memory: a view of it is still alive" in out or "close raised:" in out
    assert "fds -1 -1 False False slot 1 mapped False" in out
    assert "old vm: KVM_CHECK_EXTENSION on VM fd -1: it is closed" in out


def test_a_dirty_log_on_another_thread_never_reaches_a_reused_fd():
    """close() closed the VM fd, then spent its time unmapping, and only then forgot the fd:
    a dirty-log read meanwhile reached the new VM that had reused the number, and KVM wrote
    that VM's (larger) slot 0 bitmap into one sized for ours: heap corruption."""
    out = expect_ok("""
        import os
        from kvmpy.abi import lib
        slow_unmaps(0.2)
        kvm = Kvm()
        vm = kvm.create_vm()
        vm.add_memory(0, 0, PAGE_4K, flags=lib.KVM_MEM_LOG_DIRTY_PAGES)     # an 8-byte bitmap
        vm.add_memory(1, 1 << 32, 1 << 20)
        old_fd = vm.fd
        closer = threading.Thread(target=vm.close)
        closer.start()
        def still_the_vm():
            try:
                return os.readlink(f"/proc/self/fd/{old_fd}") == "anon_inode:kvm-vm"
            except FileNotFoundError:
                return False
        while still_the_vm():
            pass
        other = kvm.create_vm()
        other.add_memory(0, 0, 256 << 20, flags=lib.KVM_MEM_LOG_DIRTY_PAGES)  # an 8 KiB bitmap
        kept, refused = [], set()
        for _ in range(50):
            try:
                kept += [vm.get_dirty_log(0), bytearray(8)]
            except KvmError as e:
                refused.add(str(e))
        closer.join()
        answered = len(kept) // 2
        del kept
        gc.collect()
        print("reused", other.fd == old_fd, "answered", answered, "|", sorted(refused))
        """, env={"PYTHONMALLOC": "debug"})
    # Refused: waiting for the close, then finding the VM closed (or its slots gone).
    assert "answered 0 |" in out and re.search(r"the VM is closed|no memslot 0", out), out


def test_two_threads_closing_one_vm_release_it_once():
    """Both passed the "still open" check; the second cleared the memslots while the first
    was unmapping them: RuntimeError, and the slots not reached yet stayed mapped."""
    out = expect_ok("""
        slow_unmaps(0.05)
        vm = Kvm().create_vm()
        vm.create_vcpu(0)
        hvas = {f"{vm.add_memory(s, s << 30, 1 << 20).hva:x}" for s in range(4)}
        errors = []
        def closer():
            try:
                vm.close()
            except Exception as e:
                errors.append(repr(e))
        threads = [threading.Thread(target=closer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with open("/proc/self/maps") as f:
            mapped = hvas & {line.split("-", 1)[0] for line in f}
        print("errors", errors, "still mapped", len(mapped))
        """)
    assert "errors [] still mapped 0" in out, out


def test_an_ioctl_given_a_smaller_struct_is_refused_before_the_kernel_writes_past_it():
    """KVM_GET_SREGS writes 312 bytes; into a 144-byte struct kvm_regs that corrupted the
    heap (glibc aborted within 2,000 tries here). The ioctl number's size refuses it first."""
    out = expect_ok("""
        from kvmpy.abi import ffi, ioctl, ioctl_unchecked
        vm, vcpu = real_mode_vm(SPIN)
        kept = []
        for i in range(2000):
            regs = ffi.new("struct kvm_regs *")
            for call in (ioctl, ioctl_unchecked):
                try:
                    call(vcpu.fd, "KVM_GET_SREGS", regs)
                except KvmError as e:
                    message = str(e)
                else:
                    raise SystemExit("KVM_GET_SREGS into a struct kvm_regs was issued")
            kept += [regs, ffi.new("char[]", 100)]
        del kept
        gc.collect()
        print(message)
        """, env={"PYTHONMALLOC": "debug"})
    assert "KVM_GET_SREGS on fd" in out and "copies 312 bytes" in out and "'struct kvm_regs *' points to 144" in out


def test_stats_parse_reads_no_freed_memory():
    """Under the debug allocator freed memory is 0xDD...: a descriptor read through a pointer
    over a freed temporary slice shows up as an unknown type/unit."""
    out = expect_ok("""
        import struct
        from kvmpy.abi import lib
        from kvmpy.stats_layout import DESC_SIZE, HEADER_SIZE, StatsLayout
        names = [f"stat_{i}" for i in range(64)]
        name_size, desc_off = 48, HEADER_SIZE + 48
        data_off = desc_off + len(names) * (DESC_SIZE + name_size)
        meta = struct.pack("<6I", 0, name_size, len(names), HEADER_SIZE, desc_off, data_off)
        meta += b"kvm-1".ljust(name_size, b"\\0")
        for i, n in enumerate(names):
            meta += struct.pack("<IhHII", lib.KVM_STATS_TYPE_CUMULATIVE, 0, 1, 8 * i, 0) + n.encode().ljust(name_size, b"\\0")
        for _ in range(20):
            layout = StatsLayout.parse(meta)
        print(len(layout.descs), {d.type for d in layout.descs.values()})
        """, env={"PYTHONMALLOC": "debug"})
    assert "64 {'cumulative'}" in out


def test_views_dropped_by_their_users_are_forgotten_held_ones_released():
    from kvmpy.memory import PAGE_4K, Anonymous

    mapping = Anonymous().allocate(4 * PAGE_4K)
    held = [mapping.view(i * 8, 8) for i in range(10)]
    for i in range(1000):
        mapping.view(i % PAGE_4K, 1)[0] = 1       # used once, dropped
    assert len(mapping._views._views) < 100      # not 1010: the dropped ones were forgotten
    mapping.close()
    for v in held:
        with pytest.raises(ValueError, match="released memoryview"):
            v[0]
