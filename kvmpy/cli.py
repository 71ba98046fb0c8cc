"""The `kvmpy` command: info, selftest, perf, bed."""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import signal
import sys
from pathlib import Path
from typing import Sequence

from kvmpy import faults
from kvmpy.output import OutputError, emit, write_file
from kvmpy.stop import exit_for_signal, signal_name, stop_signals


def _cmd_info(args: argparse.Namespace) -> int:
    from kvmpy import hostinfo

    facts = hostinfo.gather(probe=not args.no_probe)
    emit(json.dumps(facts.to_dict(), indent=1) if args.json else hostinfo.format_facts(facts))
    if facts.usage_error:       # e.g. KVMPY_FAULTS names no fault: the input, not KVM
        return 2
    return 0 if not (facts.error or facts.mmu_probe_error) else 1


def _add_selftest(sub) -> None:
    p = sub.add_parser("selftest", help="run the KVM selftest suite and print its report",
                       description="Run kvmpy's selftests against this host's KVM (or inside the test bed) "
                                   "and print one table. Exit 0: tested, and everything passed, skipped with "
                                   "a reason or failed as a listed known issue; 1: a failure or an unexplained "
                                   "kernel splat; 2: not tested (no usable /dev/kvm, no test ran to a verdict: "
                                   "e.g. every selected test skipped, or the kernel log could not be watched "
                                   "for splats), harness or usage error; "
                                   "128+N: stopped by signal N (130 Ctrl-C, 143 SIGTERM), partial results.")
    p.add_argument("-k", dest="keyword", help="only tests matching this pytest -k expression")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML here (relative to the current directory; "
                                                   "its directory must exist)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--ktap", action="store_true", help="print KTAP instead of the table")
    out.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--bed", action="store_true", help="run inside the nested test bed instead of on this host")
    bed = p.add_argument_group("test bed options (need --bed)")
    bed_only = [
        bed.add_argument("--matrix", action="store_true",
                         help="once per KVM MMU configuration (the matrix rows) and kernel: Debian 6.12 "
                              "and 6.1, or the one --kernel-version/--kernel names"),
        bed.add_argument("--kernel", help="a bzImage to boot (your patched kernel)"),
        bed.add_argument("--modules", help="with --kernel: the matching modules directory (lib/modules/VERSION)"),
        bed.add_argument("--kernel-version", help="Debian kernel line to fetch (6.12 or 6.1)"),
        bed.add_argument("--backend", choices=["qemu", "bochs"], help="machine backend (default qemu)"),
        bed.add_argument("--accel", choices=["tcg", "kvm"],
                         help="with QEMU: kvm where the host has nested virtualization (default tcg)"),
        bed.add_argument("--param", action="append", metavar="MODULE.PARAM=VALUE",
                         help="a module parameter (repeatable)"),
        bed.add_argument("--timeout", type=_positive_seconds, help="seconds per boot (default 1500)"),
        bed.add_argument("--jobs", type=_jobs, metavar="N|auto",
                         help="boot up to N rows at once, one emulator each (bounded by CPUs and free "
                              "memory; the report is the same as with --jobs 1); a run of one row "
                              "splits its tests over N boots. Default auto: one per CPU, as many as "
                              "free memory holds (one row: at most 4 boots); --jobs 1 boots one at a time"),
        bed.add_argument("--shard", metavar="K/N",
                         help="run only the K-th of N slices of the rows (kernel x configuration x backend), "
                              "for a CI matrix; join the --json reports with `kvmpy report merge`"),
    ]
    p.add_argument("pytest_args", nargs="*",
                   help="extra pytest arguments (after --); options that make pytest run no test "
                        "(--collect-only, --setup-plan...), kvmpy's internal ones (--kvmpy-part...) and "
                        "those that switch a kvmpy plugin off (--no-splat-watch, -p no:kvmpy...) are refused")
    p.set_defaults(func=_cmd_selftest, bed_only=bed_only)


class UsageError(Exception):
    """Bad command-line input, found before anything ran (exit 2)."""


def _positive_seconds(text: str) -> float:
    """``--timeout``: a positive, finite number of seconds."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: a positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number, at least 1")
    return n


def _jobs(text: str) -> int | str:
    """``--jobs``: a whole number at least 1, or "auto" (as many as the machine holds)."""
    return "auto" if text == "auto" else _positive_int(text)


# Why a host run has no shards: its one row is this host's KVM.
HOST_SHARD = ("--shard slices the test bed's rows (kernel x configuration x backend); a host run is one "
              "row, this host's KVM: splitting its tests over runners would judge different KVMs with one "
              "verdict. Run the host suite whole on each host, or add --bed")


def _check_selftest_args(args: argparse.Namespace) -> None:
    """Reject what would be silently ignored; resolve --junit against the user's directory."""
    if not args.bed:
        if args.shard:
            raise UsageError(HOST_SHARD)
        given = [a.option_strings[0] for a in args.bed_only if getattr(args, a.dest) not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)}: test bed option{'s' if len(given) > 1 else ''}, "
                             f"ignored without --bed (add --bed, or drop {'them' if len(given) > 1 else 'it'})")
    args.accel = args.accel or "tcg"
    args.param = args.param or []
    if args.shard:
        from kvmpy.selftest import shard

        try:
            shard.parse(args.shard)
        except shard.ShardError as e:
            raise UsageError(str(e)) from None
    try:
        faults.enabled()
    except faults.FaultError as e:
        raise UsageError(str(e)) from None
    _check_pytest_side(args)
    if args.junit:
        args.junit = str(_writable_file(args.junit, "--junit", fresh=True))


def _check_pytest_side(args: argparse.Namespace) -> None:
    """What pytest would be given (the arguments after --, PYTEST_ADDOPTS, KVMPY_SCALE,
    KVMPY_KNOWN_ISSUES), checked here: one usage error rather than a run that errs in every
    test, tests nothing, or runs without a safety check (kvmpy.selftest.options)."""
    import os

    from kvmpy.selftest import options

    try:
        options.check_pytest_args(list(args.pytest_args or []))
        options.check_environment()
        path = options.known_issues_path()
    except options.OptionError as e:
        raise UsageError(str(e)) from None
    if path is not None:
        from kvmpy.selftest import known_issues

        try:
            known_issues.load(path)
        except known_issues.KnownIssueFileError as e:
            raise UsageError(f"{options.KNOWN_ISSUES_ENV}: {e}") from None
        # pytest runs in the source tree: it gets the file the user named from here.
        os.environ[options.KNOWN_ISSUES_ENV] = str(path)


def _writable_file(text: str, option: str, fresh: bool = False) -> Path:
    """``text`` as an absolute path that can be written now, or UsageError saying why not.
    ``fresh``: a file already there is removed, so that no earlier run's file is left to be
    read as this run's."""
    path = Path(text).expanduser().absolute()
    if not path.parent.is_dir():
        raise UsageError(f"{option} {text}: directory {path.parent} does not exist")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"{option} {text}: cannot write {path}: {e.strerror}") from None
    if not existed or (fresh and path.is_file()):
        path.unlink()
    return path


def _cmd_selftest(args: argparse.Namespace) -> int:
    from kvmpy import hostinfo
    from kvmpy.selftest import runner

    _check_selftest_args(args)
    pairs, shard = _bed_plan(args)
    facts = hostinfo.gather(probe=True)
    header = facts.to_dict()
    machine = args.json or args.ktap
    if not machine:
        emit(hostinfo.format_facts(facts))
        if faults.enabled():
            emit(faults.banner("this run tests the tests: it must fail"))
        emit("")
    if args.bed:
        from kvmpy.selftest import bed_runner

        if shard:
            print(f"kvmpy bed: {shard.describe()}", file=sys.stderr, flush=True)
        runs = bed_runner.run(args, quiet=machine, pairs=pairs)
    else:
        runs = [runner.run_host(args.junit, args.keyword, args.pytest_args,
                                config=f"host {facts.vendor_module or ''}".strip(), machine_output=machine)]
        if args.junit:
            _finish_host_junit(Path(args.junit), runs)
    return _print_report(args, header, runs, {"shard": shard.to_dict()} if shard else {},
                         shard.describe() if shard else "")


def _finish_host_junit(path: Path, runs) -> None:
    """The host run's JUnit file, which pytest writes, made to fail where `kvmpy selftest` does:
    a harness error, a stop or a run that tested nothing is added as an error case (the whole file
    from the report when pytest wrote none, e.g. killed)."""
    from kvmpy.selftest import junit

    try:
        data = junit.with_verdict(path.read_bytes() if path.is_file() else None, runs)
    except OSError as e:
        raise OutputError(f"--junit {path}: cannot read back pytest's file: {e.strerror or e}") from None
    if data is not None:
        write_file(path, data, "--junit")


def _bed_plan(args: argparse.Namespace):
    """(pairs, shard) of a --shard run, planned before anything runs (UsageError for an empty slice);
    (None, None) otherwise (the bed runner plans, and reports bad bed options as a harness error)."""
    if not (args.bed and args.shard):
        return None, None
    from kvmpy.bed.protocol import BedError
    from kvmpy.selftest import bed_runner
    from kvmpy.selftest.shard import ShardError

    try:
        return bed_runner.plan(args)
    except (ShardError, BedError) as e:
        raise UsageError(str(e)) from None


def _print_report(args: argparse.Namespace, header: dict, runs, extra: dict, note: str = "") -> int:
    """The report on stdout as --json, --ktap or the table (after ``note``); returns the exit status."""
    from kvmpy.selftest import report

    if args.json:
        emit(report.to_json(header, runs, extra))
    elif args.ktap:
        emit(report.format_ktap(runs), end="")
    else:
        text = "\n"
        if note:
            text += note + "\n"
        setting = report.format_setting(runs)
        if setting:  # the bed's facts, per configuration: what was tested
            text += setting + "\n\n"
        emit(text + report.format_table(runs))
    return report.exit_status(runs)


def _cmd_report_merge(args: argparse.Namespace) -> int:
    from kvmpy.selftest import merge
    from kvmpy.selftest.junit import format_junit

    if args.junit:
        inputs = {Path(r).expanduser().absolute() for r in args.reports}
        target = Path(args.junit).expanduser().absolute()
        if target in inputs or (target.exists() and any(_same_file(target, i) for i in inputs)):
            raise UsageError(f"--junit {args.junit}: is one of the reports to merge; it would be overwritten")
    junit = _writable_file(args.junit, "--junit", fresh=True) if args.junit else None
    try:
        header, runs, extra = merge.merge([merge.load(path) for path in args.reports])
    except merge.MergeError as e:
        raise UsageError(str(e)) from None
    if junit:
        write_file(junit, format_junit(runs), "--junit")
    return _print_report(args, header, runs, extra, f"merged {len(args.reports)} report(s): {' '.join(args.reports)}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="work with `kvmpy selftest --json` reports")
    rsub = p.add_subparsers(dest="report_command", required=True)
    m = rsub.add_parser("merge", help="merge the shard reports of one run into its report and verdict",
                        description="Merge the --json reports of `kvmpy selftest --bed --shard K/N` runs into "
                                    "one report and one verdict, exit status as `kvmpy selftest` gives for the "
                                    "whole run. Refuses a row given twice, shards of different N, and missing "
                                    "shards (exit 2).")
    m.add_argument("reports", nargs="+", metavar="REPORT.json", help="shard reports (kvmpy selftest --json)")
    m.add_argument("--junit", metavar="FILE", help="also write the merged report as JUnit XML")
    out = m.add_mutually_exclusive_group()
    out.add_argument("--ktap", action="store_true", help="print KTAP instead of the table")
    out.add_argument("--json", action="store_true", help="print the merged report as JSON")
    m.set_defaults(func=_cmd_report_merge)


# Commands whose modules load only when the command line names them (`kvmpy perf`
# need not import the bed, nor `kvmpy selftest` the guest runtime): name ->
# (module whose register() fills in the command's parser, the help line).
LAZY_COMMANDS = {
    "perf": ("kvmpy.perf.cli", "performance tools (dirty logging, as the kernel's *_perf_test)"),
    "bed": ("kvmpy.bed.cli", "boot a kernel under QEMU and run commands or the selftests inside"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``kvmpy`` parser for the command line ``argv``: of the lazy commands, only the one
    ``argv`` names is filled in (the others keep their help line); all of them when None."""
    parser = argparse.ArgumentParser(prog="kvmpy", description="Drive KVM through /dev/kvm; run KVM MMU selftests.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="host KVM facts and what they mean for the tests")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-probe", action="store_true", help="skip the guest-memory MMU probe")
    p.set_defaults(func=_cmd_info)
    _add_selftest(sub)
    _add_report(sub)
    named = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (module, help_line) in LAZY_COMMANDS.items():
        if importlib.util.find_spec(module) is None:
            continue            # an install without it (the bed's modules are optional)
        p = sub.add_parser(name, help=help_line)
        if argv is None or named == name:
            importlib.import_module(module).register(p)
    return parser


class _Stopped(KeyboardInterrupt):
    def __init__(self, signo: int) -> None:
        super().__init__(f"signal {signo}")
        self.signo = signo


def _terminate(signo: int, _frame) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every finally (QEMU kill, module
    # parameter restore, temp dirs) runs before the process goes.
    raise _Stopped(signo)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one kvmpy command (``argv``: default ``sys.argv[1:]``) and return its exit status.

    While it runs, a stop signal unwinds it (host state restored) to the exit status 128+N.
    The handlers it installs for that are put back when it returns, except after a stop:
    the process is exiting then, and one more Ctrl-C must not kill it by the signal.
    """
    command_line = argv is None         # this process is the kvmpy command (not a caller's main([...]))
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if command_line:
        # What start-up made (modules, classes) lives until exit: move it out of the cyclic
        # collector's way, so that neither the run's collections nor the interpreter's exit walk
        # it again (some 7 ms of a `kvmpy perf` process, issue 16).
        gc.freeze()
    saved = {signo: signal.signal(signo, signal.default_int_handler if signo == signal.SIGINT else _terminate)
             for signo in stop_signals()}
    stopped = False
    try:
        return int(args.func(args) or 0)
    except (UsageError, OutputError) as e:
        from kvmpy.selftest.report import EXIT_NOT_TESTED
        command = args.command if args.command != "report" else f"report {args.report_command}"
        print(f"kvmpy {command}: error: {e}", file=sys.stderr)
        return EXIT_NOT_TESTED
    except KeyboardInterrupt as e:
        stopped = True
        signo = e.signo if isinstance(e, _Stopped) else signal.SIGINT
        # Stopping already: another Ctrl-C now would kill us by the signal, not exit 128+N.
        for other in stop_signals():
            signal.signal(other, signal.SIG_IGN)
        print(f"kvmpy: interrupted by {signal_name(signo)}", file=sys.stderr)
        return exit_for_signal(signo)
    finally:
        if not stopped:
            for signo, handler in saved.items():
                signal.signal(signo, signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":
    sys.exit(main())
