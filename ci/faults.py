#!/usr/bin/env python3
"""Fault injection, the test of the tests: with each of kvmpy's named faults on, the runs that
must catch it have to fail.

    .venv/bin/python ci/faults.py [--bed] [FAULT...]     (default: every fault in kvmpy.faults.FAULTS)

For each fault, with KVMPY_FAULTS=<fault>: its unit tests (pytest), its host selftests
(`kvmpy selftest -k`) and, with --bed, its selftests inside the test bed (`kvmpy selftest --bed -k`).
A run counts as catching the fault when it fails because a test failed or because the harness
said why it could not test; a run that passes, is interrupted, or selects no test does not.
Prints one line per run; exit 1 if any fault went uncaught.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvmpy import faults  # noqa: E402
from kvmpy.selftest.report import FAILING  # noqa: E402

KVMPY = [sys.executable, "-m", "kvmpy.cli"]
# A harness error that says nothing about the fault: the selection itself was wrong.
NOT_A_CATCH = ("no tests collected", "usage error")


def selftest_run(fault: str, keyword: str, bed: bool) -> tuple[bool, str]:
    """Run `kvmpy selftest [--bed] --json -k keyword` with ``fault`` on: (caught, what happened)."""
    cmd = KVMPY + ["selftest", "--json", "-k", keyword] + (["--bed"] if bed else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **{faults.ENV: fault}), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        return False, f"exit {proc.returncode} without a JSON report"
    failed = [t["nodeid"].rpartition("::")[2] for r in result["runs"] for t in r["tests"]
              if t["outcome"] in FAILING]
    errors = [r["harness_error"] for r in result["runs"] if r["harness_error"]]
    interrupted = any(r["interrupted"] for r in result["runs"])
    real_errors = [e for e in errors if not any(n in e for n in NOT_A_CATCH)]
    caught = proc.returncode != 0 and not interrupted and bool(failed or real_errors)
    what = f"exit {proc.returncode}"
    if failed:
        what += f", {len(failed)} failed: {', '.join(failed[:4])}{' ...' if len(failed) > 4 else ''}"
    if errors:
        what += f", harness error: {errors[0][:120]}"
    if not failed and not errors:
        passed = sum(1 for r in result["runs"] for t in r["tests"] if t["outcome"] == "passed")
        what += f", nothing failed ({passed} passed)"
    return caught, what


def unit_run(fault: str, paths: tuple[str, ...]) -> tuple[bool, str]:
    """Run the unit tests ``paths`` with ``fault`` on: caught when some test fails (pytest exit 1)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths], cwd=ROOT,
                          env=dict(os.environ, **{faults.ENV: fault}), capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode == 1, f"exit {proc.returncode}: {lines[-1] if lines else proc.stderr.strip()[:120]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("faults", nargs="*", metavar="FAULT", help=f"default: all ({', '.join(faults.FAULTS)})")
    p.add_argument("--bed", action="store_true", help="run the faults' bed selftests (boots the test bed)")
    args = p.parse_args(argv)
    names = args.faults or list(faults.FAULTS)
    unknown = [n for n in names if n not in faults.FAULTS]
    if unknown:
        p.error(f"unknown fault(s) {', '.join(unknown)}")
    missed, nruns = [], 0
    for name in names:
        f = faults.FAULTS[name]
        runs = [("unit", lambda: unit_run(name, f.unit))] if f.unit and not args.bed else []
        if f.host and not args.bed:
            runs.append((f"host -k '{f.host}'", lambda: selftest_run(name, f.host, False)))
        if f.bed and args.bed:
            runs.append((f"bed -k '{f.bed}'", lambda: selftest_run(name, f.bed, True)))
        for where, run in runs:
            nruns += 1
            t0 = time.monotonic()
            caught, what = run()
            print(f"{'caught' if caught else 'MISSED':7} {name:24} {where:50} {what} ({time.monotonic() - t0:.0f}s)",
                  flush=True)
            if not caught:
                missed.append(f"{name} ({where})")
    if missed:
        print(f"\n{len(missed)} run(s) passed with a fault on: the suite does not catch {'; '.join(missed)}")
        return 1
    print(f"\nevery fault caught ({nruns} run(s) of {len(names)} fault(s), each failed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
