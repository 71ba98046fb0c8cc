"""Drive a guest pass by pass from the test thread: the one pass-by-pass driver.

Each vCPU runs on its own thread (GuestVm's one vCPU loop) and *parks* at a
GUEST_SYNC: its thread waits there. While every vCPU is parked the VM is
quiescent: the test reads stats and dirty logs, then :meth:`SteppedGuest.release`
writes the next command (guest globals) and lets the vCPUs run their next pass;
:meth:`SteppedGuest.wait_parked` waits for them to park again (:meth:`step` does
both). A driver may also park the vCPUs wherever they are with a kick
(:meth:`park_by_kick`) and handle exits that are not ucalls (``on_exit``).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, NamedTuple

from kvmpy.errors import KvmError
from kvmpy.exits import Exit, InterruptedExit
from kvmpy.guest.vcpu_loop import ExitHook, StopHook, VcpuThreads
from kvmpy.guest.vm import GuestVm

QUIT_TIMEOUT = 60.0   # for the guest to finish after the stop command


class Park(NamedTuple):
    """Where a vCPU parked: at GUEST_SYNC(stage, args...), or stage None when a kick parked it."""

    stage: int | None
    args: tuple = ()


class _VcpuPark:
    def __init__(self) -> None:
        self.parked = threading.Event()
        self.go = threading.Event()
        self.park: Park | None = None
        self.interrupts = 0            # KVM_RUN returns with EINTR (kicks)


class SteppedGuest:
    """Runs ``g``'s vCPUs and parks each at every GUEST_SYNC (of ``park_stage`` only, if given).

    ``stop`` is the command (guest globals) that makes the guest finish, sent by
    :meth:`close`. ``on_exit(vcpu, exit)`` sees the exits that are neither ucalls
    nor kicks (return True when handled); ``on_stop()`` runs when the run starts
    ending and must wake whatever ``on_exit`` blocks on. A vCPU failure is raised on
    the test thread by the next wait (or by :meth:`close`).
    """

    def __init__(self, g: GuestVm, *, stop: dict[str, int], park_stage: int | None = None,
                 on_exit: ExitHook | None = None, on_stop: StopHook | None = None,
                 name: str | None = None) -> None:
        self.g = g
        self.name = name or g.elf.path.stem
        self._stop_cmd = stop
        self._park_stage = park_stage
        self._user_on_exit = on_exit
        self._user_on_stop = on_stop
        self._stopping = threading.Event()   # set by the one vCPU loop when the run starts ending
        self._vcpus = [_VcpuPark() for _ in g.vcpus]
        self._kick_park = False
        self._changed = threading.Condition()
        self._threads: VcpuThreads | None = None
        self._reported = False

    # -- the vCPU side (hooks of the one vCPU loop) -------------------------------------
    def _park(self, i: int, park: Park) -> None:
        st = self._vcpus[i]
        st.park = park
        st.go.clear()
        st.parked.set()
        with self._changed:
            self._changed.notify_all()
        # go is cleared before stopping is checked: a stop after the check sets go (_on_stop).
        if not self.stopping.is_set():
            st.go.wait()

    def _on_sync(self, i: int, stage: int, args: tuple) -> None:
        if self._park_stage is None or stage == self._park_stage:
            self._park(i, Park(stage, args))

    def _on_stop(self) -> None:
        self._stopping.set()
        for st in self._vcpus:   # a parked vCPU returns and its loop sees `stopping`
            st.go.set()
        with self._changed:
            self._changed.notify_all()
        if self._user_on_stop is not None:
            self._user_on_stop()

    def _on_exit(self, i: int, ex: Exit) -> bool:
        if isinstance(ex, InterruptedExit):
            self._vcpus[i].interrupts += 1
            if self._kick_park:
                self._park(i, Park(None))
            return True
        return self._user_on_exit is not None and self._user_on_exit(i, ex)

    # -- the test side ------------------------------------------------------------------
    @property
    def stopping(self) -> threading.Event:
        """Set once the run is ending (a failure or close): blocking hooks must return."""
        return self._stopping

    @property
    def parks(self) -> list[Park | None]:
        """Where each vCPU parked last (valid while it is parked)."""
        return [st.park for st in self._vcpus]

    @property
    def interrupts(self) -> list[int]:
        """How often each vCPU's KVM_RUN returned because of a kick."""
        return [st.interrupts for st in self._vcpus]

    def start(self, timeout: float = 120.0) -> Park:
        """Start the vCPUs and wait until each has parked once; returns vCPU 0's park."""
        self._threads = self.g.start(on_sync=self._on_sync, on_exit=self._on_exit, on_stop=self._on_stop)
        return self.wait_parked(timeout)

    def _started(self, what: str) -> VcpuThreads:
        if self._threads is None:
            raise KvmError(f"{self.name}: {what} before start(): no vCPU runs yet")
        return self._threads

    def check(self) -> None:
        """Raise the first vCPU failure, if any."""
        if self._threads is not None and self._threads.errors:
            self._reported = True
            raise self._threads.errors[0]

    def all_parked(self) -> bool:
        return all(st.parked.is_set() for st in self._vcpus)

    def release(self, cmd: dict[str, int] | None = None) -> None:
        """Write ``cmd`` (guest globals) while every vCPU is parked, then let them all run."""
        self._started("release()")
        if not self.all_parked():
            raise KvmError(f"{self.name}: release() while vCPUs are running")
        for name, value in (cmd or {}).items():
            self.g.write_global(name, value)
        self._kick_park = False
        for st in self._vcpus:
            st.parked.clear()
            st.go.set()

    def wait_parked(self, timeout: float = 600.0, poll: Callable[[], None] | None = None) -> Park:
        """Wait until every vCPU has parked again; returns vCPU 0's park.

        ``poll()``, if given, is called over and over while waiting (e.g. to collect
        a dirty ring that a vCPU needs harvested before it can reach its sync point).
        """
        threads = self._started("wait_parked()")
        deadline = time.monotonic() + timeout
        while not self.all_parked():
            self.check()
            for i, st in enumerate(self._vcpus):
                if not st.parked.is_set() and not threads.alive(i):
                    raise KvmError(f"{self.name}: vCPU {i} finished (GUEST_DONE) instead of parking")
            if time.monotonic() > deadline:
                where = ", ".join(f"vCPU {i}: {'parked' if st.parked.is_set() else 'running'} at {self.g.where(i)}"
                                  for i, st in enumerate(self._vcpus))
                raise KvmError(f"{self.name}: vCPUs did not park within {timeout:g} s ({where})")
            if poll is not None:
                poll()
            else:
                with self._changed:
                    self._changed.wait(0.05)
        self.check()
        return self._vcpus[0].park

    def step(self, cmd: dict[str, int], timeout: float = 600.0) -> Park:
        """Send ``cmd`` to the parked guest and wait for its next park (vCPU 0's)."""
        self._started("step()")
        self.release(cmd)
        return self.wait_parked(timeout)

    def park_by_kick(self) -> None:
        """Kick every vCPU: each parks at its next exit, wherever the guest was (wait_parked next)."""
        self._started("park_by_kick()")
        self._kick_park = True
        for v in self.g.vcpus:
            v.kick()

    def kick_all(self, timeout: float = 1.0, give_up: Callable[[], bool] | None = None) -> None:
        """Kick every running vCPU and wait until each has left KVM_RUN once (it re-enters at once),
        or ``give_up()`` says a vCPU cannot (e.g. it waits for the host in a hook)."""
        self._started("kick_all()")
        before = self.interrupts
        for v in self.g.vcpus:
            v.kick()
        deadline = time.monotonic() + timeout
        for st, n in zip(self._vcpus, before):
            while st.interrupts == n and not (give_up and give_up()) and time.monotonic() < deadline:
                time.sleep(0.0005)

    def close(self) -> None:
        """Send ``stop`` to a guest parked at its sync points and let it finish; stop the vCPUs
        (kick and join), close the VM; re-raise a vCPU failure not raised yet.

        KvmError on a vCPU thread (from a hook): that thread cannot wait for the guest to finish.
        """
        if self._threads is not None:
            self._threads.refuse_on_vcpu_thread(f"{self.name}: close()")
        finished = True
        # Only a guest parked at its sync points reads a command; one parked by a kick is just stopped.
        at_sync = self.all_parked() and all(st.park is not None and st.park.stage is not None for st in self._vcpus)
        try:
            if self._threads is not None and self._threads.running and at_sync and not self._threads.errors:
                self.release(self._stop_cmd)
                finished = self._threads.wait(QUIT_TIMEOUT)
        finally:
            self.g.close()
        if not self._reported:
            self.check()
        if not finished:
            raise KvmError(f"guest {self.name} did not finish within {QUIT_TIMEOUT:g} s of its stop command")

    def __enter__(self) -> "SteppedGuest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
