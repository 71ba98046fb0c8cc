"""The `kvmpy` command: info, selftest, bed."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    from kvmpy import hostinfo

    facts = hostinfo.gather(probe=not args.no_probe)
    if args.json:
        print(json.dumps(facts.to_dict(), indent=1))
    else:
        print(hostinfo.format_facts(facts))
    return 0 if not facts.error else 1


def _add_selftest(sub) -> None:
    p = sub.add_parser("selftest", help="run the KVM selftest suite and print its report",
                       description="Run kvmpy's selftests against this host's KVM (or inside the test bed) "
                                   "and print one table. Exit 0: all passed or skipped with a reason; "
                                   "1: a failure; 2: harness error.")
    p.add_argument("-k", dest="keyword", help="only tests matching this pytest -k expression")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
    p.add_argument("--ktap", action="store_true", help="print KTAP instead of the table")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--bed", action="store_true", help="run inside the nested test bed instead of on this host")
    p.add_argument("--matrix", action="store_true", help="with --bed: once per module-parameter configuration")
    p.add_argument("--kernel", help="with --bed: a bzImage to boot (your patched kernel)")
    p.add_argument("--modules", help="with --bed --kernel: the matching modules directory (lib/modules/VERSION)")
    p.add_argument("--kernel-version", help="with --bed: Debian kernel line to fetch (6.12 or 6.1)")
    p.add_argument("--backend", choices=["qemu", "bochs"], help="with --bed: machine backend (default qemu)")
    p.add_argument("--accel", choices=["tcg", "kvm"], default="tcg",
                   help="with --bed and QEMU: kvm where the host has nested virtualization (default tcg)")
    p.add_argument("--param", action="append", default=[], metavar="MODULE.PARAM=VALUE",
                   help="with --bed: a module parameter (repeatable)")
    p.add_argument("--timeout", type=float, help="with --bed: seconds per boot")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p.set_defaults(func=_cmd_selftest)


def _cmd_selftest(args: argparse.Namespace) -> int:
    from kvmpy import hostinfo
    from kvmpy.selftest import report, runner

    facts = hostinfo.gather(probe=True)
    header = facts.to_dict()
    machine = args.json or args.ktap
    if not machine:
        print(hostinfo.format_facts(facts), flush=True)
        print(flush=True)
    if args.bed:
        from kvmpy.selftest import bed_runner

        runs = bed_runner.run(args, quiet=machine)
    else:
        if facts.error and not machine:
            print(f"note: {facts.error}; every selftest will skip", flush=True)
        runs = [runner.run_host(args.junit, args.keyword, args.pytest_args,
                                config=f"host {facts.vendor_module or ''}".strip(), machine_output=machine)]
    if args.json:
        print(report.to_json(header, runs))
    elif args.ktap:
        print(report.format_ktap(runs), end="")
    else:
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
    import importlib.util

    if importlib.util.find_spec("kvmpy.bed.cli") is not None:
        from kvmpy.bed import cli as bed_cli

        bed_cli.register(sub)
    return parser


def _terminate(signo: int, _frame) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every finally (QEMU kill, module
    # parameter restore, temp dirs) runs before the process goes.
    raise KeyboardInterrupt(f"signal {signo}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for signo in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signo, _terminate)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("kvmpy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
