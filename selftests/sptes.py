"""SPTE counts of a VM (the pages_4k/2m/1g stats) and their differences, as the MMU tests assert
them; its NX huge-page splits (nx_lpage_splits) and waiting for their recovery."""
from __future__ import annotations

import time

from kvmpy.vm import Vm

SIZES = ("pages_4k", "pages_2m", "pages_1g")


def counts(vm: Vm) -> dict[str, int]:
    """pages_4k/2m/1g of ``vm`` right now."""
    snap = vm.stats.snapshot()
    return {k: int(snap[k]) for k in SIZES}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in SIZES}


def sized(pages_4k: int = 0, pages_2m: int = 0, pages_1g: int = 0) -> dict[str, int]:
    """A counts/delta dict: ``sized(pages_4k=512, pages_2m=-1)`` is one 2M SPTE split."""
    return {"pages_4k": pages_4k, "pages_2m": pages_2m, "pages_1g": pages_1g}


def scaled(d: dict[str, int], n: int) -> dict[str, int]:
    """``d`` ``n`` times over: ``scaled(sized(pages_4k=512, pages_2m=-1), 2)`` is two splits."""
    return {k: v * n for k, v in d.items()}


PREFETCH = 8                    # PTE_PREFETCH_NUM: a direct shadow page's fault maps 8 4K SPTEs
NX_RECOVERY_PERIOD_MS = 100     # what the NX tests set kvm.nx_huge_pages_recovery_period_ms to
NX_RECOVERY_DEADLINE = 60.0     # seconds; the worker's first pass comes one period after it starts


def nx_splits(vm: Vm) -> int:
    """nx_lpage_splits: shadow pages that replace a huge page only because of an instruction fetch."""
    return int(vm.stats.read("nx_lpage_splits"))


def wait_nx_recovered(vm: Vm) -> float:
    """Poll until ``vm``'s nx_lpage_splits is 0 (the recovery worker, started with ratio 1 and
    NX_RECOVERY_PERIOD_MS, zapped or unaccounted every split); the seconds it took."""
    start = time.monotonic()
    while (left := nx_splits(vm)) and time.monotonic() - start < NX_RECOVERY_DEADLINE:
        time.sleep(0.02)
    assert not left, (f"the NX recovery worker (ratio 1, period {NX_RECOVERY_PERIOD_MS} ms) left "
                      f"nx_lpage_splits at {left} for {NX_RECOVERY_DEADLINE:.0f} s")
    return time.monotonic() - start
