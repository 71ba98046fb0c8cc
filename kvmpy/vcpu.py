"""A vCPU: register state, MSRs, CPUID, KVM_RUN with typed exits, kicks from other threads."""
from __future__ import annotations

import errno
import functools
import os
import signal
import threading
import time
import weakref
from typing import Callable, Iterable

from kvmpy import exits
from kvmpy.abi import check_unsigned, ffi, ioctl, ioctl_int, lib
from kvmpy.dirty_ring import DirtyRing
from kvmpy.errors import IoctlError, KvmError, release_all
from kvmpy.memory import Mapping, map_memory
from kvmpy.stats import Stats

# A realtime signal whose no-op C handler interrupts KVM_RUN (no SA_RESTART).
KICK_SIGNAL = signal.SIGRTMIN + 1
if lib.kvmpy_install_kick_handler(KICK_SIGNAL) != 0:  # pragma: no cover
    raise OSError(ffi.errno, "cannot install the vCPU kick signal handler")


_run_state = lib.kvmpy_vcpu_run_state
_io_unpack = exits.IO_FIELDS.unpack_from
_io_exit = exits.RunIoExit
_EXIT_IO = lib.KVM_EXIT_IO

_CPUID2 = ffi.typeof("struct kvm_cpuid2 *")


def _cdata_name(value) -> str:
    return repr(ffi.typeof(value).cname) if isinstance(value, ffi.CData) else type(value).__name__


# How long close() kicks a vCPU that another thread is running before it gives up.
STOP_TIMEOUT = 10.0


class Vcpu:
    """A vCPU fd with its mmapped ``struct kvm_run``.

    ``run()`` may be called from any one thread at a time; ``kick()`` and ``close()``
    from any thread. ``close()`` kicks a run in progress and waits for it to return
    before it unmaps anything; after it, ``run()`` raises KvmError and ``kick()`` does
    nothing. A vCPU dropped without ``close()`` releases its fd and mappings when it
    is garbage collected.
    """

    def __init__(self, vcpu_id: int, fd: int, mmap_size: int, dirty_ring_size: int,
                 require_stats: Callable[[], None]) -> None:
        """The vCPU ``vcpu_id`` of fd ``fd`` (from ``Vm.create_vcpu``): ``mmap_size`` bytes of
        kvm_run to map, the VM's dirty-ring size (0: none), and its check for stats fds."""
        self.id = vcpu_id
        self.fd = fd
        self._stats: Stats | None = None
        self._require_stats = require_stats
        self.dirty_ring: DirtyRing | None = None
        self._kicked = False
        self._lock = threading.Lock()
        self._owned = _Owned(fd)
        # atexit=False: at exit a daemon thread may still be in KVM_RUN; the kernel cleans up.
        self._release = weakref.finalize(self, self._owned.release)
        self._release.atexit = False
        what = f"vCPU {vcpu_id}'s kvm_run"
        try:
            self._run_page = self._owned.run = Mapping(map_memory(mmap_size, fd, what=what), what=what)
        except BaseException:
            self._release()
            raise
        # The raw pointer, for the C run state and kicks only: both stop before close() unmaps.
        self._kvm_run = ffi.cast("struct kvm_run *", self._run_page.addr)
        # Who runs the vCPU, and whether close() has begun (kvmpy_vcpu_run_state in _bulk.c).
        self._state = ffi.new("struct kvmpy_vcpu_state *", {"fd": fd, "run": self._kvm_run})
        self._run_bytes = self._run_page.owner_view()     # released (ValueError) when the page is unmapped
        self._exit_page = exits.RunPage(self._run_page)
        if dirty_ring_size:
            try:
                self.dirty_ring = DirtyRing(vcpu_id, fd, dirty_ring_size)
            except BaseException:
                self.close()
                raise
            self._owned.ring = self.dirty_ring.mapping

    @property
    def name(self) -> str:
        return f"vCPU {self.id} (fd {self.fd})"

    def __repr__(self) -> str:
        return f"Vcpu(id={self.id}, fd={self.fd})"

    def get_kvm_run(self):
        """``struct kvm_run *``: an owned copy of the run page as the last run left it (the
        fields the typed exits do not decode). A copy, because a cffi pointer into the page
        (or a field of one) would read unmapped memory after ``close()``; writing it changes
        nothing (``kick()`` sets immediate_exit). KvmError once the vCPU is closed."""
        run = ffi.new("struct kvm_run *")
        ffi.memmove(run, self._run_page.read(0, ffi.sizeof(run[0])), ffi.sizeof(run[0]))
        return run

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
        """KVM_SET_CPUID2 with a ``struct kvm_cpuid2 *`` (e.g. from ``Kvm.supported_cpuid()``)
        whose allocation holds its ``nent`` entries (the kernel reads that many)."""
        if not isinstance(cpuid, ffi.CData) or ffi.typeof(cpuid) is not _CPUID2:
            raise KvmError(f"{self.name}: set_cpuid takes a 'struct kvm_cpuid2 *', not {_cdata_name(cpuid)}")
        need = ffi.sizeof(_CPUID2.item) + cpuid.nent * ffi.sizeof("struct kvm_cpuid_entry2")
        if ffi.sizeof(cpuid[0]) < need:
            raise KvmError(f"{self.name}: set_cpuid: nent = {cpuid.nent} entries need {need} bytes, the struct "
                           f"holds {ffi.sizeof(cpuid[0])} (allocate it with ffi.new('struct kvm_cpuid2 *', "
                           f"{{'nent': n, 'entries': n}}))")
        ioctl(self.fd, "KVM_SET_CPUID2", cpuid, self.name, f"{cpuid.nent} entries")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs; raises KvmError naming the first MSR KVM refused."""
        idx = list(indices)
        msrs = self._msr_buf(len(idx))
        for i, m in enumerate(idx):
            msrs.entries[i].index = check_unsigned(m, 32, f"{self.name}: get_msrs: MSR index")
        n = ioctl(self.fd, "KVM_GET_MSRS", msrs, self.name)
        if n != len(idx):
            raise KvmError(f"{self.name}: KVM_GET_MSRS read {n} of {len(idx)} MSRs; MSR {idx[n]:#x} refused")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        """Write MSRs; raises KvmError naming the first MSR KVM refused."""
        items = list(values.items())
        msrs = self._msr_buf(len(items))
        for i, (m, v) in enumerate(items):
            msrs.entries[i].index = check_unsigned(m, 32, f"{self.name}: set_msrs: MSR index")
            msrs.entries[i].data = check_unsigned(v, 64, f"{self.name}: set_msrs: MSR {m:#x} value")
        n = ioctl(self.fd, "KVM_SET_MSRS", msrs, self.name)
        if n != len(items):
            raise KvmError(f"{self.name}: KVM_SET_MSRS wrote {n} of {len(items)} MSRs; "
                           f"MSR {items[n][0]:#x} = {items[n][1]:#x} refused")

    @staticmethod
    def _msr_buf(n: int):
        return ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})

    # -- running ------------------------------------------------------------------
    def run(self) -> exits.Exit:
        """KVM_RUN once; returns the typed exit. A pending ``kick()`` returns InterruptedExit.

        The ``data`` views of the previous exit are released here (they point into the
        run page, which this run overwrites): using one afterwards raises ValueError.
        """
        # The per-exit path: one C call (kvmpy_vcpu_run_state: the run state's atomics, which
        # keep close() and kicks safe, and KVM_RUN) and one unpack of the exit's fields from
        # the run page (a view, so a page unmapped since reads as ValueError, never a crash).
        r = _run_state(self._state)
        page = self._exit_page
        if page.handed_out:
            page.release()
        try:
            if r == _EXIT_IO:
                return _io_exit(_io_unpack(self._run_bytes, 32), page)
            page.current = None
            if r >= 0:
                return exits.decode_reason(r, self._run_bytes, page)
        except ValueError:      # the run page's view, released by a close() since KVM_RUN returned
            raise KvmError(f"{self.name}: closed by another thread as its run returned") from None
        if r == -errno.EINTR:
            with self._lock:
                return self._consume_kick()
        if r == lib.KVMPY_RUN_BUSY:
            raise KvmError(f"{self.name}: already running on thread {lib.kvmpy_vcpu_runner(self._state)}")
        if r == lib.KVMPY_RUN_CLOSED:
            raise KvmError(f"{self.name}: run() on a closed vCPU")
        raise IoctlError("KVM_RUN", -r, self.name)

    def _consume_kick(self) -> exits.Exit:
        self._kicked = False
        if self._kvm_run is not None:       # None: closed since (the page is gone)
            self._kvm_run.immediate_exit = 0
        return exits.InterruptedExit(lib.KVM_EXIT_INTR)

    def kick(self) -> None:
        """Make the current or next ``run()`` return InterruptedExit promptly (any thread).

        Kicking a closed vCPU does nothing: it cannot run any more.
        """
        with self._lock:
            if not self._release.alive:
                return
            self._kicked = True
            # immediate_exit covers the window before the thread enters KVM_RUN;
            # the signal covers a thread already inside it (kvmpy_vcpu_kick orders the two).
            tid = lib.kvmpy_vcpu_kick(self._state)
        if tid:
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    @property
    def stats(self) -> Stats:
        """The vCPU's binary stats, opened on first use."""
        if self._stats is None:
            self._require_stats()
            fd = ioctl_int(self.fd, "KVM_GET_STATS_FD", 0, self.name)
            self._stats = self._owned.stats = Stats(fd, self.name)
        return self._stats

    def _stop(self) -> None:
        """Refuse new runs, then kick a run in progress on another thread until it returns.

        KvmError (and nothing released) if it is still in KVM_RUN after STOP_TIMEOUT s.
        """
        timeout = STOP_TIMEOUT
        deadline = time.monotonic() + timeout
        if lib.kvmpy_vcpu_stop_runs(self._state) == threading.get_ident():
            raise KvmError(f"{self.name}: close() from inside its own run()")
        kicked = 0.0
        while lib.kvmpy_vcpu_runner(self._state):
            now = time.monotonic()
            if now > deadline:
                raise KvmError(f"{self.name} is still in KVM_RUN on thread {lib.kvmpy_vcpu_runner(self._state)} "
                               f"after {timeout:g} s of kicks: not closed")
            if now - kicked > 0.1:
                self.kick()
                kicked = now
            time.sleep(0.0005)

    def close(self) -> None:
        """Stop a run in progress (see ``run``), then close the stats fd, unmap the dirty ring
        and kvm_run, and close the vCPU fd. Idempotent."""
        if not self._release.alive:
            return
        self._stop()
        with self._lock:
            if not self._release.alive:     # closed by another thread meanwhile
                return
            self.fd = -1                    # first: the number may be reused once closed
            self._kvm_run = None
            self.dirty_ring = None
            self._stats = None
            self._release()


class _Owned:
    """What a vCPU owns, released once (by ``Vcpu.close`` or when the vCPU is collected).

    It holds no reference to the vCPU, so that the vCPU can be collected.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.run: Mapping | None = None
        self.ring: Mapping | None = None
        self.stats: Stats | None = None

    def release(self) -> None:
        release_all(*[part.close for part in (self.stats, self.ring, self.run) if part is not None],
                    functools.partial(os.close, self.fd))
