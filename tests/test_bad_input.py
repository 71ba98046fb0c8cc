"""Bad input gets kvmpy's own errors, and dropped objects give back their fds (issue 13 item 6)."""
from __future__ import annotations

import gc

import psutil
import pytest

from kvmpy import IoctlError, Kvm, KvmError
from kvmpy.abi import lib
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
], ids=["slot -1", "slot 2**32", "gpa -4K", "vcpu -1", "vcpu 2**40", "tss -1", "identity map -1",
        "cap arg -1", "cap 5 args", "dirty log slot -1", "write_u64 -1", "view length -1", "read gpa -4K"])
def test_out_of_range_numbers_are_kvm_errors(kvm, call):
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0, 16 * PAGE_4K)
        with pytest.raises(KvmError) as ei:
            call(vm)
        assert type(ei.value) in (KvmError, IoctlError)
        # The VM is still usable: nothing was half done.
        vm.write(0, b"ok")
        assert vm.read(0, 2) == b"ok" and sorted(vm.memslots) == [0]


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
