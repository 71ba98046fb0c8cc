"""Kvm/Vm/Vcpu against the real /dev/kvm (skipped without it)."""
from __future__ import annotations

import contextlib
import errno
import signal
import threading
import time

import psutil
import pytest

from kvmpy import IoctlError, KvmError
from kvmpy.abi import lib
from kvmpy.bitmap import DirtyBitmap
from kvmpy.exits import HltExit, InterruptedExit, IoExit
from kvmpy.memory import PAGE_4K, SharedMemfd

# Real mode: mov al,0x42; out 0x10,al; hlt
OUT_HLT = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])
# Real mode: mov byte [bx], al; add bx, 0x1000; out 0x11, al; jmp back (writes one page per iteration)
SPIN = bytes([0xEB, 0xFE])


def _real_mode_vcpu(vm, rip, vcpu_id=0):
    vcpu = vm.create_vcpu(vcpu_id)
    s = vcpu.get_sregs()
    s.cs.base = 0
    s.cs.selector = 0
    s.ds.base = 0
    s.ds.selector = 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip = rip
    r.rflags = 2
    vcpu.set_regs(r)
    return vcpu


@contextlib.contextmanager
def real_mode_vm(kvm, code: bytes, mem: int = 1 << 20):
    """A VM with ``mem`` bytes at GPA 0 and ``code`` at 0x1000, for real-mode vCPUs."""
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0, mem)
        vm.write(0x1000, code)
        yield vm


def test_real_mode_io_then_hlt(kvm):
    with real_mode_vm(kvm, OUT_HLT) as vm:
        vcpu = _real_mode_vcpu(vm, 0x1000)
        ex = vcpu.run()
        assert isinstance(ex, IoExit) and ex.port == 0x10 and ex.direction == "out" and ex.size == 1
        assert bytes(ex.data) == b"\x42"
        ex = vcpu.run()
        assert isinstance(ex, HltExit), ex
        assert vcpu.get_regs().rip == 0x1005


def test_slot_add_move_delete(kvm):
    with kvm.create_vm() as vm:
        ms = vm.add_memory(1, 0x100000, 16 * PAGE_4K, SharedMemfd())
        vm.write(0x100000, b"hello")
        vm.move_memory(1, 0x200000)
        assert vm.read(0x200000, 5) == b"hello"
        with pytest.raises(KvmError, match="not inside one memslot"):
            vm.read(0x100000, 5)
        # Overlapping slot: the kernel's EEXIST is surfaced with the ioctl name.
        with pytest.raises(IoctlError) as ei:
            vm.add_memory(2, 0x200000 + PAGE_4K, PAGE_4K)
        assert ei.value.errno == errno.EEXIST and "KVM_SET_USER_MEMORY_REGION" in str(ei.value)
        assert 2 not in vm.memslots
        # Misaligned GPA: EINVAL.
        with pytest.raises(IoctlError) as ei:
            vm.add_memory(3, 0x300010, PAGE_4K)
        assert ei.value.errno == errno.EINVAL
        vm.delete_memory(1)
        assert not vm.memslots
        assert ms.mapping.closed


@pytest.mark.parametrize("kwargs, name", [({"gpa": True}, "gpa"), ({"size": 4096.0}, "size"), ({"slot": False}, "slot")])
def test_memslot_numbers_must_be_ints_not_bools_or_floats(kvm, kwargs, name):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError, match=f"add_memory: {name} must be an int, not {kwargs[name]!r}"):
            vm.add_memory(**{"slot": 1, "gpa": 0x100000, "size": PAGE_4K, **kwargs})
        assert not vm.memslots


def test_ioctl_error_message(kvm):
    with kvm.create_vm() as vm:
        vm.add_memory(1, 0, 64 * PAGE_4K, flags=lib.KVM_MEM_LOG_DIRTY_PAGES)
        bm = vm.get_dirty_log(1)
        with pytest.raises(IoctlError) as ei:
            vm.clear_dirty_log(1, bm, first_page=1, num_pages=63)
        msg = str(ei.value)
        assert msg.startswith("KVM_CLEAR_DIRTY_LOG on VM fd")
        assert "EINVAL" in msg and "[slot 1 first_page 1 num_pages 63]" in msg
        assert (ei.value.ioctl, ei.value.errno) == ("KVM_CLEAR_DIRTY_LOG", errno.EINVAL)


def test_unchecked_ioctl_returns_the_kernels_errno(kvm):
    with kvm.create_vm() as vm:
        vm.add_memory(1, 0, 64 * PAGE_4K)
        # A slot KVM does not know and a slot without dirty logging: ENOENT, not an exception.
        assert vm.get_dirty_log_unchecked(7) == (-1, errno.ENOENT)
        assert vm.get_dirty_log_unchecked(1).errno == errno.ENOENT
        # The checked call refuses the unlogged slot itself, before asking the kernel.
        with pytest.raises(KvmError, match="does not have KVM_MEM_LOG_DIRTY_PAGES"):
            vm.get_dirty_log(1)
        vm.enable_dirty_logging(1)
        res = vm.get_dirty_log_unchecked(1)
        assert res.ok and res.errno == 0
        # Our bitmap must hold the slot: the kernel would write past a smaller one.
        with pytest.raises(KvmError, match="cannot hold slot 1"):
            vm.get_dirty_log_unchecked(1, DirtyBitmap(8))


def test_vm_and_vcpu_stats(kvm):
    with real_mode_vm(kvm, OUT_HLT) as vm:
        vcpu = _real_mode_vcpu(vm, 0x1000)
        before = vcpu.stats.snapshot()
        vcpu.run()
        vcpu.run()
        delta = vcpu.stats.snapshot() - before
        # io_exits is not asserted: when KVM emulates the OUT itself (as the
        # instruction-emulating kvm_pvm does) it is not counted there.
        assert delta["exits"] >= 2
        assert delta["halt_exits"] == 1
        vm_stats = vm.stats.snapshot()
        for name in ("pages_4k", "pages_2m", "pages_1g", "mmu_unsync"):
            assert name in vm_stats
        assert vm.stats.desc("pages_4k").type == "instant"


def test_stats_of_a_kvm_without_binary_stats_are_a_requirement(kvm, monkeypatch):
    # The VM answers for its vCPUs too: neither stats fd is opened without the capability.
    from kvmpy.errors import RequirementError
    from kvmpy.vm import Vm

    real = Vm.check_extension
    monkeypatch.setattr(Vm, "check_extension",
                        lambda vm, cap: 0 if cap == lib.KVM_CAP_BINARY_STATS_FD else real(vm, cap))
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        for owner in (vcpu, vm):
            with pytest.raises(RequirementError, match="KVM_CAP_BINARY_STATS_FD"):
                owner.stats


def test_dirty_bitmap_of_guest_writes(kvm):
    # Guest writes one byte into pages 3, 5 and 9 of slot 1 (below 1 MiB: real mode), then halts.
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0, 0x80000)
        vm.add_memory(1, 0x80000, 64 * PAGE_4K, flags=lib.KVM_MEM_LOG_DIRTY_PAGES)
        code = bytearray()
        for page in (3, 5, 9):
            # mov ax, seg; mov es, ax; mov byte [es:0], 1   (segment = (0x100000 + page*4K) >> 4)
            seg = (0x80000 + page * PAGE_4K) >> 4
            code += bytes([0xB8, seg & 0xFF, seg >> 8, 0x8E, 0xC0, 0x26, 0xC6, 0x06, 0, 0, 1])
        code += b"\xF4"
        vm.write(0x1000, bytes(code))
        vcpu = _real_mode_vcpu(vm, 0x1000)
        assert isinstance(vcpu.run(), HltExit)
        bm = vm.get_dirty_log(1)
        assert bm.pages() == [3, 5, 9]
        # Collected and re-protected: a second fetch is empty.
        assert vm.get_dirty_log(1).count() == 0


def test_kick_stops_a_spinning_vcpu(kvm):
    with real_mode_vm(kvm, SPIN) as vm:
        vcpu = _real_mode_vcpu(vm, 0x1000)
        t = threading.Timer(0.2, vcpu.kick)
        t.start()
        ex = vcpu.run()
        t.join()
        assert isinstance(ex, InterruptedExit)
        # The kick was consumed: the vCPU can run again (and is kicked again here).
        vcpu.kick()
        assert isinstance(vcpu.run(), InterruptedExit)


def test_two_vcpus_run_concurrently(kvm):
    with real_mode_vm(kvm, SPIN) as vm:
        vcpus = [_real_mode_vcpu(vm, 0x1000, i) for i in range(2)]
        results = {}
        started = threading.Barrier(3)

        def go(v):
            started.wait()
            results[v.id] = v.run()

        threads = [threading.Thread(target=go, args=(v,)) for v in vcpus]
        for t in threads:
            t.start()
        started.wait()
        # Both are inside KVM_RUN at once: neither returns until kicked.
        threading.Event().wait(0.3)
        assert results == {}
        for v in vcpus:
            v.kick()
        for t in threads:
            t.join(5)
        assert all(isinstance(results[i], InterruptedExit) for i in range(2))


def test_create_close_1000_vms_leaks_nothing(kvm):
    proc = psutil.Process()

    def cycle(n):
        for _ in range(n):
            with kvm.create_vm() as vm:
                vm.add_memory(0, 0, 64 * PAGE_4K)
                vm.create_vcpu(0)

    cycle(50)  # warm up allocator caches before the baseline
    fds, rss = proc.num_fds(), proc.memory_info().rss
    cycle(1000)
    assert proc.num_fds() == fds
    # Each VM maps 256 KiB of guest memory + a 12 KiB run page: a leak of either would
    # show as >250 MiB; allow allocator noise well below that.
    assert proc.memory_info().rss - rss < 16 << 20


def test_ioctls_a_caught_signal_interrupts_are_issued_again(kvm):
    """KVM_CREATE_VM fails with EINTR when a signal with a handler arrives during it
    (here, ~100 times a second under a stream of SIGUSR1). As for Python's own system
    calls (PEP 475), the binding issues such an ioctl again; KVM_RUN's EINTR stays a result."""
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    done = threading.Event()
    ready = threading.Event()
    worker: dict = {}

    def create_vms() -> None:
        worker["tid"] = threading.get_ident()
        ready.set()
        try:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                with kvm.create_vm() as vm:
                    vm.add_memory(0, 0, PAGE_4K)
                    worker["vms"] = worker.get("vms", 0) + 1
        except BaseException as e:  # noqa: BLE001 - reported below
            worker["error"] = e
        finally:
            done.set()

    thread = threading.Thread(target=create_vms)
    thread.start()
    signals = 0
    try:
        ready.wait()
        while not done.is_set():
            signal.pthread_kill(worker["tid"], signal.SIGUSR1)
            signals += 1
            time.sleep(0.0002)
    finally:
        thread.join()
        signal.signal(signal.SIGUSR1, previous)
    assert "error" not in worker, f"{worker['error']!r} after {worker.get('vms', 0)} VMs and {signals} signals"
    assert signals > 100 and worker["vms"] > 10  # the race was run, not skipped
