"""The `kvmpy` command: info, selftest, perf, bed."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Sequence

from kvmpy import faults


def _cmd_info(args: argparse.Namespace) -> int:
    from kvmpy import hostinfo

    facts = hostinfo.gather(probe=not args.no_probe)
    if args.json:
        print(json.dumps(facts.to_dict(), indent=1))
    else:
        print(hostinfo.format_facts(facts))
    return 0 if not (facts.error or facts.mmu_probe_error) else 1


def _add_selftest(sub) -> None:
    p = sub.add_parser("selftest", help="run the KVM selftest suite and print its report",
                       description="Run kvmpy's selftests against this host's KVM (or inside the test bed) "
                                   "and print one table. Exit 0: tested, and everything passed, skipped with "
                                   "a reason or failed as a listed known issue; 1: a failure or an unexplained "
                                   "kernel splat; 2: not tested (no usable /dev/kvm), harness or usage error; "
                                   "128+N: stopped by signal N (130 Ctrl-C, 143 SIGTERM), partial results.")
    p.add_argument("-k", dest="keyword", help="only tests matching this pytest -k expression")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML here (relative to the current directory; "
                                                   "its directory must exist)")
    p.add_argument("--ktap", action="store_true", help="print KTAP instead of the table")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
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
        bed.add_argument("--timeout", type=float, help="seconds per boot"),
    ]
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p.set_defaults(func=_cmd_selftest, bed_only=bed_only)


class UsageError(Exception):
    """Bad command-line input, found before anything ran (exit 2)."""


def _check_selftest_args(args: argparse.Namespace) -> None:
    """Reject what would be silently ignored; resolve --junit against the user's directory."""
    if not args.bed:
        given = [a.option_strings[0] for a in args.bed_only if getattr(args, a.dest) not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)}: test bed option{'s' if len(given) > 1 else ''}, "
                             f"ignored without --bed (add --bed, or drop {'them' if len(given) > 1 else 'it'})")
    args.accel = args.accel or "tcg"
    args.param = args.param or []
    try:
        faults.enabled()
    except faults.FaultError as e:
        raise UsageError(str(e)) from None
    if args.junit:
        args.junit = str(_writable_file(args.junit, "--junit"))


def _writable_file(text: str, option: str) -> Path:
    """``text`` as an absolute path that can be written now, or UsageError saying why not."""
    path = Path(text).expanduser().absolute()
    if not path.parent.is_dir():
        raise UsageError(f"{option} {text}: directory {path.parent} does not exist")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"{option} {text}: cannot write {path}: {e.strerror}") from None
    if not existed:
        path.unlink()
    return path


def _cmd_selftest(args: argparse.Namespace) -> int:
    from kvmpy import hostinfo
    from kvmpy.selftest import report, runner

    _check_selftest_args(args)
    facts = hostinfo.gather(probe=True)
    header = facts.to_dict()
    machine = args.json or args.ktap
    if not machine:
        print(hostinfo.format_facts(facts), flush=True)
        if faults.enabled():
            print(f"FAULTS INJECTED ({faults.ENV}): {', '.join(sorted(faults.enabled()))} -- this run tests "
                  f"the tests: it must fail", flush=True)
        print(flush=True)
    if args.bed:
        from kvmpy.selftest import bed_runner

        runs = bed_runner.run(args, quiet=machine)
    else:
        runs = [runner.run_host(args.junit, args.keyword, args.pytest_args,
                                config=f"host {facts.vendor_module or ''}".strip(), machine_output=machine)]
    if args.json:
        print(report.to_json(header, runs))
    elif args.ktap:
        print(report.format_ktap(runs), end="")
    else:
        print()
        setting = report.format_setting(runs)
        if setting:  # the bed's facts, per configuration: what was tested
            print(setting)
            print()
        print(report.format_table(runs))
    return report.exit_status(runs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmpy", description="Drive KVM through /dev/kvm; run KVM MMU selftests.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="host KVM facts and what they mean for the tests")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-probe", action="store_true", help="skip the guest-memory MMU probe")
    p.set_defaults(func=_cmd_info)
    _add_selftest(sub)
    from kvmpy.perf import cli as perf_cli

    perf_cli.register(sub)
    import importlib.util

    if importlib.util.find_spec("kvmpy.bed.cli") is not None:
        from kvmpy.bed import cli as bed_cli

        bed_cli.register(sub)
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
    from kvmpy.selftest.report import EXIT_NOT_TESTED, exit_for_signal, signal_name
    from kvmpy.selftest.runner import stop_signals

    parser = build_parser()
    args = parser.parse_args(argv)
    for signo in stop_signals():
        signal.signal(signo, signal.default_int_handler if signo == signal.SIGINT else _terminate)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"kvmpy {args.command}: error: {e}", file=sys.stderr)
        return EXIT_NOT_TESTED
    except KeyboardInterrupt as e:
        signo = e.signo if isinstance(e, _Stopped) else signal.SIGINT
        print(f"kvmpy: interrupted by {signal_name(signo)}", file=sys.stderr)
        return exit_for_signal(signo)


if __name__ == "__main__":
    sys.exit(main())
