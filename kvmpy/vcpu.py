"""A vCPU: register state, MSRs, CPUID, KVM_RUN with typed exits, kicks from other threads."""
from __future__ import annotations

import errno
import os
import signal
import threading
from typing import TYPE_CHECKING, Iterable

from kvmpy import exits
from kvmpy.abi import ffi, ioctl, ioctl_int, lib
from kvmpy.dirty_ring import DirtyRing
from kvmpy.errors import IoctlError, KvmError
from kvmpy.memory import mmap
from kvmpy.stats import Stats

if TYPE_CHECKING:
    from kvmpy.vm import Vm

# A realtime signal whose no-op C handler interrupts KVM_RUN (no SA_RESTART).
KICK_SIGNAL = signal.SIGRTMIN + 1
if lib.kvmpy_install_kick_handler(KICK_SIGNAL) != 0:  # pragma: no cover
    raise OSError(ffi.errno, "cannot install the vCPU kick signal handler")


class Vcpu:
    """A vCPU fd with its mmapped ``struct kvm_run``."""

    def __init__(self, vm: "Vm", vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._stats: Stats | None = None
        self.dirty_ring: DirtyRing | None = None
        self._run_thread: int | None = None
        self._kicked = False
        self._lock = threading.Lock()
        size = vm.kvm.vcpu_mmap_size
        try:
            p = ffi.cast("void *", mmap(size, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, fd,
                                        what=f"vCPU {vcpu_id}'s kvm_run"))
        except KvmError:
            os.close(fd)
            raise
        self._run_addr, self._run_size = p, size
        self.run_struct = ffi.cast("struct kvm_run *", p)
        self._run_buf = memoryview(ffi.buffer(p, size))
        if vm.dirty_ring_size:
            try:
                self.dirty_ring = DirtyRing(self, vm.dirty_ring_size)
            except BaseException:
                self.close()
                raise

    @property
    def name(self) -> str:
        return f"vCPU {self.id} (fd {self.fd})"

    def __repr__(self) -> str:
        return f"Vcpu(id={self.id}, fd={self.fd})"

    def _get(self, ioctl_name: str, ctype: str):
        obj = ffi.new(ctype)
        ioctl(self.fd, ioctl_name, obj, self.name)
        return obj

    def get_regs(self):
        """``struct kvm_regs *`` (an owned copy)."""
        return self._get("KVM_GET_REGS", "struct kvm_regs *")

    def set_regs(self, regs) -> None:
        ioctl(self.fd, "KVM_SET_REGS", regs, self.name)

    def get_sregs(self):
        """``struct kvm_sregs *`` (an owned copy)."""
        return self._get("KVM_GET_SREGS", "struct kvm_sregs *")

    def set_sregs(self, sregs) -> None:
        ioctl(self.fd, "KVM_SET_SREGS", sregs, self.name)

    def get_fpu(self):
        return self._get("KVM_GET_FPU", "struct kvm_fpu *")

    def set_fpu(self, fpu) -> None:
        ioctl(self.fd, "KVM_SET_FPU", fpu, self.name)

    def get_xsave(self):
        return self._get("KVM_GET_XSAVE", "struct kvm_xsave *")

    def set_xsave(self, xsave) -> None:
        ioctl(self.fd, "KVM_SET_XSAVE", xsave, self.name)

    def set_cpuid(self, cpuid) -> None:
        """KVM_SET_CPUID2 with a ``struct kvm_cpuid2 *`` (e.g. from ``Kvm.supported_cpuid()``)."""
        ioctl(self.fd, "KVM_SET_CPUID2", cpuid, self.name, f"{cpuid.nent} entries")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs; raises KvmError naming the first MSR KVM refused."""
        idx = list(indices)
        msrs = self._msr_buf(len(idx))
        for i, m in enumerate(idx):
            msrs.entries[i].index = m
        n = ioctl(self.fd, "KVM_GET_MSRS", msrs, self.name)
        if n != len(idx):
            raise KvmError(f"{self.name}: KVM_GET_MSRS read {n} of {len(idx)} MSRs; MSR {idx[n]:#x} refused")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        """Write MSRs; raises KvmError naming the first MSR KVM refused."""
        items = list(values.items())
        msrs = self._msr_buf(len(items))
        for i, (m, v) in enumerate(items):
            msrs.entries[i].index = m
            msrs.entries[i].data = v
        n = ioctl(self.fd, "KVM_SET_MSRS", msrs, self.name)
        if n != len(items):
            raise KvmError(f"{self.name}: KVM_SET_MSRS wrote {n} of {len(items)} MSRs; "
                           f"MSR {items[n][0]:#x} = {items[n][1]:#x} refused")

    @staticmethod
    def _msr_buf(n: int):
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + n * ffi.sizeof("struct kvm_msr_entry"))
        msrs = ffi.cast("struct kvm_msrs *", buf)
        msrs.nmsrs = n
        return ffi.gc(msrs, lambda _p, _b=buf: None)

    # -- running ------------------------------------------------------------------
    def run(self) -> exits.Exit:
        """KVM_RUN once; returns the typed exit. A pending ``kick()`` returns InterruptedExit."""
        with self._lock:
            if self._kicked:
                return self._consume_kick()
            self._run_thread = threading.get_ident()
        ret = lib.kvmpy_vcpu_run(self.fd)
        err = ffi.errno
        with self._lock:
            self._run_thread = None
            if ret < 0 and err == errno.EINTR:
                return self._consume_kick()
        if ret < 0:
            raise IoctlError("KVM_RUN", err, self.name)
        return exits.decode(self.run_struct, self._run_buf)

    def _consume_kick(self) -> exits.Exit:
        self._kicked = False
        self.run_struct.immediate_exit = 0
        return exits.InterruptedExit(lib.KVM_EXIT_INTR)

    def kick(self) -> None:
        """Make the current or next ``run()`` return InterruptedExit promptly (any thread)."""
        with self._lock:
            self._kicked = True
            # immediate_exit covers the window before the thread enters KVM_RUN;
            # the signal covers a thread already inside it.
            self.run_struct.immediate_exit = 1
            tid = self._run_thread
        if tid is not None:
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    @property
    def stats(self) -> Stats:
        """The vCPU's binary stats, opened on first use."""
        if self._stats is None:
            self.vm.require_extension(lib.KVM_CAP_BINARY_STATS_FD)
            fd = ioctl_int(self.fd, "KVM_GET_STATS_FD", 0, self.name)
            self._stats = Stats(fd, self.name)
        return self._stats

    def close(self) -> None:
        if self.dirty_ring is not None:
            self.dirty_ring.close()
            self.dirty_ring = None
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self._run_addr is not None:
            self._run_buf.release()
            lib.kvmpy_munmap(self._run_addr, self._run_size)
            self._run_addr = None
            self.run_struct = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
