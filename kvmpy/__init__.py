"""kvmpy: drive Linux KVM through /dev/kvm ioctls, for KVM MMU selftests.

One home per concept, in layers; a module imports only from its own layer or
those listed before it (tests/test_structure.py checks there is no import cycle):

    errors, abi       the exception types (all KvmError); the cffi binding, ioctl helpers
                      (checked, and unchecked for tests that expect an errno), with the bulk
                      work in C (_bulk.c: dirty-ring harvest, bitmaps, stats, page tables)
    faults            named faults injected on purpose (KVMPY_FAULTS) to test the tests
    bed_mark, child   in_bed() (the bed's own marks); die_with_parent(sig) for child processes
    hostmem           the host's memory from /proc and sysfs: MemAvailable, THP mode, hugetlb pools
    kernel objects    kvm (/dev/kvm), vm (VM fd: memslots, dirty log, dirty ring), vcpu
                      (KVM_RUN, kicks), dirty_ring (a vCPU's ring), exits, stats (and
                      stats_layout, the fd's format; Stats.snapshot in _stats_snapshot.c), bitmap,
                      memory (backings, and the page sizes PAGE_4K/2M/1G)
    x86/              page tables, descriptor tables, CPUID, long-mode vCPU setup
    guest/            guest programs: ELF, ucall, GuestVm, the one vCPU loop, SteppedGuest
    dirtylog/         the page-exact dirty-log checker, a collector per mode, the writer
    perf/             `kvmpy perf`: the memstress VM and the dirty-log phases
    hostinfo          host facts and the require_* checks behind the selftest fixtures
    selftest/, bed/   pytest plugins and the report; the nested test bed; cli
"""
from kvmpy.errors import IoctlError, KvmError, RequirementError
from kvmpy.kvm import Kvm
from kvmpy.memory import Anonymous, Hugetlb, Memslot, SharedMemfd, Thp
from kvmpy.vcpu import Vcpu
from kvmpy.vm import Vm

__all__ = [
    "Kvm", "Vm", "Vcpu", "Memslot", "Anonymous", "Thp", "Hugetlb", "SharedMemfd",
    "KvmError", "IoctlError", "RequirementError",
]
__version__ = "0.1.0"
