"""kvmpy: drive Linux KVM through /dev/kvm ioctls, for KVM MMU selftests."""
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
