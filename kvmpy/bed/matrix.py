"""The module-parameter matrix: one boot per KVM MMU configuration and kernel, one table.

The matrix runs (bed, configuration) pairs (:func:`run_matrix`), so beds of
several kernels share one table (:func:`kernel_axis`: Debian's 6.12 and 6.1,
unless the options name one kernel).  Every configuration is checked three
times: the command's own result; that the parameters really took effect (the
bed reports the values it reads back from /sys/module after loading); and
that no two rows ran the same effective configuration (kernel release and
every parameter read back), so a mistyped or read-only parameter cannot make
two rows of the table silently test the same thing.  The bed kernel's log is
scanned for splats too: a WARN_ON fails its row even if the command passed.

The job learns which row it runs in (``KVMPY_BED_CONFIG``): a row's parameters
decide what runs, so the selftests change none of them inside a row.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

from kvmpy.bed.debian import KERNEL_LINES
from kvmpy.bed.options import BedOptions
from kvmpy.bed.parallel import run_guarded, run_in_order
from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import BedResult, Job, kernel_splats
from kvmpy.bed.testbed import Bed

#: Set in the job's environment: the name of the matrix row it runs in.
CONFIG_ENV = "KVMPY_BED_CONFIG"


@dataclasses.dataclass(frozen=True)
class Config:
    """A named set of module parameters."""

    name: str
    params: Mapping[str, str]
    why: str = ""


#: AMD (QEMU/TCG, SVM + NPT).  npt=0 makes L1 run on shadow paging, the only
#: configuration in which KVM unsyncs L1's own page tables.
AMD_MATRIX = (
    Config("tdp+split", {"kvm.tdp_mmu": "Y", "kvm.eager_page_split": "Y"}, "default MMU"),
    Config("tdp-split", {"kvm.tdp_mmu": "Y", "kvm.eager_page_split": "N"}, "lazy huge-page split"),
    Config("legacy-tdp", {"kvm.tdp_mmu": "N"}, "shadow MMU code on TDP"),
    Config("shadow", {"kvm_amd.npt": "0"}, "shadow paging, unsync"),
)
#: Intel (Bochs, VMX + EPT): only what matters, each boot is slow.
INTEL_MATRIX = (
    Config("ept+split", {"kvm_intel.ept": "1", "kvm.eager_page_split": "Y"}, "default MMU"),
    Config("ept-split", {"kvm_intel.ept": "1", "kvm.eager_page_split": "N"}, "lazy huge-page split"),
    Config("shadow", {"kvm_intel.ept": "0"}, "shadow paging, unsync"),
)


def matrix_for(vendor: str) -> Sequence[Config]:
    """The configurations worth running on a machine of CPU ``vendor``."""
    if vendor == "amd":
        return AMD_MATRIX
    if vendor == "intel":
        return INTEL_MATRIX
    raise BedError(f"no matrix for vendor {vendor!r}")


#: Kernel defaults of the parameters the matrices set (a row that leaves one out runs with this).
DEFAULTS = {"kvm.tdp_mmu": "Y", "kvm.eager_page_split": "Y", "kvm_amd.npt": "Y", "kvm_intel.ept": "Y",
            "kvm_amd.nested": "Y", "kvm_intel.nested": "Y"}


def configs_with(vendor: str, needs: Mapping[str, str]) -> List[Config]:
    """The rows of ``vendor``'s matrix that run with every parameter of ``needs`` (kernel defaults
    counted for what a row leaves out); those that set one of them themselves, if any do."""
    def value(config: Config, key: str) -> Optional[str]:
        v = config.params.get(key, DEFAULTS.get(key))
        return None if v is None else normalize(v)
    rows = [c for c in matrix_for(vendor) if all(value(c, k) == normalize(v) for k, v in needs.items())]
    explicit = [c for c in rows if set(needs) & set(c.params)]
    return explicit or rows


def kernel_axis(options: BedOptions) -> List[BedOptions]:
    """The options of each kernel a matrix runs: the one the options name (``kernel`` or
    ``kernel_line``), else every Debian line (6.12 and 6.1, the LTS lines users run)."""
    if options.kernel is not None or options.kernel_line is not None:
        return [options]
    return [dataclasses.replace(options, kernel_line=line) for line in KERNEL_LINES]


def select_configs(vendor: str, names: Iterable[str] = ()) -> List[Config]:
    """The configurations of ``vendor``'s matrix named in ``names`` (all when none)."""
    configs = list(matrix_for(vendor))
    names = list(names)
    unknown = set(names) - {c.name for c in configs}
    if unknown:
        raise BedError(f"unknown --config {', '.join(sorted(unknown))}; "
                       f"choose from {', '.join(c.name for c in configs)}")
    return [c for c in configs if c.name in names] if names else configs


def normalize(value: str) -> str:
    """Parameter values as /sys/module prints them: booleans become Y/N."""
    v = str(value).strip()
    if v.lower() in ("y", "1", "true", "on", "yes"):
        return "Y"
    if v.lower() in ("n", "0", "false", "off", "no"):
        return "N"
    return v


def param_mismatches(requested: Mapping[str, str], effective: Mapping[str, str]) -> List[str]:
    """Requested parameters the bed did not end up with, as messages.

    A parameter of a module the bed did not load (e.g. kvm_intel on AMD) is
    not reported; one that was loaded but reads back differently, or is
    absent from a loaded module, is.
    """
    loaded = {key.split(".", 1)[0] for key in effective}
    problems = []
    for key, want in requested.items():
        module = key.split(".", 1)[0].replace("-", "_")
        if module not in loaded:
            continue
        got = effective.get(key.replace("-", "_"))
        if got is None:
            problems.append(f"{key}: no such parameter")
        elif normalize(got) != normalize(want):
            problems.append(f"{key}={want} did not take effect (reads {got})")
    return problems


@dataclasses.dataclass
class JUnitSummary:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    failed: List[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def junit_summary(xml: bytes) -> JUnitSummary:
    """Count the testcases of a JUnit XML document (pytest's flavour)."""
    root = ET.fromstring(xml)
    summary = JUnitSummary()
    for case in root.iter("testcase"):
        summary.tests += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        if case.find("failure") is not None:
            summary.failures += 1
            summary.failed.append(name)
        elif case.find("error") is not None:
            summary.errors += 1
            summary.failed.append(name)
        elif case.find("skipped") is not None:
            summary.skipped += 1
    return summary


@dataclasses.dataclass
class Row:
    """One configuration's outcome."""

    config: Config
    result: BedResult
    junit: Optional[JUnitSummary] = None
    mismatches: List[str] = dataclasses.field(default_factory=list)
    splats: List[str] = dataclasses.field(default_factory=list)
    boot_splats: List[str] = dataclasses.field(default_factory=list)

    @property
    def verdict(self) -> str:
        """PASS, FAIL (the command or the kernel) or ERROR (the bed itself)."""
        if self.result.status is None or self.mismatches:     # bed problems are mismatches (evaluate)
            return "ERROR"
        if self.result.status != 0 or self.splats:
            return "FAIL"
        return "PASS"

    @property
    def detail(self) -> str:
        if self.result.status is None:
            if self.splats:
                return "bed kernel crashed: " + self.splats[0].splitlines()[0]
            return self.result.error or "no exit status"
        if self.mismatches:
            return "; ".join(self.mismatches)
        if self.splats:
            return "kernel splat: " + self.splats[0].splitlines()[0]
        if self.junit and self.junit.failed:
            more = f" (+{len(self.junit.failed) - 1})" if len(self.junit.failed) > 1 else ""
            return self.junit.failed[0] + more
        if self.result.status:
            return f"exit {self.result.status}"
        return ""

    def progress_line(self, i: int, n: int) -> str:
        """``[2/4] tdp-split: PASS  (37s)``, for a matrix in progress."""
        return f"[{i}/{n}] {self.config.name}: {self.verdict} {self.detail} ({self.result.seconds:.0f}s)"


def evaluate(config: Config, result: BedResult, requested: Optional[Mapping[str, str]] = None) -> Row:
    """Judge one boot's result against its configuration.

    ``requested`` are all the module parameters the boot asked for (default:
    the configuration's); each must read back as asked.
    """
    row = Row(config, result)
    if result.status is not None:
        row.mismatches = param_mismatches(config.params if requested is None else requested,
                                          result.params)
        # A bed that timed out, reported an error or had no KVM vendor module tested nothing:
        # named with the mismatches, which every consumer of a row treats as the bed's error.
        row.mismatches += result.bed_problems
    row.boot_splats, row.splats = kernel_splats(result)
    xmls = [data for name, data in sorted(result.files.items()) if name.endswith(".xml")]
    if xmls:
        try:
            row.junit = junit_summary(xmls[0])
        except ET.ParseError:
            row.junit = None
    return row


def run_matrix(
    pairs: Sequence[Tuple[Bed, Config]],
    job: Job,
    progress: Optional[Callable[[int, int, Row], None]] = None,
    name_rows: bool = True,
    jobs: int = 1,
    console: Optional[Callable[[int], Callable[[str], None]]] = None,
) -> List[Row]:
    """Run ``job`` once per (bed, configuration) pair, the configuration's params added to the bed's.

    With ``name_rows`` the job's environment names its row (``KVMPY_BED_CONFIG``); without,
    the boots are not matrix rows (``kvmpy selftest --bed`` without ``--matrix``). A row whose
    effective configuration (kernel release and parameters read back) equals an earlier
    row's is an error: it tested nothing new. ``jobs`` > 1 boots that many pairs at once
    (:mod:`kvmpy.bed.parallel`); rows and ``progress(i, n, row)`` come in pair order all the
    same. ``console(i)``, if given, is pair ``i``'s console echo (instead of the job's).
    A KeyboardInterrupt leaves with ``running``: the indices of the pairs it stopped, and
    ``cut``: their rows as the stopped boots brought them back.
    """
    rows: List[Row] = []
    seen: dict = {}

    def boot(i: int) -> Row:
        bed, config = pairs[i]
        env = {**job.env, CONFIG_ENV: config.name} if name_rows else dict(job.env)
        this = dataclasses.replace(job, env=env, **({"on_console": console(i)} if console else {}))
        # A boot that fails is its row's result: one row's failure keeps the others.
        return evaluate(config, run_guarded(bed, this, config.params), {**bed.options.params, **config.params})

    def commit(i: int, row: Row) -> None:
        result = row.result
        if result.status is not None and result.params:
            key = (result.facts.kernel, tuple(sorted(result.params.items())))
            if key in seen:
                row.mismatches.append(f"same effective configuration as {seen[key]} "
                                      f"(kernel {result.facts.kernel}, every parameter alike): it tests nothing new")
            seen.setdefault(key, row.config.name)
        rows.append(row)
        if progress:
            progress(i + 1, len(pairs), row)

    # One job too runs on a thread of its own: a stop then kills the machine and gets back what
    # its boot brought home (``cut``), as with several.
    run_in_order(len(pairs), boot, max(1, jobs), commit)
    return rows


def exit_status(rows: Sequence[Row]) -> int:
    """2 if the bed failed anywhere, else 1 if any row failed, else 0."""
    verdicts = {row.verdict for row in rows}
    if "ERROR" in verdicts:
        return 2
    return 1 if "FAIL" in verdicts else 0


def format_table(rows: Sequence[Row], title: str = "") -> str:
    """The matrix as a fixed-width text table (with a kernel column when rows differ in kernel)."""
    kernels = len({row.result.facts.kernel for row in rows}) > 1
    header = ("config", *(("kernel",) if kernels else ()), "parameters", "result", "pass", "fail",
              "skip", "time", "detail")
    lines = []
    for row in rows:
        j = row.junit
        params = " ".join(f"{k}={v}" for k, v in row.config.params.items())
        lines.append((
            row.config.name, *((row.result.facts.kernel,) if kernels else ()), params, row.verdict,
            str(j.passed) if j else "-", str(j.failures + j.errors) if j else "-",
            str(j.skipped) if j else "-", f"{row.result.seconds:.0f}s", row.detail,
        ))
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [title] if title else []
    out += [fmt(header), fmt(tuple("-" * w for w in widths))]
    out += [fmt(l) for l in lines]
    return "\n".join(out)
