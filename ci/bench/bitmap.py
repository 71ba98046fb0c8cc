#!/usr/bin/env python3
"""Benchmark: harvesting-side bitmap work for a 64 GiB slot (16 Mi pages).

The target from the design: fetch-to-answer work on a 64 GiB slot's bitmap
(count, list set pages, diff against the previous round) well under 50 ms.
Run: .venv/bin/python ci/bench/bitmap.py
"""
from __future__ import annotations

import random
import time

from kvmpy.bitmap import DirtyBitmap

NPAGES = 16 << 20


def best_of(fn, n=7) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def main() -> None:
    rng = random.Random(1)
    sparse = DirtyBitmap.from_pages(NPAGES, rng.sample(range(NPAGES), 100_000))
    full = DirtyBitmap(NPAGES, bytearray(b"\xff" * (NPAGES // 8)))
    prev = DirtyBitmap.from_pages(NPAGES, rng.sample(range(NPAGES), 100_000))
    print(f"{'operation':<40} {'ms (best of 7)':>14}")
    for name, fn in [
        ("count, 16 Mi bits all set", full.count),
        ("count, 100k set", sparse.count),
        ("pages(), 100k set", sparse.pages),
        ("pages(), 16 Mi set", full.pages),
        ("difference (a - b)", lambda: sparse - prev),
        ("union (a | b)", lambda: sparse | prev),
    ]:
        print(f"{name:<40} {best_of(fn):>14.2f}")


if __name__ == "__main__":
    main()
