"""Bad input gets kvmpy's own errors, and dropped objects give back their fds (issue 13 item 6)."""
from __future__ import annotations

import errno
import gc

import psutil
import pytest

from kvmpy import IoctlError, Kvm, KvmError
from kvmpy.abi import ffi, ioctl, ioctl_arg_size, ioctl_int, ioctl_unchecked, lib
from kvmpy.bitmap import DirtyBitmap
from kvmpy.memory import PAGE_4K


@pytest.mark.parametrize("call", [
    lambda vm: vm.add_memory(-1, 0, PAGE_4K),
    lambda vm: vm.add_memory(1 << 32, 0, PAGE_4K),
    lambda vm: vm.add_memory(0, -PAGE_4K, PAGE_4K),
    lambda vm: vm.create_vcpu(-1),
    lambda vm: vm.create_vcpu(1 << 40),
    lambda vm: vm.set_tss_addr(-1),
    lambda vm: vm.set_identity_map_addr(-1),
    lambda vm: vm.enable_cap(lib.KVM_CAP_DIRTY_LOG_RING, -1),
    lambda vm: vm.enable_cap(lib.KVM_CAP_DIRTY_LOG_RING, 1, 2, 3, 4, 5),
    lambda vm: vm.get_dirty_log_unchecked(-1),
    lambda vm: vm.write_u64(0, -1),
    lambda vm: vm.gpa_view(0, -1),
    lambda vm: vm.read(-PAGE_4K, 8),
    lambda vm: vm.add_memory(1, 2.0 ** 31, PAGE_4K),
    lambda vm: vm.add_memory(1, 1 << 31, PAGE_4K / 1),
    lambda vm: vm.move_memory(0, 1.5e9),
    lambda vm: vm.set_tss_addr(0xFFFBD000 / 1),
    lambda vm: vm.read(4096.0, 8),
    lambda vm: vm.gpa_view(0, 4.0),
    lambda vm: vm.get_dirty_log(0, into=bytearray(8)),
    lambda vm: vm.clear_dirty_log(0, bytearray(8)),
    lambda vm: vm.create_vcpu(0).set_msrs({0x10: -1}),
    lambda vm: vm.create_vcpu(0).get_msrs(["0x10"]),
    lambda vm: vm.create_vcpu(0).set_cpuid(42),
    lambda vm: vm.create_vcpu(0).set_cpuid(ffi.new("struct kvm_cpuid2 *", {"nent": 3})),
    lambda vm: ioctl(vm.fd, "KVM_GET_REGZ"),
], ids=["slot -1", "slot 2**32", "gpa -4K", "vcpu -1", "vcpu 2**40", "tss -1", "identity map -1",
        "cap arg -1", "cap 5 args", "dirty log slot -1", "write_u64 -1", "view length -1", "read gpa -4K",
        "float gpa", "float size", "move to a float", "float tss", "read a float gpa", "view a float length",
        "log into a bytearray", "clear a bytearray", "msr value -1", "msr index str", "cpuid int",
        "cpuid nent past its struct", "unknown ioctl"])
def test_out_of_range_numbers_are_kvm_errors(kvm, call):
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0, 16 * PAGE_4K)
        with pytest.raises(KvmError) as ei:
            call(vm)
        assert type(ei.value) in (KvmError, IoctlError)
        # The VM is still usable: nothing was half done.
        vm.write(0, b"ok")
        assert vm.read(0, 2) == b"ok" and sorted(vm.memslots) == [0]


@pytest.mark.parametrize("call, message", [
    (lambda v: v.set_regs(v.get_sregs()), "KVM_SET_REGS on vCPU 0 .*copies 144 bytes.*'struct kvm_sregs \\*' points to 312"),
    (lambda v: v.set_sregs(v.get_regs()), "KVM_SET_SREGS on vCPU 0 .*copies 312 bytes.*'struct kvm_regs \\*' points to 144"),
    (lambda v: v.set_regs(42), "KVM_SET_REGS on vCPU 0 .*must be a cffi pointer to the 144-byte argument.*not int"),
    (lambda v: ioctl(v.fd, "KVM_GET_REGS", b"\0" * 144), "must be a cffi pointer .* not bytes"),
    (lambda v: ioctl(v.fd, "KVM_SET_REGS", ffi.new("char[]", 143)), "copies 144 bytes, the array 'char\\[\\]' holds 143"),
    (lambda v: ioctl(v.fd, "KVM_GET_REGS", ffi.cast("void *", 0x1000)), "'void \\*' has no size to check"),
    (lambda v: ioctl_unchecked(v.fd, "KVM_SET_SREGS", ffi.new("struct kvm_regs *")), "KVM_SET_SREGS on fd"),
    (lambda v: ioctl_int(v.fd, "KVM_GET_REGS", 0x1000), "KVM_GET_REGS on fd .* copies 144 bytes through a pointer"),
], ids=["set_regs(sregs)", "set_sregs(regs)", "set_regs(int)", "bytes", "short array", "void *", "unchecked",
        "address as int"])
def test_an_ioctl_argument_of_the_wrong_size_is_refused(kvm, call, message):
    """The ioctl number says how many bytes the kernel copies: a struct of another size
    never reaches it, and the vCPU is left as it was. (Only SETs and unmapped addresses
    here: a GET into a smaller struct corrupts the heap; test_memory_safety has that one.)"""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        before = bytes(ffi.buffer(vcpu.get_regs()))
        with pytest.raises(KvmError, match=message) as ei:
            call(vcpu)
        assert type(ei.value) is KvmError
        assert bytes(ffi.buffer(vcpu.get_regs())) == before


def test_an_ioctl_argument_that_fits_reaches_the_kernel(kvm):
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert ioctl_arg_size("KVM_GET_SREGS") == ffi.sizeof("struct kvm_sregs") and ioctl_arg_size("KVM_RUN") == 0
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_sregs") + 8)       # an array may be larger
        ioctl(vcpu.fd, "KVM_GET_SREGS", buf)
        assert bytes(ffi.buffer(buf, 8)) == bytes(ffi.buffer(vcpu.get_sregs(), 8))
        # NULL, typed or not, is the kernel's to answer: EFAULT, for tests that expect it.
        for null in (ffi.NULL, ffi.cast("struct kvm_sregs *", 0)):
            assert ioctl_unchecked(vcpu.fd, "KVM_GET_SREGS", null) == (-1, errno.EFAULT)


def test_a_dirty_bitmap_keeps_its_size():
    """KVM writes a memslot's worth of bits into the bitmap: a buffer replaced, shrunk or
    read-only (or npages changed) would have it write past the buffer or into a constant."""
    bm = DirtyBitmap(1024)
    with pytest.raises(AttributeError):
        bm.buffer = bytearray(8)
    with pytest.raises(AttributeError):
        bm.npages = 1 << 20
    with pytest.raises(BufferError):
        del bm.buffer[8:]
    assert len(bm.buffer) == 128 and bm.npages == 1024
    with pytest.raises(ValueError, match="must be writable"):
        DirtyBitmap(64, b"\0" * 8)
    with pytest.raises(TypeError, match="combines with a DirtyBitmap, not int"):
        DirtyBitmap(64) | 3


def test_closed_objects_say_so(kvm):
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vm.close()
    for call in (lambda: vcpu.get_regs(), lambda: vm.create_vcpu(1), lambda: vm.check_extension(1),
                 lambda: vm.set_tss_addr(0xFFFBD000)):
        with pytest.raises(KvmError, match="it is closed|closed vCPU"):
            call()


def test_kvm_given_a_directory_or_another_file(tmp_path):
    with pytest.raises(KvmError, match=f"{tmp_path}: cannot open it as the KVM device: Is a directory"):
        Kvm(str(tmp_path))
    with pytest.raises(IoctlError, match="KVM_GET_API_VERSION on /dev/null failed: ENOTTY"):
        Kvm("/dev/null")


def test_closed_objects_raise_kvm_errors(kvm):
    vm = kvm.create_vm()
    vm.add_memory(0, 0, 16 * PAGE_4K)
    vcpu = vm.create_vcpu(0)
    stats = vm.stats
    vm.close()
    vm.close()          # idempotent
    vcpu.close()
    for call in (lambda: vcpu.run(), lambda: vcpu.get_regs(), lambda: vm.read(0, 8), lambda: stats.snapshot(),
                 lambda: stats.read("pages_4k"), lambda: vm.create_vcpu(1)):
        with pytest.raises(KvmError):
            call()


def _vm_with_everything(kvm) -> int:
    """A VM with memory, a vCPU and both stats fds, dropped; returns its memory's address."""
    vm = kvm.create_vm()
    ms = vm.add_memory(0, 0, 16 * PAGE_4K)
    vcpu = vm.create_vcpu(0)
    vm.stats.snapshot()
    vcpu.stats.snapshot()
    return ms.hva


def _mapped(addrs: set[int]) -> set[int]:
    with open("/proc/self/maps") as f:
        starts = {int(line.split("-", 1)[0], 16) for line in f}
    return addrs & starts


def test_dropped_objects_release_their_fds_and_memory(kvm):
    proc = psutil.Process()
    _vm_with_everything(kvm)
    gc.collect()
    fds = proc.num_fds()
    addrs = {_vm_with_everything(kvm) for _ in range(50)}   # never closed
    gc.collect()                       # VM and vCPU refer to each other: a cycle
    assert proc.num_fds() == fds
    assert not _mapped(addrs)
    assert not [m.path for m in proc.memory_maps(grouped=False) if "kvm-vcpu" in m.path]
    for _ in range(20):
        Kvm()
    assert proc.num_fds() == fds       # no cycle: released at once


@pytest.mark.parametrize("size, why", [(4096 + 16, "not a power-of-two number of 16-byte entries"),
                                       (1000, "not a power-of-two"),
                                       (64 * 16, "KVM needs a ring of at least 256 entries")])
def test_a_dirty_ring_kvm_would_refuse_is_a_clear_error_not_einval(kvm, size, why):
    if not (kvm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING) or kvm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)):
        pytest.skip("KVM offers no dirty ring")
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError, match=why) as ei:
            vm.enable_dirty_ring(size)
        assert type(ei.value) is KvmError and vm.dirty_ring_size == 0
        vm.enable_dirty_ring(4096 * 16)     # the VM is still usable
