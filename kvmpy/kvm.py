"""The KVM system fd (/dev/kvm): API version, capabilities, CPUID and MSR lists, VM creation."""
from __future__ import annotations

import errno
import os
import weakref

from kvmpy.abi import cap_name, ffi, ioctl, ioctl_int, lib, require_cap
from kvmpy.errors import IoctlError, KvmError, RequirementError
from kvmpy.vm import Vm

DEFAULT_PATH = "/dev/kvm"


class Kvm:
    """An open /dev/kvm. Use as a context manager or call ``close()`` (or drop it: the fd
    is closed when the object is garbage collected)."""

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RequirementError(f"{path} does not exist: KVM is not available on this host") from None
        except PermissionError:
            raise RequirementError(f"{path}: permission denied (run as root or join the kvm group)") from None
        except OSError as e:
            raise KvmError(f"{path}: cannot open it as the KVM device: {e.strerror}") from None
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        self._close_fd.atexit = False
        try:
            self.api_version = ioctl_int(self.fd, "KVM_GET_API_VERSION", 0, path)
            if self.api_version != lib.KVM_API_VERSION:
                raise KvmError(f"{path}: KVM API version {self.api_version}, expected {lib.KVM_API_VERSION}")
            self.vcpu_mmap_size = ioctl_int(self.fd, "KVM_GET_VCPU_MMAP_SIZE", 0, path)
        except BaseException:
            self.close()
            raise
        self._cpuid_cache: tuple[int, bytes] | None = None   # (nent, the struct's bytes)

    def __repr__(self) -> str:
        return f"Kvm({self.path!r}, fd={self.fd})"

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd: 0 when absent, else a cap-specific value."""
        return ioctl_int(self.fd, "KVM_CHECK_EXTENSION", cap, self.path, cap_name(cap))

    def require_extension(self, cap: int, why: str = "") -> int:
        """Like ``check_extension`` but raises RequirementError naming the capability when it is 0."""
        return require_cap(self.check_extension(cap), cap, why)

    def supported_cpuid(self):
        """A fresh ``struct kvm_cpuid2 *`` with KVM_GET_SUPPORTED_CPUID (copy: safe to edit)."""
        if self._cpuid_cache is None:
            nent = 64
            while True:
                cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
                try:
                    ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid, self.path)
                    break
                except IoctlError as e:
                    if e.errno != errno.E2BIG or nent >= 4096:
                        raise
                    nent *= 2
            size = ffi.sizeof("struct kvm_cpuid2") + cpuid.nent * ffi.sizeof("struct kvm_cpuid_entry2")
            self._cpuid_cache = (cpuid.nent, bytes(ffi.buffer(cpuid, size)))
        nent, raw = self._cpuid_cache
        # An owning struct sized for its entries (ffi.sizeof(p[0]) says how many it holds).
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
        ffi.memmove(cpuid, raw, len(raw))
        return cpuid

    def _msr_list(self, name: str) -> list[int]:
        probe = ffi.new("struct kvm_msr_list *")
        try:
            ioctl(self.fd, name, probe, self.path)
        except IoctlError as e:
            if e.errno != errno.E2BIG:
                raise
        n = probe.nmsrs
        lst = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        ioctl(self.fd, name, lst, self.path)
        return [lst.indices[i] for i in range(lst.nmsrs)]

    def msr_index_list(self) -> list[int]:
        """MSRs KVM saves/restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        return self._msr_list("KVM_GET_MSR_INDEX_LIST")

    def msr_feature_index_list(self) -> list[int]:
        """Feature MSRs readable on the system fd (needs KVM_CAP_GET_MSR_FEATURES)."""
        self.require_extension(lib.KVM_CAP_GET_MSR_FEATURES)
        return self._msr_list("KVM_GET_MSR_FEATURE_INDEX_LIST")

    def vm_types(self) -> list[int]:
        """VM types accepted by KVM_CREATE_VM (from KVM_CAP_VM_TYPES; [0] on older kernels)."""
        mask = self.check_extension(lib.KVM_CAP_VM_TYPES)
        if not mask:
            return [lib.KVM_X86_DEFAULT_VM]
        return [t for t in range(32) if mask & (1 << t)]

    def create_vm(self, vm_type: int = 0) -> Vm:
        """Create a VM (KVM_CREATE_VM)."""
        fd = ioctl_int(self.fd, "KVM_CREATE_VM", vm_type, self.path, f"type {vm_type}")
        try:
            return Vm(fd, self.vcpu_mmap_size, vm_type)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Close /dev/kvm (VMs created from it stay usable). Idempotent."""
        self._close_fd()
        self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

