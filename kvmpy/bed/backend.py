"""The machine-backend interface of the test bed, and the registry of backends.

A backend boots a prepared kernel + initramfs in some machine (QEMU, Bochs),
runs one command inside, and returns a :class:`~kvmpy.bed.request.BedResult`.
Everything that is not machine-specific (which modules to load, how module
parameters reach insmod, how the exit status and facts are reported, the job
script, safe result files) is shared, so a new backend only has to know how
to start its machine, carry the command in and the results out.

Writing a backend (e.g. ``kvmpy/bed/bochs.py``): subclass :class:`Backend`,
register it in :data:`BACKENDS`, and in ``run``:

1. build the initramfs with :func:`kvmpy.bed.initramfs.build_initramfs`,
   passing a payload script that runs :func:`kvmpy.bed.job.job_script` and sets
   ``$status`` (the shared init loads the modules with the request's
   parameters and prints the markers of :mod:`kvmpy.bed.protocol`); pass
   ``params_cmdline(request.params)`` on the kernel command line;
2. start the machine with the helpers of :mod:`kvmpy.bed.machine` (own process
   group, dies with the harness), feed console lines to ``request.on_console``,
   kill the group when ``request.timeout`` expires;
3. bring the result files back through :mod:`kvmpy.bed.results` and return
   ``settle(parse_console(console), ..., self.machine_facts(), ...)``.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Set, Tuple

from kvmpy.bed.kernel import Kernel
from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import BedFacts, BedRequest, BedResult
from kvmpy.stop import stop_signals_deferred


class Backend(abc.ABC):
    """A machine that can boot the bed's kernel and initramfs.

    Backends are constructed as ``cls(kernel, **options)`` with a
    :class:`kvmpy.bed.kernel.Kernel`; options are backend-specific (QEMU
    takes ``accel``) and unknown ones must be rejected with BedError.
    """

    #: Name used by ``--backend``.
    name: str = ""
    #: CPU vendor the guest sees ("amd" or "intel"); picks the matrix.
    vendor: str = ""
    #: Debian kernel line used when the user names none.
    default_kernel_line: str = "6.12"
    #: Seconds of ``request.timeout`` (counted from the emulator's start) that the command's own
    #: timeout inside leaves free (:func:`inner_timeout`): the boot before the command starts, and
    #: bringing the results back and powering off after it ends, on a loaded host too.
    headroom: float = 90.0

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    @classmethod
    def cpu_vendor(cls, accel: str = "tcg") -> str:
        """The CPU vendor the guest will see with ``accel`` (known before any kernel is)."""
        return cls.vendor

    @abc.abstractmethod
    def check(self) -> None:
        """Raise BedError (naming the apt package) if a host tool is missing."""

    @abc.abstractmethod
    def run(self, request: BedRequest) -> BedResult:
        """Boot, run ``request.command`` inside, power off; never hang.

        Must kill the machine (by pid, with its process group) once
        ``request.timeout`` expires and leave no temporary files behind.
        """

    def inner_timeout(self, timeout: float) -> int:
        """The command's own timeout inside for a boot of ``timeout`` seconds (see :attr:`headroom`)."""
        return inner_timeout(timeout, self.headroom)

    def machine_facts(self) -> BedFacts:
        """What the host knows of this machine (backend, CPU, kernel image)."""
        return BedFacts(backend=self.name, kernel=self.kernel.release, kernel_origin=self.kernel.origin)


def _proc_stat(pid: str) -> Optional[Tuple[str, int, int]]:
    """(state, ppid, session id) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[1]), int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


def wrapped_sessions(script_pid: int, cwd: Path) -> Set[Tuple[str, int]]:
    """What a wrapper such as ``script`` (``script_pid``) started for a boot: its children, and
    (even once reparented) the processes whose command line names the boot's own directory ``cwd``.

    ``script`` setsid()s its command, so the emulator is in a session of its own that killing the
    wrapper's process group does not reach. ("session", sid) for those that lead their session
    (the whole session is the emulator's), ("pid", pid) for any other: a session whose leader is
    not ours (a user's shell looking at the directory, say) is left alone.
    """
    marker = os.fsencode(f"{cwd}/")
    own = os.getsid(0)
    found: Set[Tuple[str, int]] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        stat = _proc_stat(name)
        if stat is None or stat[0] == "Z" or stat[2] in (own, 0):
            continue
        if stat[1] != script_pid:
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker not in f.read():
                        continue
            except OSError:
                continue
        pid = int(name)
        found.add(("session", pid) if stat[2] == pid else ("pid", pid))
    return found


def kill_sessions(found: Set[Tuple[str, int]], wait: float = 30.0) -> None:
    """SIGKILL what :func:`wrapped_sessions` found (every process of a session it leads) and wait,
    up to ``wait`` seconds, until it is gone (reparented, it is not ours to reap)."""
    if not found:
        return
    sessions = {n for kind, n in found if kind == "session"}
    pids = {n for kind, n in found if kind == "pid"}
    end = time.monotonic() + wait
    while True:
        alive = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                stat = _proc_stat(name)
                if stat is not None and stat[0] != "Z" and (stat[2] in sessions or int(name) in pids):
                    alive.append(int(name))
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not alive or time.monotonic() > end:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def boot_dir(prefix: str) -> Iterator[Path]:
    """A boot's temporary directory, removed on every way out: a stop signal arriving while it is
    removed (a second Ctrl-C during the cleanup of the first) is acted on once it is gone."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        with stop_signals_deferred():
            shutil.rmtree(path, ignore_errors=True)


def inner_timeout(timeout: float, headroom: float) -> int:
    """The command's own timeout inside: ``timeout`` less ``headroom`` (at most half of it, so
    that a short timeout still runs the command; a boot too short for its machine times out)."""
    return max(1, int(timeout - min(headroom, timeout * 0.5)))


#: Backend name -> "module:Class"; imported lazily so a backend's host tools
#: are only needed when it is chosen.
BACKENDS = {
    "qemu": "kvmpy.bed.qemu:QemuBackend",
    "bochs": "kvmpy.bed.bochs:BochsBackend",
}
#: --vendor -> backend: TCG gives AMD SVM, Bochs gives Intel VMX.
VENDOR_BACKENDS = {"amd": "qemu", "intel": "bochs"}


def backend_class(name: str) -> type:
    """The Backend subclass registered as ``name``."""
    try:
        module_name, _, cls_name = BACKENDS[name].partition(":")
    except KeyError:
        raise BedError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BedError(f"backend {name} is not available: {exc}") from None
    return getattr(module, cls_name)
