"""The one vCPU loop: each vCPU of a guest on its own thread, KVM_RUN until GUEST_DONE.

Every exit goes first to the driver's exit hook (``on_exit``, for exits that are
not ucalls: KVM_EXIT_DIRTY_RING_FULL, kicks), then through the one ucall decoder
(:func:`kvmpy.guest.ucall.ucall_of`, port I/O or MMIO transport):

    SYNC       recorded, then ``on_sync(vcpu, stage, args)`` on the vCPU's thread (it
               may block: the vCPU waits there, which is how SteppedGuest parks it)
    PRINTF     logged and recorded, then ``on_print(vcpu, text)``
    DONE       the vCPU's thread ends
    ASSERT     GuestAssertError;  EXCEPTION: GuestExceptionError
    other      GuestCrashError with a register dump (a kick just loops)

A failure on one vCPU stops them all. :meth:`VcpuThreads.stop` (kick every vCPU
until its thread has left KVM_RUN and joined) is the one way threads end early.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from kvmpy.errors import KvmError
from kvmpy.exits import Exit, InterruptedExit
from kvmpy.guest.errors import GuestAssertError, GuestCrashError, GuestError, GuestExceptionError, format_regs
from kvmpy.guest.ucall import (AssertCall, BadUcallError, DoneCall, ExceptionCall, PrintfCall, SyncCall,
                               UcallTransport, ucall_of)
from kvmpy.record import Factory, Record
from kvmpy.x86.physmem import PhysMemory


def _log_print(vcpu: int, text: str) -> None:
    """A guest's printf to the ``kvmpy.guest.vcpu_loop`` logger (INFO). logging is imported on
    the first print: most runs print nothing, and its import is a tenth of kvmpy's start-up."""
    import logging
    logging.getLogger(__name__).info("guest vCPU %d: %s", vcpu, text)


ExitHook = Callable[[int, Exit], bool]      # (vCPU, exit) -> True if handled (the loop runs on)
SyncHook = Callable[[int, int, tuple], None]
PrintHook = Callable[[int, str], None]
StopHook = Callable[[], None]


class RunResult(Record):
    """What a run produced: syncs as (vcpu_id, stage, args), prints as (vcpu_id, text)."""

    syncs: list[tuple[int, int, tuple]] = Factory(list)
    prints: list[tuple[int, str]] = Factory(list)
    elapsed: float = 0.0


class VcpuThreads:
    """Runs ``vcpus`` (one thread each) until each reaches GUEST_DONE, one fails, or :meth:`stop`.

    ``mem`` is where ucalls are read from (the VM), ``symbolize(rip)`` names guest
    code in error messages. Hooks run on the vCPU's thread; an exception a hook
    raises ends the run like a guest failure.
    """

    def __init__(self, vcpus: Sequence, mem: PhysMemory, transport: UcallTransport,
                 symbolize: Callable[[int], str], *, on_sync: SyncHook | None = None,
                 on_print: PrintHook | None = None, on_exit: ExitHook | None = None,
                 on_stop: StopHook | None = None) -> None:
        self.vcpus = list(vcpus)
        self._mem, self._transport, self._symbolize = mem, transport, symbolize
        self._on_sync, self._on_print, self._on_exit, self._on_stop = on_sync, on_print, on_exit, on_stop
        self.stopping = threading.Event()
        self.result = RunResult()
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"kvmpy-vcpu{i}", daemon=True)
                         for i in range(len(self.vcpus))]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def alive(self, i: int) -> bool:
        """Whether vCPU ``i``'s thread is still running (not done, failed or stopped)."""
        return self._threads[i].is_alive()

    def refuse_on_vcpu_thread(self, what: str) -> None:
        """KvmError if the caller runs on one of these vCPU threads (in a hook): ``what`` waits
        for the vCPU threads, so it would wait for itself."""
        if threading.current_thread() in self._threads:
            raise KvmError(f"{what} called on a vCPU thread ({threading.current_thread().name}, from a hook): "
                           "it would wait for itself; raise an exception in the hook to end the run, and call "
                           "it from the test thread")

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _set_stopping(self) -> None:
        with self._lock:
            first = not self.stopping.is_set()
            self.stopping.set()
        if first and self._on_stop is not None:
            self._on_stop()

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            self.errors.append(e)
        self._set_stopping()

    def _loop(self, i: int) -> None:
        vcpu = self.vcpus[i]
        try:
            while not self.stopping.is_set():
                ex = vcpu.run()
                if self._on_exit is not None and self._on_exit(i, ex):
                    continue
                if isinstance(ex, InterruptedExit):
                    continue  # kicked: the loop condition decides
                try:
                    call = ucall_of(ex, self._mem, self._transport)
                except BadUcallError as e:
                    raise BadUcallError(f"vCPU {i}: {e}") from None
                if call is None:
                    raise GuestCrashError(i, ex, format_regs(vcpu))
                if isinstance(call, DoneCall):
                    return
                if isinstance(call, SyncCall):
                    with self._lock:
                        self.result.syncs.append((i, call.stage, call.args))
                    if self._on_sync is not None:
                        self._on_sync(i, call.stage, call.args)
                elif isinstance(call, PrintfCall):
                    text = call.text + (" [truncated]" if call.truncated else "")
                    _log_print(i, text)
                    with self._lock:
                        self.result.prints.append((i, text))
                    if self._on_print is not None:
                        self._on_print(i, text)
                elif isinstance(call, AssertCall):
                    raise GuestAssertError(i, call)
                elif isinstance(call, ExceptionCall):
                    raise GuestExceptionError(i, call, self._symbolize(call.rip))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            if isinstance(e, GuestError):
                e.vcpu_id = i
            self._fail(e)

    def wait(self, timeout: float | None) -> bool:
        """Wait until every thread has ended, a vCPU failed, or ``timeout`` s passed.

        True when every thread has ended (GUEST_DONE, or a failure: see ``errors``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            while t.is_alive() and not self.stopping.is_set():
                remaining = 0.05 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return False
                t.join(min(remaining, 0.05))
            if self.stopping.is_set():
                break
        return not self.running

    def stop(self) -> None:
        """Stop every vCPU now: kick each until its thread has left KVM_RUN and joined.

        KvmError on a vCPU thread (from a hook), which cannot join itself.
        """
        self.refuse_on_vcpu_thread("stop()")
        self._set_stopping()
        for _ in range(100):
            alive = [i for i, t in enumerate(self._threads) if t.is_alive()]
            if not alive:
                return
            for i in alive:
                self.vcpus[i].kick()
            for i in alive:
                self._threads[i].join(0.05)
        names = [t.name for t in self._threads if t.is_alive()]
        raise KvmError(f"vCPU threads {names} did not stop after repeated kicks")
