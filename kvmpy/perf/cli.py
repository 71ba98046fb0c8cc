"""`kvmpy perf ...`: the command line of the performance tools."""
from __future__ import annotations

import argparse
import json
import re
import sys

from kvmpy import faults
from kvmpy.errors import KvmError, RequirementError
from kvmpy.memory import Backing, backing_by_name
from kvmpy.output import OutputError, emit
from kvmpy.perf.memstress import MemstressConfig

# dirty_log_perf_test's -s names, next to kvmpy's own backing names.
C_BACKINGS = {"anonymous_thp": "thp", "anonymous_hugetlb": "hugetlb-2M", "anonymous_hugetlb_2mb": "hugetlb-2M",
              "anonymous_hugetlb_1gb": "hugetlb-1G", "shmem": "shared-memfd"}
EXIT_ERROR = 2


def parse_size(text: str) -> int:
    """Bytes from "[0-9]+[kmgt]?" (case-insensitive), as the kernel selftests' parse_size()."""
    m = re.fullmatch(r"(\d+)([kmgtKMGT]?)[bB]?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64M or 4G")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


def parse_backing(text: str) -> Backing:
    try:
        return backing_by_name(C_BACKINGS.get(text, text))
    except KvmError as e:
        raise argparse.ArgumentTypeError(f"{e} (or dirty_log_perf_test's {', '.join(C_BACKINGS)})") from None


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError("on or off")
    return text == "on"


def register(perf: argparse.ArgumentParser) -> None:
    """Fill in the ``kvmpy perf`` parser (kvmpy.cli makes it, with its help line)."""
    perf.description = "Performance tools driving KVM like the kernel's C *_perf_test programs."
    tools = perf.add_subparsers(dest="tool", required=True)
    p = tools.add_parser(
        "dirty-log", help="the phases of dirty_log_perf_test: populate, enable, dirty/get/clear, disable",
        description="Time the phases of the kernel's dirty_log_perf_test (same options where they exist, same "
                    "printout): the memstress guest populates its memory, then each iteration dirties it and "
                    "fetches (and clears) the dirty log. The guest runs at ring 0 as the C test's does (on "
                    "kvm_pvm the instruction emulator runs it); --user-mode runs it at CPL3.")
    p.add_argument("-v", "--vcpus", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("-b", "--bytes", type=parse_size, default=1 << 30, metavar="SIZE",
                   help="memory each vCPU dirties, e.g. 64M or 4G (default 1G); 4K guest pages")
    p.add_argument("-i", "--iterations", type=int, default=2, help="dirty/get iterations, at least 2 (default 2)")
    p.add_argument("-w", "--write-percent", type=int, default=100, metavar="PCT",
                   help="chance in %% that a page is written rather than read (default 100)")
    p.add_argument("-a", "--random", action="store_true", help="touch pages at random rather than in order")
    p.add_argument("-o", "--overlap", action="store_true", help="every vCPU on all the memory (not partitioned)")
    p.add_argument("-s", "--backing", type=parse_backing, default=None, metavar="NAME",
                   help="anonymous (default), thp, hugetlb-2M, hugetlb-1G, shared-memfd (or the C test's names)")
    p.add_argument("-x", "--slots", type=int, default=1, help="split the memory into this many memslots")
    p.add_argument("-g", "--no-manual-protect", action="store_true",
                   help="no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG also re-protects")
    p.add_argument("-r", "--seed", type=int, default=None,
                   help="the guest's random seed (default 1; it chooses pages with -a, and reads against writes "
                        "with -w between 1 and 99)")
    p.add_argument("-n", "--nested", action="store_true", help="run the guest loop in L2 (SVM+NPT or VMX+EPT)")
    p.add_argument("--clear-chunk", type=int, metavar="PAGES",
                   help="KVM_CLEAR_DIRTY_LOG in calls of this many pages (a multiple of 64; default: whole slot)")
    p.add_argument("--dirty-ring", type=int, default=0, metavar="ENTRIES",
                   help="per-vCPU dirty rings of this many entries instead of the dirty bitmap")
    p.add_argument("--eager-split", type=_on_off, metavar="on|off",
                   help="set kvm.eager_page_split for the run (needs root; restored after)")
    p.add_argument("--user-mode", action="store_true", help="run the guest at CPL3 (natively on kvm_pvm)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds per guest pass, more than 0 (default 3600)")
    p.add_argument("--json", action="store_true", help="print the times and stats deltas as JSON")
    p.set_defaults(func=_cmd_dirty_log)


def options_from(args: argparse.Namespace):
    """The DirtyLogOptions the command line asks for."""
    from kvmpy.perf.dirty_log import DirtyLogOptions

    seed = 1 if args.seed is None else args.seed
    ms = MemstressConfig(vcpus=args.vcpus, vcpu_bytes=args.bytes, slots=args.slots, backing=args.backing,
                         partition=not args.overlap, user_mode=args.user_mode, nested=args.nested, seed=seed)
    return DirtyLogOptions(memstress=ms, iterations=args.iterations, write_percent=args.write_percent,
                           random_access=args.random, manual_protect=not args.no_manual_protect,
                           clear_chunk=args.clear_chunk, dirty_ring=args.dirty_ring, eager_split=args.eager_split,
                           timeout=args.timeout)


def check_args(args: argparse.Namespace) -> None:
    """OptionConflict for options of which one would do nothing (what the options alone cannot say)."""
    from kvmpy.perf.dirty_log import OptionConflict

    if args.seed is not None and not args.random and args.write_percent in (0, 100):
        raise OptionConflict(f"-r with -w {args.write_percent} and without -a: the guest's random numbers choose "
                             f"pages only with -a, and reads against writes only with -w between 1 and 99, so "
                             f"the seed would change nothing; drop -r, or add -a or such a -w")


def _cmd_dirty_log(args: argparse.Namespace) -> int:
    from kvmpy.perf import dirty_log

    name = "kvmpy perf dirty-log"
    try:
        faults.enabled()
        check_args(args)
        opts = options_from(args)
        opts.check()
    except KvmError as e:      # FaultError, OptionConflict, a value out of range: usage errors
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if sys.stdout is None:
        print(f"{name}: cannot write to standard output: it is closed", file=sys.stderr)
        return EXIT_ERROR
    banner = dirty_log.faults_banner()
    if banner and args.json:   # the printout carries it; with --json also say it where a person looks
        print(f"{name}: {banner}", file=sys.stderr, flush=True)
    try:
        report = dirty_log.run(opts, out=(lambda line: None) if args.json else emit)
        if args.json:
            emit(json.dumps(report.to_dict(), indent=1))
    except OutputError as e:
        print(f"{name}: {e}; the results are lost", file=sys.stderr)
        return EXIT_ERROR
    except RequirementError as e:
        print(f"{name}: cannot run here: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KvmError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0
