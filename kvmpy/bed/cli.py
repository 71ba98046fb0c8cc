"""`kvmpy bed`: set up the nested test bed, run a command in it, run the matrix.

    kvmpy bed setup [--kernel-version 6.12|6.1|all]
    kvmpy bed run [--param kvm.tdp_mmu=N ...] [--mem 2G] [--console] -- CMD...
    kvmpy bed matrix [--results DIR] [-- CMD...]     (default CMD: the selftests)

The lead's ``kvmpy/cli.py`` calls :func:`register`; :func:`main` runs the
``bed`` command on its own (``python -m kvmpy.bed.cli run -- true``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from kvmpy.bed.backend import (
    MARKER, VENDOR_BACKENDS, Backend, BedError, BedRequest, BedResult, backend_class,
    kernel_splats, parse_hugepages, parse_param,
)
from kvmpy.bed.kernel import KERNEL_LINES, Kernel, fetch_debian, user_kernel


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


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``bed`` command to the top-level ``kvmpy`` subparsers."""
    bed = subparsers.add_parser(
        "bed", help="boot a kernel under QEMU and run commands or the selftests inside",
        description="The nested test bed: a Debian (or your) kernel booted under QEMU with "
                    "nested KVM, the host's / mounted read-only inside. Inside, "
                    "$KVMPY_BED_RESULTS is a directory whose files come back to the host.")
    sub = bed.add_subparsers(dest="bed_command", required=True)

    p = sub.add_parser("setup", help="install-check the tools and fetch the kernel (idempotent)")
    p.add_argument("--kernel-version", choices=[*KERNEL_LINES, "all"], default=None)
    p.add_argument("--backend", choices=["qemu", "bochs"], default="qemu")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("run", help="run one command inside the bed; exit with its status")
    _add_common(p)
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
    return bed


def _command(args) -> List[str]:
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd


def pick_backend(args) -> type:
    name = args.backend or (VENDOR_BACKENDS[args.vendor] if getattr(args, "vendor", None) else "qemu")
    return backend_class(name)


def prepare_kernel(args, cls: type, log: Callable[[str], None] = _err) -> Kernel:
    """The kernel named by --kernel/--modules or --kernel-version (fetched if needed)."""
    if args.kernel or args.modules:
        if not (args.kernel and args.modules):
            raise BedError("--kernel and --modules go together")
        return user_kernel(args.kernel, args.modules)
    return fetch_debian(args.kernel_version or cls.default_kernel_line, log=log)


def make_backend(args, log: Callable[[str], None] = _err) -> Backend:
    """Backend instance for the parsed arguments (kernel fetched, tools checked)."""
    cls = pick_backend(args)
    kernel = prepare_kernel(args, cls, log)
    options = {"accel": args.accel} if cls.name == "qemu" else {}
    if cls.name != "qemu" and args.accel != "tcg":
        raise BedError(f"--accel applies to QEMU only, not {cls.name}")
    backend = cls(kernel, **options)
    backend.check()
    return backend


class ConsolePrinter:
    """Echo console lines: everything, or only the command's own output."""

    def __init__(self, everything: bool, stream=None) -> None:
        self.everything = everything
        self.stream = stream or sys.stdout
        self.inside = False

    def __call__(self, line: str) -> None:
        if self.everything:
            print(line, file=self.stream, flush=True)
            return
        if MARKER in line:
            if line.rstrip().endswith(f"{MARKER} ready"):
                self.inside = True
            elif f"{MARKER} exit " in line:
                self.inside = False
            elif f"{MARKER} error" in line:
                print(line, file=self.stream, flush=True)
            return
        if self.inside:
            print(line, file=self.stream, flush=True)


def build_request(args, command: Sequence[str], on_console=None) -> BedRequest:
    params = dict(parse_param(p) for p in args.param)
    hugepages = dict(parse_hugepages(h) for h in getattr(args, "hugepages", None) or [])
    return BedRequest(command=list(command), params=params, mem=args.mem, smp=args.smp,
                      timeout=args.timeout, on_console=on_console, hugepages=hugepages)


def describe(result: BedResult, backend: Backend) -> str:
    boot = f"boot {result.boot_seconds:.1f}s, " if result.boot_seconds is not None else ""
    status = result.status if result.status is not None else f"none ({result.error})"
    accel = f"/{backend.accel}" if hasattr(backend, "accel") else ""
    return (f"exit {status} ({boot}total {result.seconds:.1f}s; "
            f"{backend.name}{accel}, kernel {backend.kernel.release})")


def cmd_setup(args) -> int:
    from kvmpy.bed.initramfs import KVM_MODULES, SHARE_MODULES, build_initramfs
    import tempfile

    cls = backend_class(args.backend)
    lines = KERNEL_LINES if args.kernel_version == "all" else [args.kernel_version or cls.default_kernel_line]
    for line in lines:
        t0 = time.monotonic()
        kernel = fetch_debian(line, log=_err)
        cls(kernel).check()
        # Building the initramfs once decompresses and caches the modules.
        with tempfile.TemporaryDirectory(prefix="kvmpy-bed-setup-") as tmp:
            build_initramfs(kernel, Path(tmp) / "initrd", "status=0\n", SHARE_MODULES + KVM_MODULES)
        print(f"{line}: {kernel.release} ready ({time.monotonic() - t0:.1f}s) {kernel.image}")
    return 0


def cmd_run(args) -> int:
    command = _command(args)
    if not command:
        _err("nothing to run: kvmpy bed run [options] -- CMD [ARGS...]")
        return 2
    try:
        backend = make_backend(args)
        request = build_request(args, command, ConsolePrinter(args.console))
        result = backend.run(request)
    except BedError as exc:
        _err(str(exc))
        return 2
    from kvmpy.bed.matrix import param_mismatches, save_files

    if args.results:
        save_files(result, args.results)
    elif result.files:
        _err(f"returned {', '.join(sorted(result.files))} (use --results DIR to keep them)")
    if result.status is None and not args.console:
        # The user saw only the command's output; show how the boot ended.
        print("\n".join(result.console.splitlines()[-25:]), file=sys.stderr)
    _err(describe(result, backend))
    boot_splats, splats = kernel_splats(result)
    for splat in boot_splats:
        _err(f"note: kernel splat while the bed booted (before KVM was loaded):\n{splat}")
    for splat in splats:
        _err(f"kernel splat in the bed:\n{splat}")
    mismatches = param_mismatches(request.params, result.params) if result.status is not None else []
    for problem in mismatches:
        _err(f"module parameter not applied: {problem}")
    if mismatches:
        return 2
    code = result.exit_code
    return 1 if code == 0 and splats else code


def cmd_matrix(args) -> int:
    from kvmpy.bed import matrix

    try:
        backend = make_backend(args)
        command = _command(args) or matrix.suite_command()
        configs = list(matrix.matrix_for(backend.vendor))
        if args.config:
            unknown = set(args.config) - {c.name for c in configs}
            if unknown:
                raise BedError(f"unknown --config {', '.join(sorted(unknown))}; "
                               f"choose from {', '.join(c.name for c in configs)}")
            configs = [c for c in configs if c.name in args.config]
        # The command's output goes to stderr so that stdout holds the table.
        printer = None if args.quiet else ConsolePrinter(args.console, sys.stderr)
        request = build_request(args, command, printer)
    except BedError as exc:
        _err(str(exc))
        return 2

    def progress(i: int, n: int, row) -> None:
        _err(f"[{i}/{n}] {row.config.name}: {row.verdict} {row.detail} ({row.result.seconds:.0f}s)")
        if args.results:  # now, so a long matrix can be inspected while it runs
            matrix.save_files(row.result, args.results / row.config.name)

    _err(f"matrix of {len(configs)} configurations on {backend.name}, kernel "
         f"{backend.kernel.release}: {' '.join(command)}")
    t0 = time.monotonic()
    rows = matrix.run_matrix(backend, request, configs, progress)
    print(matrix.format_table(
        rows, f"kvmpy bed matrix ({backend.name}, {backend.kernel.release}, "
              f"{time.monotonic() - t0:.0f}s)"))
    for row in rows:
        for splat in row.splats:
            print(f"\n{row.config.name}: kernel splat\n{splat}")
    return matrix.exit_status(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``kvmpy bed ...`` without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="kvmpy")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bed", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
