"""`kvmpy selftest --bed [--matrix]`: the selftest suite inside the nested test bed.

The selftest options become :class:`kvmpy.bed.options.BedOptions` (checked before the
guests are built or a kernel is fetched) and the suite runs through the bed's library
entry point, :class:`kvmpy.bed.testbed.Bed`.  Each boot runs the same pytest command
as on the host; the results JSON comes back through the bed's results directory and
becomes one RunResults per configuration, with what the configuration ran on (kernel,
machine, effective module parameters) recorded in it and in its JUnit file.

``--matrix`` runs every row of the vendor's matrix on each kernel of the kernel axis
(Debian 6.12 and 6.1 unless a kernel is named).  Stopped by a signal, the run keeps what
it has: the configurations already finished, and a row for the one that was running, with
the tests its boot had finished (:mod:`kvmpy.selftest.bed_results`).
"""
from __future__ import annotations

import shlex
import signal
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from kvmpy import faults
from kvmpy.bed import matrix, parallel
from kvmpy.bed.machine import ConsolePrinter
from kvmpy.bed.options import BedOptions
from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import Job, megabytes
from kvmpy.bed.testbed import Bed
from kvmpy.hostmem import mem_available
from kvmpy.selftest import bed_results, bytecode
from kvmpy.selftest.bed_results import Pair
from kvmpy.selftest.junit import format_junit
from kvmpy.selftest.options import KNOWN_ISSUES_ENV, bed_environment
from kvmpy.selftest.report import RunResults
from kvmpy.selftest.runner import pytest_command
from kvmpy.selftest.shard import Shard

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
        timeout=BED_TIMEOUT if args.timeout is None else args.timeout, params=args.param,
        hugepages=BOCHS_HUGEPAGES if bochs else BED_HUGEPAGES)


def _note(msg: str) -> None:
    print(f"kvmpy bed: {msg}", file=sys.stderr, flush=True)


def _beds(args, log: Callable[[str], None]) -> List[Bed]:
    """The beds (one per kernel of the matrix's kernel axis, else one), their options checked;
    nothing fetched or built yet."""
    options = bed_options(args)
    return [Bed(o, log=log) for o in (matrix.kernel_axis(options) if args.matrix else [options])]


def _prepare(beds: List[Bed], log: Callable[[str], None]) -> None:
    """Build the guests and the suite's bytecode, then fetch the kernels of ``beds``."""
    from kvmpy.guest import programs

    # The bed sees the host's / read-only: guests must be built before it boots, and
    # bytecode it would otherwise compile at each boot, under emulation.
    if programs.source_root() is not None:
        programs.build()
    bytecode.compile_suite(log)
    for bed in beds:
        bed.prepare()


def plan(args, log: Callable[[str], None] = _note) -> Tuple[List[Pair], Shard | None]:
    """The (bed, configuration) pairs this run boots, and its shard (``--shard K/N``) if any.

    BedError for bad bed options, ShardError for a shard with no rows; nothing fetched yet.
    """
    beds = _beds(args, log)
    pairs: List[Pair] = [
        (bed, config) for bed in beds
        for config in (matrix.select_configs(bed.vendor) if args.matrix
                       else [matrix.Config("params" if args.param else "default", {})])]
    if not getattr(args, "shard", None):
        return pairs, None
    shard = Shard.select(args.shard, [bed_results.row_id(b, c) for b, c in pairs])
    return [(b, c) for b, c in pairs if bed_results.row_id(b, c) in shard.rows], shard


def suite_job(args, on_console: Callable[[str], None] | None = None, part: Tuple[int, int] | None = None) -> Job:
    """The job that runs the suite's pytest command inside the bed (only part K of N of the tests:
    ``part=(K, N)``, see :mod:`kvmpy.selftest.parts`)."""
    extra = list(args.pytest_args or []) + ([f"--kvmpy-part={part[0]}/{part[1]}"] if part else [])
    inner = pytest_command(f"$KVMPY_BED_RESULTS/{bed_results.RESULTS_FILE}", None, args.keyword, extra)
    script = " ".join(shlex.quote(a) if not a.startswith("--kvmpy-results=") else f'"{a}"' for a in inner)
    # The bed passes on no environment of ours but the job's: injected faults go in it, and
    # the size multiplier and known-issues file the user set (that file carried in, for Bochs).
    # The progress file comes back even from a machine stopped or past its timeout.
    env = {**faults.env(), **bed_environment()}
    carry = (env[KNOWN_ISSUES_ENV],) if KNOWN_ISSUES_ENV in env else ()
    return Job(["sh", "-c", script], env=env, on_console=on_console,
               follow=(bed_results.PROGRESS_FILE,), carry=carry)


def run(args, quiet: bool = False, pairs: List[Pair] | None = None) -> List[RunResults]:
    """Boot the bed once (or once per matrix configuration and kernel) and run the suite inside.

    ``pairs``: what :func:`plan` chose (default: plan it here; a shard's rows only).
    With ``quiet`` (JSON or KTAP on stdout) pytest's lines from the bed go to stderr, like the
    progress notes, and no matrix table is printed. ``args.jobs`` rows (default: auto) boot at
    once, as many as this machine's CPUs and memory hold (:func:`kvmpy.bed.parallel.bound_jobs`); with a
    single row, that many boots share its tests (:func:`_run_parts`).
    """
    from kvmpy.guest import programs

    log = _note
    try:
        if pairs is None:
            pairs, _ = plan(args, log)
        beds = list(dict.fromkeys(bed for bed, _ in pairs))
        _prepare(beds, log)
    except (BedError, programs.GuestProgramError) as e:
        return _harness_error(args, str(e))
    stream = sys.stderr if quiet else sys.stdout
    if len(pairs) == 1:
        # One row: --jobs boots share its tests instead.
        nparts = _at_once(args, pairs, None, log)
        if nparts > 1:
            return _run_parts(args, pairs[0], nparts, stream, log)
        jobs = 1
    else:
        jobs = _at_once(args, pairs, len(pairs), log)
    # Several beds at once: one console echo each, its lines tagged with the row.
    console = (lambda i: ConsolePrinter(False, stream, prefix=f"[{bed_results.row_id(*pairs[i])}] ")) if jobs > 1 else None
    job = suite_job(args, on_console=ConsolePrinter(False, stream))
    done: Dict[int, matrix.Row] = {}

    def progress(i: int, n: int, row: matrix.Row) -> None:
        done[i - 1] = row
        _log_row(log, row, row.progress_line(i, n))

    t0 = time.monotonic()
    log(f"bed: {'; '.join(b.describe() for b in beds)}, {len(pairs)} configuration(s)")
    stopped: List[RunResults] = []
    harness: List[RunResults] = []
    try:
        matrix.run_matrix(pairs, job, progress, name_rows=args.matrix, jobs=jobs, console=console)
    except Exception as e:  # the rows that finished are kept, and the error said beside them
        harness = _harness_error(args, _what_failed(e), junit=not done)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM/SIGHUP as the CLI raises them
        stopped = bed_results.stopped_runs(pairs, sorted(done), getattr(e, "running", None) or [],
                                           getattr(e, "signo", signal.SIGINT), args.matrix, getattr(e, "cut", {}))
    # JUnit files are named by the whole run's rows, so that a shard's are named as unsharded.
    several_kernels = args.matrix and args.kernel is None and args.kernel_version is None
    several_rows = args.matrix or len(pairs) > 1
    runs = [_finished_run(pairs[i][0], done[i], args, several_kernels, several_rows) for i in sorted(done)]
    _write_stopped_junit(args, pairs, stopped, several_kernels, several_rows)
    runs += stopped + harness
    if not quiet and args.matrix and done:
        kernels = ", ".join(b.kernel.release for b in beds if b.kernel)
        print(matrix.format_table([done[i] for i in sorted(done)],
                                  f"bed matrix ({beds[0].backend_class.name}, kernel {kernels}, "
                                  f"{time.monotonic() - t0:.0f}s)"))
    return runs


def _harness_error(args, message: str, junit: bool = True) -> List[RunResults]:
    """The run when the bed could not be set up or run, written to ``--junit`` too (one file at
    the name given, unless not ``junit``): a CI system reading it finds the error, not a missing file."""
    runs = [RunResults("bed", harness_error=message)]
    if junit and args.junit:
        _write_junit(Path(args.junit), format_junit(runs), runs[0])
    return runs


def _what_failed(e: BaseException) -> str:
    return str(e) if isinstance(e, BedError) else f"the bed failed: {type(e).__name__}: {e}"


def _write_junit(path: Path, data: bytes, run: RunResults) -> None:
    """Write a ``--junit`` file; a write that fails (a full disk) is ``run``'s harness error, not
    a traceback that loses every other run."""
    try:
        path.write_bytes(data)
    except OSError as e:
        why = f"JUnit file {path} not written: {e}"
        _note(why)
        run.add_harness_error(why)


def _log_row(log: Callable[[str], None], row: matrix.Row, line: str) -> None:
    """Say that a boot finished: ``line``, what it ran on, what it could not bring back."""
    log(line)
    log(f"bed: {row.result.facts.summary()}")
    for why in row.result.dropped:
        log(f"result file not brought back: {why}")
    for splat in row.boot_splats:
        log(f"note: {row.config.name}: kernel splat while the bed booted, before KVM was "
            f"loaded (not counted): {splat.splitlines()[0]}")


def _run_parts(args, pair: Pair, nparts: int, stream, log: Callable[[str], None]) -> List[RunResults]:
    """Run one configuration's tests in ``nparts`` boots at once, each a part of them; one run back.

    Stopped by a signal, the parts that had finished are kept, and of a part the stop cut short
    the tests its boot had finished (the run says what was lost), as the matrix keeps its rows.
    """
    from kvmpy.selftest.parts import merge_parts   # a pytest plugin too: pytest only when parts run

    bed, config = pair
    requested = {**bed.options.params, **config.params}
    done: Dict[int, matrix.Row] = {}

    def boot(k: int) -> matrix.Row:
        echo = ConsolePrinter(False, stream, prefix=f"[part {k + 1}/{nparts}] ")
        # A part that fails is its result: the others are kept.
        part = parallel.run_guarded(bed, suite_job(args, echo, (k + 1, nparts)), config.params)
        return matrix.evaluate(config, part, requested)

    def commit(k: int, row: matrix.Row) -> None:
        done[k] = row
        _log_row(log, row, f"[part {k + 1}/{nparts}] {config.name}: {row.verdict} {row.detail} "
                           f"({row.result.seconds:.0f}s)")

    log(f"bed: {bed.describe()}, 1 configuration, its tests in {nparts} parts (one boot each)")
    stop, cut, harness = 0, {}, ""
    try:
        parallel.run_in_order(nparts, boot, nparts, commit)
    except Exception as e:      # the parts that finished are kept, the error said in the run
        harness = _what_failed(e)
    except KeyboardInterrupt as e:
        stop, cut = getattr(e, "signo", signal.SIGINT), getattr(e, "cut", {})
    # A part the stop cut short keeps the tests its progress file shows finished.
    cut_runs = {k: bed_results.cut_run(pair, cut[k], args.matrix) for k in cut if k not in done}
    cut_runs = {k: c for k, c in cut_runs.items() if c is not None}
    if done or cut_runs:
        parts = [cut_runs[k][0] if k in cut_runs else None for k in range(nparts)]
        for k, row in done.items():
            parts[k] = _finished_run(bed, row, args, False, False, junit=False)
        run = merge_parts(parts)
        if stop:
            run.interrupted = stop
            run.stop_detail = bed_results.parts_stop_detail(nparts, done, {k: c[1] for k, c in cut_runs.items()})
        runs = [run]
    elif harness:
        return _harness_error(args, harness)
    else:       # stopped before any part finished or had a test to show
        runs = bed_results.stopped_runs([pair], [], [0], stop, args.matrix)
    if harness:
        runs[0].add_harness_error(harness)
    if args.junit:
        _write_junit(Path(args.junit), format_junit(runs), runs[0])
    return runs


#: Parts of one row that ``--jobs auto`` boots at most: each boot costs about 30 s before its
#: first test, and the suite's longest test takes about 40 s in the QEMU bed, so more parts
#: than this shorten nothing and cost a boot (and its memory) each.
AUTO_PARTS = 4


def _at_once(args, pairs: List[Pair], units: int | None, log: Callable[[str], None]) -> int:
    """How many boots run at once: ``--jobs`` (default auto: one per CPU, and at most
    :data:`AUTO_PARTS` parts of one row), bounded by CPUs, free memory and ``units`` (the rows;
    None: the asked number of parts of one row), said when it is fewer."""
    asked = getattr(args, "jobs", None) or "auto"
    ncpus = parallel.cpus()
    label = ""
    if asked == "auto":
        # Each emulator runs its guest on one host thread: one boot leaves the other CPUs idle.
        asked = ncpus if units else min(ncpus, AUTO_PARTS)
        label = f"--jobs auto ({ncpus} CPU{'s' if ncpus != 1 else ''})"
    if asked <= 1:
        return 1
    guest = max(megabytes(bed.options.mem) for bed, _ in pairs) << 20
    n, why = parallel.bound_jobs(asked, units or asked, guest, ncpus, mem_available() or 0, label)
    if why:
        log(why)
    return n


def _finished_run(bed: Bed, row: matrix.Row, args, several_kernels: bool, several_rows: bool,
                  junit: bool = True) -> RunResults:
    """One finished configuration's RunResults, its JUnit file written (``--junit``, unless not
    ``junit``) with its setting."""
    label = bed_results.label(bed, row.config, args.matrix)
    run = bed_results.boot_run(label, row)
    run.bed = bed_results.setting(bed, row.config, row)
    run.row = bed_results.row_id(bed, row.config)
    if junit and args.junit:
        if "junit.xml" in row.result.files:
            try:
                data = bed_results.junit_with_setting(row.result.files["junit.xml"], label, run.bed)
            except ET.ParseError as e:
                run.harness_error = run.harness_error or f"the bed's JUnit XML is unreadable ({e})"
                data = row.result.files["junit.xml"]
        else:   # pytest never wrote one (the boot failed first): the run's error, as JUnit
            data = format_junit([run])
        _write_junit(_junit_path(args, bed, row.config, several_kernels, several_rows), data, run)
    return run


def _junit_path(args, bed: Bed, config: matrix.Config, several_kernels: bool, several_rows: bool) -> Path:
    """Where a configuration's ``--junit`` file goes: the name given, or for several rows that
    name with the kernel (several kernels) and the configuration appended."""
    path = Path(args.junit)
    if several_rows:
        kernel = f"-{bed_results.kernel_name(bed)}" if several_kernels else ""
        path = path.with_name(f"{path.stem}{kernel}-{config.name}{path.suffix}")
    return path


def _write_stopped_junit(args, pairs: List[Pair], stopped: List[RunResults], several_kernels: bool,
                         several_rows: bool) -> None:
    """A ``--junit`` file for each configuration a stop caught running: a CI system reading the
    files finds the stop as an error, not a missing file."""
    if not args.junit:
        return
    by_row = {bed_results.row_id(*pair): pair for pair in pairs}
    for run in stopped:
        if run.row in by_row:
            bed, config = by_row[run.row]
            _write_junit(_junit_path(args, bed, config, several_kernels, several_rows), format_junit([run]), run)
