"""Drive a guest pass by pass from the test thread.

The guest runs on its own thread; at every GUEST_SYNC it parks, the test reads
stats and dirty logs of a quiescent VM, then sends the next command (guest
globals to write) and the guest runs its next pass.
"""
from __future__ import annotations

import queue
import threading

from kvmpy.errors import KvmError
from kvmpy.guest.runner import GuestVm


class SteppedGuest:
    """Runs ``g`` on a thread; ``step(cmd)`` writes ``cmd``'s globals and waits for the next park.

    ``stop`` is the command that makes the guest finish (used by ``close``).
    """

    def __init__(self, g: GuestVm, name: str, stop: dict[str, int], timeout: float = 900.0) -> None:
        self.g = g
        self.name = name
        self._stop = stop
        self._timeout = timeout
        self._cmds: queue.Queue = queue.Queue()
        self._parked: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._reported = False
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 120.0) -> tuple[int, tuple]:
        """Start the guest and wait for its first park; returns (stage, args) of that sync."""
        self._thread = threading.Thread(target=self._run, name=f"stepped-{self.name}", daemon=True)
        self._thread.start()
        return self._wait(timeout)

    def _run(self) -> None:
        try:
            self.g.run(timeout=self._timeout, on_sync=self._hook)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self._error = e
        finally:
            self._parked.put(None)

    def _hook(self, vcpu_id: int, stage: int, args: tuple) -> None:
        self._parked.put((stage, args))
        for name, value in self._cmds.get().items():
            self.g.write_global(name, value)

    def _wait(self, timeout: float) -> tuple[int, tuple]:
        try:
            got = self._parked.get(timeout=timeout)
        except queue.Empty:
            raise KvmError(f"guest {self.name} did not park again within {timeout:g} s") from None
        if got is None:
            self._reported = True
            raise KvmError(f"guest {self.name} stopped: {self._error!r}") from self._error
        return got

    def step(self, cmd: dict[str, int], timeout: float = 600.0) -> tuple[int, tuple]:
        """Send ``cmd`` (guest globals) to the parked guest; wait for its next park."""
        self._cmds.put(cmd)
        return self._wait(timeout)

    def close(self) -> None:
        """Stop the guest (sending ``stop``), join its thread, close the VM; re-raise a guest error."""
        t = self._thread
        if t is not None and t.is_alive():
            self._cmds.put(self._stop)
            t.join(60)
            if t.is_alive():
                raise KvmError(f"guest {self.name} runner thread did not stop")
        self.g.close()
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error
