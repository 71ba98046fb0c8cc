"""`kvmpy selftest --bed [--matrix]`: the selftest suite inside the nested test bed.

The selftest options become :class:`kvmpy.bed.options.BedOptions` (checked before the
guests are built or a kernel is fetched) and the suite runs through the bed's library
entry point, :class:`kvmpy.bed.testbed.Bed`.  Each boot runs the same pytest command
as on the host; the results JSON comes back through the bed's results directory and
becomes one RunResults per configuration.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Callable, List

from kvmpy import faults
from kvmpy.bed import matrix
from kvmpy.bed.machine import ConsolePrinter
from kvmpy.bed.options import BedOptions
from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import Job
from kvmpy.bed.testbed import Bed
from kvmpy.selftest.report import RunResults
from kvmpy.selftest.runner import PYTEST_HARNESS_ERRORS, pytest_command

# 1 GiB huge-page tests need room for hugetlb pages inside the bed; the pools are
# reserved at boot, when 1 GiB of contiguous memory is still there to be had.
BED_MEM = "4G"
BED_HUGEPAGES = ["1G:1", "2M:32"]
# Bochs emulates at most 2 GiB: no room for a 1 GiB page next to Python.
BOCHS_MEM = "2G"
BOCHS_HUGEPAGES = ["2M:32"]
BED_TIMEOUT = 1500.0


def bed_options(args) -> BedOptions:
    """The bed options of these `kvmpy selftest --bed` arguments (BedError if malformed)."""
    bochs = args.backend == "bochs"
    return BedOptions.parse(
        backend=args.backend or "qemu", kernel_line=args.kernel_version, kernel=args.kernel,
        modules=args.modules, accel=args.accel, mem=BOCHS_MEM if bochs else BED_MEM, smp=2,
        timeout=args.timeout or BED_TIMEOUT, params=args.param,
        hugepages=BOCHS_HUGEPAGES if bochs else BED_HUGEPAGES)


def _results(config_label: str, row: matrix.Row) -> RunResults:
    """RunResults of one boot, with bed-level problems as harness errors or failures."""
    result = row.result
    raw = result.files.get("results.json")
    if result.status is None:
        return RunResults(config_label, harness_error=f"bed: {result.error or 'no exit status'}")
    if row.mismatches:
        return RunResults(config_label, harness_error="bed parameters: " + "; ".join(row.mismatches))
    if raw is None:
        return RunResults(config_label, exitstatus=result.status,
                          harness_error=f"pytest in the bed exited {result.status} without results")
    run = RunResults.from_json(config_label, raw.decode())
    if run.exitstatus in PYTEST_HARNESS_ERRORS:
        run.harness_error = f"pytest: {PYTEST_HARNESS_ERRORS[run.exitstatus]} (exit {run.exitstatus})"
    # A splat the per-test watch could not pin on a test still fails the run.
    for splat in row.splats:
        first = splat.splitlines()[0] if splat else "kernel splat"
        if not any(first in (t.get("reason") or "") for t in run.tests):
            run.tests.append({"nodeid": "(bed kernel log)", "outcome": "failed",
                              "reason": f"kernel splat: {first}", "duration": 0.0, "stats": {}})
    return run


def _note(msg: str) -> None:
    print(f"kvmpy bed: {msg}", file=sys.stderr, flush=True)


def _prepare(args, log: Callable[[str], None]) -> Bed:
    """The bed, its options checked first, then the guests built, then the kernel fetched."""
    from kvmpy.guest import programs

    bed = Bed(bed_options(args), log=log)
    # The bed sees the host's / read-only: guests must be built before it boots.
    if programs.source_root() is not None:
        programs.build()
    bed.prepare()
    return bed


def suite_job(args, on_console: Callable[[str], None] | None = None) -> Job:
    """The job that runs the suite's pytest command inside the bed."""
    inner = pytest_command("$KVMPY_BED_RESULTS/results.json", None, args.keyword, args.pytest_args)
    script = " ".join(shlex.quote(a) if not a.startswith("--kvmpy-results=") else f'"{a}"' for a in inner)
    # The bed passes on no environment of ours but the job's: injected faults go in it.
    return Job(["sh", "-c", script], env=faults.env(), on_console=on_console)


def run(args, quiet: bool = False) -> List[RunResults]:
    """Boot the bed once (or once per matrix configuration) and run the suite inside."""
    from kvmpy.guest import programs

    log = (lambda m: None) if quiet else _note
    try:
        bed = _prepare(args, log)
        configs = (matrix.select_configs(bed.vendor) if args.matrix
                   else [matrix.Config("params" if args.param else "default", {})])
    except (BedError, programs.GuestProgramError) as e:
        return [RunResults("bed", harness_error=str(e))]
    job = suite_job(args, on_console=None if quiet else ConsolePrinter(False, sys.stdout))

    def progress(i: int, n: int, row: matrix.Row) -> None:
        log(row.progress_line(i, n))
        log(f"bed: {row.result.facts.summary()}")
        for why in row.result.dropped:
            log(f"result file not brought back: {why}")
        for splat in row.boot_splats:
            log(f"note: {row.config.name}: kernel splat while the bed booted, before KVM was "
                f"loaded (not counted): {splat.splitlines()[0]}")

    t0 = time.monotonic()
    log(f"bed: {bed.describe()}, {len(configs)} configuration(s)")
    try:
        rows = matrix.run_matrix([(bed, config) for config in configs], job, progress)
    except BedError as e:
        return [RunResults("bed", harness_error=str(e))]
    runs = []
    for row in rows:
        params = " ".join(f"{k}={v}" for k, v in row.config.params.items()) or \
            " ".join(args.param) or "defaults"
        label = f"bed {bed.vendor} {row.config.name}" if args.matrix else f"bed {bed.vendor} {params}"
        runs.append(_results(label, row))
        if args.junit and "junit.xml" in row.result.files:
            path = Path(args.junit)
            if len(rows) > 1:
                path = path.with_name(f"{path.stem}-{row.config.name}{path.suffix}")
            path.write_bytes(row.result.files["junit.xml"])
    if not quiet and args.matrix:
        print(matrix.format_table(rows, f"bed matrix ({bed.describe()}, {time.monotonic() - t0:.0f}s)"))
    return runs
