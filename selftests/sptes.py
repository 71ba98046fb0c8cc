"""SPTE counts of a VM (the pages_4k/2m/1g stats) and their differences, as the MMU tests assert them."""
from __future__ import annotations

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
