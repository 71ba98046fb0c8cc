"""The machine-backend interface of the test bed.

A backend boots a prepared kernel + initramfs in some machine (QEMU, Bochs),
runs one command inside, and returns a :class:`BedResult`.  Everything that is
not machine-specific (which modules to load, how module parameters reach
insmod, how the exit status is reported) is shared, so a new backend only has
to know how to start its machine, carry the command in and the results out.

Console protocol, written by the shared init (see :mod:`kvmpy.bed.initramfs`)
so that every backend can parse results from the serial log alone::

    KVMPY-BED: param kvm.tdp_mmu=Y        (effective module parameters)
    KVMPY-BED: ready                      (modules loaded, about to run)
    KVMPY-BED: exit 0                     (exit status of the command)

Writing a backend (e.g. ``kvmpy/bed/bochs.py``): subclass :class:`Backend`,
register it in :data:`BACKENDS`, and in ``run``:

1. build the initramfs with :func:`kvmpy.bed.initramfs.build_initramfs`,
   passing a payload script that runs the command and sets ``$status`` (the
   shared init loads the modules with the request's parameters and prints the
   markers); pass ``params_cmdline(request.params)`` on the kernel command line;
2. start the machine in its own process group, feed console lines to
   ``request.on_console``, kill the group when ``request.timeout`` expires;
3. return ``parse_console(console)`` completed with ``files``, ``kernel_log``,
   ``seconds``, ``boot_seconds``, ``timed_out``, ``error``.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import dataclasses
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

MARKER = "KVMPY-BED:"

# Exit status reported when the harness, not the command, failed.
STATUS_HARNESS_ERROR = 2


class BedError(RuntimeError):
    """The bed could not be set up or run (missing package, bad kernel, ...)."""


@dataclasses.dataclass(frozen=True)
class BedRequest:
    """One boot of the bed: what to run and in which machine configuration.

    ``params`` are module parameters in kernel command-line form, e.g.
    ``{"kvm.tdp_mmu": "N", "kvm_amd.npt": "0"}``; the init passes each one to
    the insmod of its module (and the kernel applies those of built-in code).
    """

    command: Sequence[str]
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    mem: str = "2G"
    smp: int = 2
    timeout: float = 600.0
    # Working directory of the command inside the bed (the host's path: the
    # host's / is the bed's / for backends that share it).
    cwd: Optional[str] = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Called with each console line as it arrives (for --console).
    on_console: Optional[Callable[[str], None]] = None
    # Extra kernel command-line words (besides params and the backend's own).
    append: Sequence[str] = ()
    # hugetlb pages reserved at boot, e.g. {"1G": 1, "2M": 256}: at boot a
    # 1 GiB page is always found; later, memory may be too fragmented.
    hugepages: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BedResult:
    """What came back from one boot.

    ``status`` is the command's exit status inside the bed, or None when the
    command never finished (timeout, crash, boot failure; see ``error``).
    ``files`` maps paths relative to the results directory (``$KVMPY_BED_RESULTS``
    inside) to their contents, e.g. ``{"junit.xml": b"..."}``.
    """

    status: Optional[int]
    console: str
    files: Dict[str, bytes] = dataclasses.field(default_factory=dict)
    params: Dict[str, str] = dataclasses.field(default_factory=dict)
    boot_seconds: Optional[float] = None
    seconds: float = 0.0
    timed_out: bool = False
    error: Optional[str] = None
    # The bed kernel's log (dmesg) at the end of the run, when the backend
    # could bring it back; the matrix scans it for splats.
    kernel_log: str = ""
    # The machine's host pid (already reaped), for logs and tests.
    pid: Optional[int] = None

    @property
    def ok(self) -> bool:
        """True when the command ran and exited 0."""
        return self.status == 0

    @property
    def exit_code(self) -> int:
        """A host exit status: the inside one, or STATUS_HARNESS_ERROR."""
        return self.status if self.status is not None else STATUS_HARNESS_ERROR


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

    @abc.abstractmethod
    def check(self) -> None:
        """Raise BedError (naming the apt package) if a host tool is missing."""

    @abc.abstractmethod
    def run(self, request: BedRequest) -> BedResult:
        """Boot, run ``request.command`` inside, power off; never hang.

        Must kill the machine (by pid, with its process group) once
        ``request.timeout`` expires and leave no temporary files behind.
        """


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
    import importlib

    try:
        module_name, _, cls_name = BACKENDS[name].partition(":")
    except KeyError:
        raise BedError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BedError(f"backend {name} is not available: {exc}") from None
    return getattr(module, cls_name)


_MARKER_RE = re.compile(re.escape(MARKER) + r" (\w+)(?: (.*))?$")


def parse_console(console: str) -> BedResult:
    """Extract status and effective parameters from a console log.

    Returns a partial BedResult (status None if no exit marker was printed).
    Markers may be preceded by other output on the same line (the serial line
    is shared with the kernel), so they are searched anywhere in a line.
    """
    result = BedResult(status=None, console=console)
    for line in console.splitlines():
        idx = line.find(MARKER)
        if idx < 0:
            continue
        m = _MARKER_RE.match(line[idx:].rstrip("\r"))
        if not m:
            continue
        kind, arg = m.group(1), (m.group(2) or "")
        if kind == "exit":
            try:
                result.status = int(arg.strip())
            except ValueError:
                pass
        elif kind == "param" and "=" in arg:
            key, _, value = arg.partition("=")
            result.params[key.strip()] = value.strip()
    return result


def params_cmdline(params: Mapping[str, str]) -> List[str]:
    """Kernel command-line words for module parameters, validated.

    Raises BedError for words the kernel or the init could not route, such
    as a missing module prefix or whitespace in a value.
    """
    words = []
    for key, value in params.items():
        module, dot, name = key.partition(".")
        if not dot or not module or not name:
            raise BedError(f"module parameter {key!r} must look like MODULE.PARAM")
        value = str(value)
        if not value or any(c.isspace() or c in "\"'" for c in value + key):
            raise BedError(f"module parameter {key}={value!r}: empty value, quotes or spaces")
        words.append(f"{module.replace('-', '_')}.{name}={value}")
    return words


def hugepages_cmdline(hugepages: Mapping[str, int]) -> List[str]:
    """Kernel command-line words reserving hugetlb pages at boot."""
    words = []
    for size, count in hugepages.items():
        if size not in ("2M", "1G"):
            raise BedError(f"huge page size {size!r}: x86 has 2M and 1G")
        if int(count) < 0:
            raise BedError(f"huge page count {count!r} is negative")
        words += [f"hugepagesz={size}", f"hugepages={int(count)}"]
    return words


def parse_hugepages(text: str) -> tuple:
    """Parse ``SIZE:COUNT`` (e.g. ``1G:1``) into a (size, count) pair."""
    size, colon, count = text.partition(":")
    if not colon or not count.isdigit():
        raise BedError(f"--hugepages {text!r}: expected SIZE:COUNT, e.g. 1G:1 or 2M:256")
    hugepages_cmdline({size: int(count)})  # validate
    return size, int(count)


def parse_param(text: str) -> tuple:
    """Parse one ``MODULE.PARAM=VALUE`` argument into a (key, value) pair."""
    key, eq, value = text.partition("=")
    if not eq:
        raise BedError(f"--param {text!r}: expected MODULE.PARAM=VALUE")
    params_cmdline({key: value})  # validate
    return key.replace("-", "_"), value


def die_with_parent() -> None:
    """``preexec_fn`` for a machine: SIGKILL it if the harness dies (even by SIGKILL).

    The machine runs in its own session (so a terminal's ^C does not reach it
    before the harness has killed it cleanly); this is what still ties its
    life to ours.
    """
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def exit_on_sigterm():
    """Turn SIGTERM/SIGHUP into SystemExit for the duration, so cleanup runs.

    Python's default SIGTERM action ends the process without running
    ``finally`` blocks, which would leave the machine's temporary directory
    behind (``timeout kvmpy bed ...`` sends SIGTERM).  Handlers the program
    installed itself are left alone; so is everything outside the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    saved = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def results_from_dir(root: Path) -> Dict[str, bytes]:
    """Read every regular file under ``root`` into a {relative path: bytes} map."""
    files: Dict[str, bytes] = {}
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def kernel_splats(result: BedResult) -> Tuple[List[str], List[str]]:
    """(splats while booting, splats from loading KVM on) in a result's kernel log.

    Boot-time splats come from the kernel meeting the emulated CPU before any KVM
    code ran; they are reported, but only the later ones fail a run. A bed that
    crashed brought no kernel log back, so its console (printed at full verbosity
    for an oops or panic) is scanned instead.
    """
    from kvmpy.bed.initramfs import BOOT_DONE
    from kvmpy.selftest.splat import find_splats_in_text

    text = result.kernel_log if result.kernel_log or result.status is not None else result.console
    head, sep, tail = text.partition(BOOT_DONE)
    if not sep:
        return [], find_splats_in_text(text)
    return find_splats_in_text(head), find_splats_in_text(tail)


class ConsoleLog:
    """A machine's console, fed in chunks: whole lines, echoed, with the bed's markers noted.

    ``hide`` is an optional (begin, end) pair of markers whose lines, inclusive,
    are kept but not echoed (e.g. a base64 block of result files).
    """

    def __init__(self, request: BedRequest, start: float, hide: Optional[Tuple[str, str]] = None) -> None:
        self.lines: List[str] = []
        self.boot: Optional[float] = None        # seconds from start to the 'ready' marker
        self.exit_seen_at: Optional[float] = None
        self._pending = ""
        self._start = start
        self._echo = request.on_console
        self._hide = hide
        self._hiding = False

    def feed(self, data: bytes) -> None:
        self._pending += data.decode("utf-8", "replace").replace("\r", "")
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self.lines.append(line)
            if self._hide and self._hide[0] in line:
                self._hiding = True
            if self._echo and not self._hiding:
                self._echo(line)
            if self._hide and self._hide[1] in line:
                self._hiding = False
            if MARKER in line:
                if self.boot is None and line.rstrip().endswith(f"{MARKER} ready"):
                    self.boot = time.monotonic() - self._start
                if f"{MARKER} exit " in line:
                    self.exit_seen_at = time.monotonic()

    def text(self) -> str:
        """Everything received, the unterminated last line included."""
        return "\n".join(self.lines + ([self._pending] if self._pending else [])) + "\n"


def kill_machine(proc: subprocess.Popen) -> None:
    """Stop a machine and everything it started, by its process group; reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    finally:
        if proc.stdout:
            proc.stdout.close()


def settle(result: BedResult, request: BedRequest, start: float, boot: Optional[float], timed_out: bool,
           pid: int, why_no_status: Callable[[], str]) -> BedResult:
    """Fill a result's timing fields and, when no exit status came back, the reason."""
    result.boot_seconds = boot
    result.seconds = time.monotonic() - start
    result.timed_out = timed_out
    result.pid = pid
    if timed_out:
        result.error = f"timed out after {request.timeout:.0f}s"
    elif result.status is None:
        result.error = why_no_status()
    return result
