"""One boot of the bed: what to run (:class:`Job`, :class:`BedRequest`), what came back
(:class:`BedResult` with its :class:`BedFacts`), and how module parameters and
huge pages are written on the kernel command line.

These are plain values, shared by every backend and by the matrix; parsing a
console log (:func:`parse_console`) and scanning a kernel log for splats
(:func:`kernel_splats`) turn a machine's output into them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from kvmpy.bed.protocol import BOOT_DONE, MARKER, STATUS_HARNESS_ERROR, BedError, marker_reader
from kvmpy.bed_mark import CMDLINE_WORD
from kvmpy.kernel_log import find_splats_in_text
from kvmpy.mmu_params import TDP_PARAM, flavour_of


@dataclasses.dataclass(frozen=True)
class Job:
    """What to run inside the bed, whatever the machine.

    ``cwd`` is the command's working directory inside (a host path: the
    bed sees the host's files at their host paths); ``env`` is added to the
    bed's environment; ``on_console`` is called with each console line as it
    arrives; ``append`` adds kernel command-line words; ``follow`` names
    files in ``$KVMPY_BED_RESULTS`` that come back even from a machine that
    never finishes (stopped, or past its timeout): what they held when it
    ended (a backend without a shared directory sends their lines over the
    console as they are written). ``carry`` names host files the command
    reads besides the kvmpy checkout and ``cwd`` (a backend that cannot share
    the host's ``/`` copies them in, at the same paths).
    """

    command: Sequence[str]
    cwd: Optional[str] = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    on_console: Optional[Callable[[str], None]] = None
    append: Sequence[str] = ()
    follow: Sequence[str] = ()
    carry: Sequence[str] = ()

    def __post_init__(self) -> None:
        check_follow(self.follow)


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
    # Results files (plain names) to bring back even from a machine that never finishes (Job.follow).
    follow: Sequence[str] = ()
    # Host files to copy in where the host's / is not shared (Job.carry).
    carry: Sequence[str] = ()

    def __post_init__(self) -> None:
        check_follow(self.follow)


def check_follow(names: Sequence[str]) -> None:
    """BedError unless every name is a plain results file name (they go into the bed's shell script)."""
    for name in names:
        if not _FILE_NAME_RE.fullmatch(name):
            raise BedError(f"cannot follow {name!r}: a results file to follow is a plain file name "
                           "(letters, digits, '.', '_', '-'; not starting with '.')")


#: The module parameters a one-line summary shows: what decides the MMU under test.
SUMMARY_PARAMS = ("kvm_amd.nested", "kvm_amd.npt", "kvm_intel.nested", "kvm_intel.ept",
                  "kvm.tdp_mmu", "kvm.eager_page_split", "kvm.nx_huge_pages")


@dataclasses.dataclass
class BedFacts:
    """What the bed was: the machine (from the host) and what its kernel reported.

    ``hugepages`` maps a pool (``"2M"``, ``"1G"``) to its page count inside;
    ``params`` holds the effective parameters of kvm and the vendor module.
    """

    backend: str = ""
    accel: str = ""          # QEMU's accelerator ("tcg", "kvm"); "" for Bochs
    cpu: str = ""            # the CPU the machine was told to emulate
    cpu_model: str = ""      # /proc/cpuinfo's "model name" inside
    kernel: str = ""         # release: uname -r inside, else the image's
    kernel_origin: str = ""  # "debian:<package>" or "user:<bzImage>"
    vendor_module: str = ""  # "kvm_amd" or "kvm_intel" as loaded inside; "" if none
    params: Dict[str, str] = dataclasses.field(default_factory=dict)
    hugepages: Dict[str, int] = dataclasses.field(default_factory=dict)

    def complete(self, machine: "BedFacts") -> None:
        """Fill the fields the console did not give from the machine's own facts."""
        for field in dataclasses.fields(self):
            if not getattr(self, field.name):
                setattr(self, field.name, getattr(machine, field.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line for logs: machine, kernel, the MMU-relevant parameters, hugetlb pools."""
        machine = self.backend + (f"/{self.accel}" if self.accel else "")
        cpu = ": ".join(c for c in (self.cpu, self.cpu_model) if c)
        if cpu:
            machine += f" ({cpu})"
        shown = [f"{key}={self.params[key]}" for key in SUMMARY_PARAMS if key in self.params]
        pools = " ".join(f"{size}:{n}" for size, n in sorted(self.hugepages.items())) or "none"
        mmu = self.mmu()
        return (f"{machine}, kernel {self.kernel or '?'}, {self.vendor_module or 'no vendor module'}"
                f"{' ' + ' '.join(shown) if shown else ''}, hugepages {pools}{', MMU: ' + mmu if mmu else ''}")

    def mmu(self) -> str:
        """The MMU these parameters give a VM, e.g. "TDP MMU" ("" if they do not say): the
        parameters alone can mislead (6.1 reports kvm.tdp_mmu=Y with kvm_amd.npt=0, shadow paging)."""
        def of(module: str) -> Dict[str, str]:
            return {k[len(module) + 1:]: v for k, v in self.params.items() if k.startswith(module + ".")}
        if not self.vendor_module:
            return ""
        vendor = of(self.vendor_module)
        tdp_param = TDP_PARAM.get(self.vendor_module)
        if tdp_param and tdp_param not in vendor:     # not reported: TDP on or off is unknown
            return ""
        return flavour_of(self.vendor_module, of("kvm"), vendor).name


@dataclasses.dataclass
class BedResult:
    """What came back from one boot.

    ``status`` is the command's exit status inside the bed, or None when the
    command never finished (timeout, crash, boot failure; see ``error``).
    ``files`` maps paths relative to the results directory (``$KVMPY_BED_RESULTS``
    inside) to their contents, e.g. ``{"junit.xml": b"..."}``; ``dropped`` names
    the files that were not brought back and why (links, devices, names
    leaving the directory, sizes over the bound).
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
    facts: BedFacts = dataclasses.field(default_factory=BedFacts)
    dropped: List[str] = dataclasses.field(default_factory=list)
    # What the bed's init said went wrong (``KVMPY-BED: error ...``: a module that would not
    # load, a mount that failed): the bed was not what was asked for.
    bed_errors: List[str] = dataclasses.field(default_factory=list)
    # How much of the console was not kept (ConsoleText.dropped), None if nothing.
    console_dropped: Optional[str] = None

    @property
    def kvm_missing(self) -> bool:
        """The command finished, but no KVM vendor module (kvm_amd, kvm_intel) was loaded:
        whatever it tested, it was not KVM."""
        return self.status is not None and not self.facts.vendor_module

    @property
    def bed_problems(self) -> List[str]:
        """Why this boot tested nothing trustworthy, whatever its exit status (empty if none):
        a timeout, an error the init reported, no KVM vendor module, console output not kept
        (unscanned for splats). Any of them makes the boot an error (ERROR, exit status 2),
        never a pass."""
        problems = []
        if self.timed_out:
            problems.append(self.error or "timed out")
        problems += [f"bed error: {e}" for e in self.bed_errors]
        if self.console_dropped:
            problems.append(self.console_dropped)
        if self.kvm_missing:
            problems.append("no KVM vendor module (kvm_amd or kvm_intel) was loaded in the bed")
        return problems

    @property
    def ok(self) -> bool:
        """True when the command ran and exited 0."""
        return self.status == 0

    @property
    def exit_code(self) -> int:
        """A host exit status: the inside one, or STATUS_HARNESS_ERROR."""
        return self.status if self.status is not None else STATUS_HARNESS_ERROR


_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _pool_name(text: str) -> str:
    """``2048kB`` -> ``2M``, ``1048576kB`` -> ``1G`` (sysfs names the pools in kB)."""
    m = re.fullmatch(r"(\d+)kB", text)
    if not m:
        return text
    kb = int(m.group(1))
    for unit, size in (("G", 1 << 20), ("M", 1 << 10)):
        if kb % size == 0:
            return f"{kb // size}{unit}"
    return text


def parse_console(console: str) -> BedResult:
    """Extract status, effective parameters, the init's errors and the inside facts from a console log.

    Returns a partial BedResult (status None if no exit marker counted). Only markers
    that start a line and carry the boot's nonce count, facts before ``ready``, ``exit``
    after it (:class:`kvmpy.bed.protocol.MarkerReader`): the command shares the console.
    """
    result = BedResult(status=None, console=console, console_dropped=getattr(console, "dropped", None))
    facts = result.facts
    reader = marker_reader(console)
    for line in console.splitlines():
        marker = reader.read(line)
        if marker is None:
            continue
        kind, arg = marker
        if kind == "exit":
            try:
                result.status = int(arg)
            except ValueError:
                result.bed_errors.append(f"unreadable exit status {arg!r}")
        elif kind == "error":
            result.bed_errors.append(arg)
        elif kind == "param" and "=" in arg:
            key, _, value = arg.partition("=")
            result.params[key.strip()] = value.strip()
        elif kind == "kernel":
            facts.kernel = arg
        elif kind == "cpu":
            facts.cpu_model = arg
        elif kind == "module" and arg in ("kvm_amd", "kvm_intel"):
            facts.vendor_module = arg
        elif kind == "hugepages" and "=" in arg:
            pool, _, count = arg.partition("=")
            if count.strip().isdigit():
                facts.hugepages[_pool_name(pool.strip())] = int(count)
    facts.params = dict(result.params)
    return result


_MODULE_RE = re.compile(r"[A-Za-z0-9_-]+")
_PARAM_RE = re.compile(r"[A-Za-z0-9_.-]+")


def params_cmdline(params: Mapping[str, str]) -> List[str]:
    """Kernel command-line words for module parameters, validated.

    A value with spaces is double-quoted, as the kernel's own parser expects
    (``kvm.x="a b"``).  Raises BedError for what neither the kernel nor the
    init could route: a missing module prefix, a quote or a control
    character, leading, trailing or repeated spaces in a value.
    """
    words = []
    for key, value in params.items():
        module, dot, name = key.partition(".")
        if not dot or not _MODULE_RE.fullmatch(module) or not _PARAM_RE.fullmatch(name):
            raise BedError(f"module parameter {key!r} must look like MODULE.PARAM")
        value = str(value)
        if not value or '"' in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise BedError(f"module parameter {key}={value!r}: empty, or holds a quote or a control character")
        if value != value.strip(" ") or "  " in value:
            raise BedError(f"module parameter {key}={value!r}: leading, trailing or repeated spaces")
        quoted = f'"{value}"' if " " in value else value
        words.append(f"{module.replace('-', '_')}.{name}={quoted}")
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


def kernel_cmdline(request: BedRequest, console: str = "ttyS0") -> List[str]:
    """The bed kernel's command line: serial console, no reboot on panic, the bed's mark
    (:data:`kvmpy.bed_mark.CMDLINE_WORD`), the request's module parameters (the init hands
    them to insmod) and huge pages, then its extra words."""
    return [f"console={console}", "panic=-1", "quiet", CMDLINE_WORD, *params_cmdline(request.params),
            *hugepages_cmdline(request.hugepages), *request.append]


def parse_hugepages(text: str) -> Tuple[str, int]:
    """Parse ``SIZE:COUNT`` (e.g. ``1G:1``) into a (size, count) pair."""
    size, colon, count = text.partition(":")
    if not colon or not count.isdigit():
        raise BedError(f"--hugepages {text!r}: expected SIZE:COUNT, e.g. 1G:1 or 2M:256")
    hugepages_cmdline({size: int(count)})  # validate
    return size, int(count)


def parse_param(text: str) -> Tuple[str, str]:
    """Parse one ``MODULE.PARAM=VALUE`` argument into a (key, value) pair."""
    key, eq, value = text.partition("=")
    if not eq:
        raise BedError(f"--param {text!r}: expected MODULE.PARAM=VALUE")
    params_cmdline({key: value})  # validate
    return key.replace("-", "_"), value


_MEM_RE = re.compile(r"([1-9][0-9]*)([MGmg]?)")


def megabytes(mem: str) -> int:
    """Guest memory ``2G``/``768M``/``1024`` (megabytes) -> megabytes; BedError otherwise."""
    m = _MEM_RE.fullmatch(str(mem).strip())
    if not m:
        raise BedError(f"--mem {mem!r}: expected e.g. 2G or 768M")
    n = int(m.group(1))
    return n * 1024 if m.group(2).lower() == "g" else n


_PRINTK_RE = re.compile(r"\s*\[\s*\d+\.\d+\]")


def kernel_splats(result: BedResult) -> Tuple[List[str], List[str]]:
    """(splats while booting, splats from loading KVM on) in a result's kernel log.

    Boot-time splats come from the kernel meeting the emulated CPU before any KVM
    code ran; they are reported, but only the later ones fail a run. Without a kernel
    log (a bed that crashed, or one whose log did not come back: dropped by the size
    bound, a damaged files block) the console is scanned instead: it shows an oops or
    panic even at the quiet log level. The console of a command that finished also holds
    the command's output, so there only the kernel's own (timestamped) lines are read.
    """
    if result.kernel_log:
        head, sep, tail = result.kernel_log.partition(BOOT_DONE)
        if not sep:
            return [], find_splats_in_text(result.kernel_log)
        return find_splats_in_text(head), find_splats_in_text(tail)
    lines = result.console.splitlines()
    if result.status is not None:
        lines = [line for line in lines if _PRINTK_RE.match(line) or line.startswith(MARKER)]
    # BOOT_DONE goes to the kernel log at a level a quiet console does not show: the init's
    # first marker (printed just before it) tells boot from KVM there.
    cut = next((i for i, line in enumerate(lines) if BOOT_DONE in line or line.startswith(MARKER)), 0)
    return find_splats_in_text("\n".join(lines[:cut])), find_splats_in_text("\n".join(lines[cut:]))
