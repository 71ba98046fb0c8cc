"""`kvmpy bed`: set up the nested test bed, run a command in it, run the matrix.

    kvmpy bed setup [--kernel-version 6.12|6.1|all]
    kvmpy bed run [--param kvm.tdp_mmu=N ...] [--mem 2G] [--console] -- CMD...
    kvmpy bed matrix [--results DIR] [-- CMD...]     (default CMD: kvmpy selftest)

A thin front end of the library (:mod:`kvmpy.bed.testbed`): the arguments
become :class:`~kvmpy.bed.options.BedOptions`, checked before anything is
fetched or booted.  ``kvmpy/cli.py`` calls :func:`register`; :func:`main`
runs the ``bed`` command on its own (``python -m kvmpy.bed.cli run -- true``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from kvmpy.bed.backend import VENDOR_BACKENDS
from kvmpy.bed.debian import KERNEL_LINES
from kvmpy.bed.machine import ConsolePrinter
from kvmpy.bed.options import BedOptions
from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import BedResult, Job, kernel_splats
from kvmpy.bed.results import prepare_results_dir, save_result_or_keep
from kvmpy.bed.testbed import Bed

#: What ``kvmpy bed matrix`` runs when given no command: the selftest suite,
#: by the same command as on a host (a process, so the bed imports no runner).
SELFTEST_COMMAND = (sys.executable, "-m", "kvmpy.cli", "selftest")


def _err(msg: str) -> None:
    print(f"kvmpy bed: {msg}", file=sys.stderr, flush=True)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("machine")
    g.add_argument("--backend", choices=["qemu", "bochs"],
                   help="machine backend (default: by --vendor, else qemu)")
    g.add_argument("--vendor", choices=sorted(VENDOR_BACKENDS),
                   help="CPU vendor the bed emulates: amd = QEMU (SVM), intel = Bochs (VMX)")
    g.add_argument("--accel", choices=["tcg", "kvm"], default="tcg",
                   help="QEMU accelerator; kvm only where the host has nested virtualization")
    g.add_argument("--kernel-version", choices=KERNEL_LINES,
                   help="Debian kernel line to fetch (default 6.12)")
    g.add_argument("--kernel", type=Path, help="a bzImage you built (needs --modules)")
    g.add_argument("--modules", type=Path,
                   help="its modules: INSTALL_MOD_PATH root or lib/modules/RELEASE")
    g.add_argument("--mem", default="2G", help="guest memory (default 2G; 1 GiB-page tests need 4G)")
    g.add_argument("--smp", type=int, default=2, help="guest CPUs (default 2)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per boot before the machine is killed (default 600)")
    g.add_argument("--param", action="append", default=[], metavar="MODULE.PARAM=VALUE",
                   help="module parameter for the bed's KVM (repeatable)")
    g.add_argument("--hugepages", action="append", default=[], metavar="SIZE:COUNT",
                   help="reserve hugetlb pages at boot, e.g. 1G:1 or 2M:256 (repeatable)")
    g.add_argument("--console", action="store_true",
                   help="stream the whole guest console (default: only the command's output)")
    g.add_argument("--results", type=Path, metavar="DIR",
                   help="write the files the command left in $KVMPY_BED_RESULTS (and logs) here")


def register(bed: argparse.ArgumentParser) -> None:
    """Fill in the ``kvmpy bed`` parser (kvmpy.cli makes it, with its help line)."""
    bed.description = ("The nested test bed: a Debian (or your) kernel booted under QEMU with "
                       "nested KVM, the host's / mounted read-only inside. Inside, "
                       "$KVMPY_BED_RESULTS is a directory whose files come back to the host.")
    sub = bed.add_subparsers(dest="bed_command", required=True)

    p = sub.add_parser("setup", help="install-check the tools and fetch the kernel (idempotent)")
    p.add_argument("--kernel-version", choices=[*KERNEL_LINES, "all"], default=None)
    p.add_argument("--backend", choices=["qemu", "bochs"], default="qemu")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("run", help="run one command inside the bed; exit with its status")
    _add_common(p)
    p.add_argument("--follow", action="append", default=[], metavar="NAME",
                   help="a file in $KVMPY_BED_RESULTS to bring back even from a machine stopped or past "
                        "its timeout, as far as it was written (Bochs sends it over the console line by "
                        "line; QEMU's shared directory has it anyway); repeatable")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("matrix", help="run a command (default: the selftests) once per "
                                      "module-parameter configuration and print one table")
    _add_common(p)
    p.add_argument("--config", action="append", default=[], metavar="NAME",
                   help="only this configuration (repeatable)")
    p.add_argument("--quiet", action="store_true",
                   help="do not echo the command's output (only progress and the table)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...] (default: the selftests)")
    p.set_defaults(func=cmd_matrix)


def _command(args) -> List[str]:
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd


def bed_options(args) -> BedOptions:
    """The options of ``kvmpy bed run|matrix`` arguments (BedError if malformed)."""
    if args.vendor and args.backend and VENDOR_BACKENDS[args.vendor] != args.backend:
        by_vendor = ", ".join(f"{v} = {b}" for v, b in sorted(VENDOR_BACKENDS.items()))
        raise BedError(f"--vendor {args.vendor} and --backend {args.backend} contradict each other "
                       f"({by_vendor}); give one of them")
    backend = args.backend or (VENDOR_BACKENDS[args.vendor] if args.vendor else "qemu")
    return BedOptions.parse(
        backend=backend, kernel_line=args.kernel_version, kernel=args.kernel, modules=args.modules,
        accel=args.accel, mem=args.mem, smp=args.smp, timeout=args.timeout,
        params=args.param, hugepages=args.hugepages)


def _prepared_bed(args) -> Bed:
    """The bed of ``args``, ready to boot: options checked, then the results directory (created
    and writable), then the kernel checked and fetched; BedError for any of them."""
    options = bed_options(args)
    if args.results:
        prepare_results_dir(args.results)
    bed = Bed(options, log=_err)
    bed.prepare()
    return bed


def describe(result: BedResult) -> str:
    boot = f"boot {result.boot_seconds:.1f}s, " if result.boot_seconds is not None else ""
    status = result.status if result.status is not None else f"none ({result.error})"
    facts = result.facts
    machine = facts.backend + (f"/{facts.accel}" if facts.accel else "")
    return f"exit {status} ({boot}total {result.seconds:.1f}s; {machine}, kernel {facts.kernel})"


def _report_dropped(result: BedResult) -> None:
    for why in result.dropped:
        _err(f"result file not brought back: {why}")


def cmd_setup(args) -> int:
    from kvmpy.bed.initramfs import KVM_MODULES, SHARE_MODULES, build_initramfs

    lines = KERNEL_LINES if args.kernel_version == "all" else [args.kernel_version]
    try:
        for line in lines:
            t0 = time.monotonic()
            bed = Bed(BedOptions(backend=args.backend, kernel_line=line), log=_err)
            kernel = bed.prepare().kernel
            # Building the initramfs once decompresses and caches the modules.
            with tempfile.TemporaryDirectory(prefix="kvmpy-bed-setup-") as tmp:
                build_initramfs(kernel, Path(tmp) / "initrd", "status=0\n", SHARE_MODULES + KVM_MODULES)
            print(f"{line or bed.kernel_line}: {kernel.release} ready ({time.monotonic() - t0:.1f}s) "
                  f"{kernel.image}")
    except BedError as exc:
        _err(str(exc))
        return 2
    return 0


def cmd_run(args) -> int:
    command = _command(args)
    if not command:
        _err("nothing to run: kvmpy bed run [options] -- CMD [ARGS...]")
        return 2
    try:
        job = Job(command, on_console=ConsolePrinter(args.console), follow=tuple(args.follow))
        bed = _prepared_bed(args)
        result = bed.run(job)
    except BedError as exc:
        _err(str(exc))
        return 2
    saved = save_result_or_keep(result, args.results, _err) if args.results else True
    from kvmpy.bed.matrix import param_mismatches

    if not args.results and result.files:
        _err(f"returned {', '.join(sorted(result.files))} (use --results DIR to keep them)")
    _report_dropped(result)
    if result.status is None and not args.console:
        # The user saw only the command's output; show how the boot ended.
        print("\n".join(result.console.splitlines()[-25:]), file=sys.stderr)
    _err(describe(result))
    boot_splats, splats = kernel_splats(result)
    for splat in boot_splats:
        _err(f"note: kernel splat while the bed booted (before KVM was loaded):\n{splat}")
    for splat in splats:
        _err(f"kernel splat in the bed:\n{splat}")
    mismatches = param_mismatches(bed.options.params, result.params) if result.status is not None else []
    for problem in mismatches:
        _err(f"module parameter not applied: {problem}")
    for problem in result.bed_problems:     # a timeout, an init error, no KVM: nothing trustworthy ran
        _err(f"bed: {problem}")
    if mismatches or not saved or result.bed_problems:
        return 2
    code = result.exit_code
    return 1 if code == 0 and splats else code


def cmd_matrix(args) -> int:
    from kvmpy.bed import matrix

    try:
        bed = _prepared_bed(args)
        command = _command(args) or list(SELFTEST_COMMAND)
        configs = matrix.select_configs(bed.vendor, args.config)
    except BedError as exc:
        _err(str(exc))
        return 2
    # The command's output goes to stderr so that stdout holds the table.
    job = Job(command, on_console=None if args.quiet else ConsolePrinter(args.console, sys.stderr))

    unsaved: List[str] = []

    def progress(i: int, n: int, row) -> None:
        _err(row.progress_line(i, n))
        _report_dropped(row.result)
        # now, so a long matrix can be inspected while it runs; a failure does not stop the matrix
        if args.results and not save_result_or_keep(row.result, args.results / row.config.name, _err):
            unsaved.append(row.config.name)

    _err(f"matrix of {len(configs)} configurations on {bed.describe()}: {' '.join(command)}")
    t0 = time.monotonic()
    try:
        rows = matrix.run_matrix([(bed, config) for config in configs], job, progress)
    except BedError as exc:
        _err(str(exc))
        return 2
    print(matrix.format_table(rows, f"kvmpy bed matrix ({bed.describe()}, {time.monotonic() - t0:.0f}s)"))
    for row in rows:
        for splat in row.splats:
            print(f"\n{row.config.name}: kernel splat\n{splat}")
    if unsaved:
        _err(f"results of {', '.join(unsaved)} not saved in {args.results} (see above)")
        return 2
    return matrix.exit_status(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``kvmpy bed ...`` without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="kvmpy")
    register(parser.add_subparsers(dest="command", required=True).add_parser("bed"))
    args = parser.parse_args(["bed", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
