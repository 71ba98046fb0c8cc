"""`kvmpy selftest --bed [--matrix]`: the selftest suite inside the nested test bed.

Each boot runs the same pytest command as on the host; the results JSON comes back
through the bed's results directory and becomes one RunResults per configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

from kvmpy import faults
from kvmpy.bed.backend import BedError, BedRequest
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


def _bed_args(args: argparse.Namespace) -> argparse.Namespace:
    """The `kvmpy bed` options equivalent to these `kvmpy selftest --bed` options."""
    bochs = args.backend == "bochs"
    return argparse.Namespace(
        backend=args.backend, vendor=None, accel=args.accel, kernel_version=args.kernel_version,
        kernel=Path(args.kernel) if args.kernel else None, modules=Path(args.modules) if args.modules else None,
        mem=BED_MEM if not bochs else BOCHS_MEM, smp=2, timeout=args.timeout or BED_TIMEOUT,
        param=list(args.param), console=False, hugepages=list(BED_HUGEPAGES if not bochs else BOCHS_HUGEPAGES),
    )


def _results(config_label: str, row) -> RunResults:
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


def suite_request(args: argparse.Namespace, bargs: argparse.Namespace, printer=None) -> BedRequest:
    """The bed request that runs the suite's pytest command inside."""
    from kvmpy.bed import cli as bed_cli

    inner = pytest_command("$KVMPY_BED_RESULTS/results.json", None, args.keyword, args.pytest_args)
    script = " ".join(shlex.quote(a) if not a.startswith("--kvmpy-results=") else f'"{a}"' for a in inner)
    request = bed_cli.build_request(bargs, ["sh", "-c", script], printer)
    # The bed passes on no environment of ours but what the request names: injected faults too.
    return dataclasses.replace(request, env={**request.env, **faults.env()})


def run(args: argparse.Namespace, quiet: bool = False) -> list[RunResults]:
    """Boot the bed once (or once per matrix configuration) and run the suite inside."""
    from kvmpy.bed import cli as bed_cli
    from kvmpy.bed import matrix

    from kvmpy.guest import programs

    bargs = _bed_args(args)
    log = (lambda m: None) if quiet else bed_cli._err
    try:
        # The bed sees the host's / read-only: guests must be built before it boots.
        if programs.source_root() is not None:
            programs.build()
        backend = bed_cli.make_backend(bargs, log)
    except (BedError, programs.GuestProgramError) as e:
        return [RunResults("bed", harness_error=str(e))]
    printer = None if quiet else bed_cli.ConsolePrinter(False, sys.stdout)
    request = suite_request(args, bargs, printer)
    if args.matrix:
        configs = list(matrix.matrix_for(backend.vendor))
    else:
        configs = [matrix.Config("params" if args.param else "default", {})]

    def progress(i: int, n: int, row) -> None:
        if not quiet:
            bed_cli._err(f"[{i}/{n}] {row.config.name}: {row.verdict} {row.detail} ({row.result.seconds:.0f}s)")

    t0 = time.monotonic()
    if not quiet:
        bed_cli._err(f"bed: {backend.name}, kernel {backend.kernel.release}, "
                     f"{len(configs)} configuration(s)")
    rows = matrix.run_matrix(backend, request, configs, progress)
    runs = []
    for row in rows:
        for splat in row.boot_splats if not quiet else ():
            bed_cli._err(f"note: {row.config.name}: kernel splat while the bed booted, before KVM was "
                         f"loaded (not counted): {splat.splitlines()[0]}")
        params = " ".join(f"{k}={v}" for k, v in row.config.params.items()) or \
            " ".join(args.param) or "defaults"
        label = f"bed {backend.vendor} {row.config.name}" if args.matrix else f"bed {backend.vendor} {params}"
        runs.append(_results(label, row))
        if args.junit and "junit.xml" in row.result.files:
            path = Path(args.junit)
            if len(rows) > 1:
                path = path.with_name(f"{path.stem}-{row.config.name}{path.suffix}")
            path.write_bytes(row.result.files["junit.xml"])
    if not quiet and args.matrix:
        print(matrix.format_table(rows, f"bed matrix ({backend.name}, {backend.kernel.release}, "
                                        f"{time.monotonic() - t0:.0f}s)"))
    return runs
