"""ci/bench/side_by_side.py's summary of a row: median ratio, middle half, and the median's interval."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ci" / "bench"))
import side_by_side as sbs  # noqa: E402


def _row(ratios: list[float], target: float = 1.0) -> sbs.Result:
    r = sbs.Result("row", "whole run", "s", target=target, pairs=[(x * 2.0, 2.0) for x in ratios])
    r.summarize()
    return r


def test_interval_of_identical_pairs_is_their_ratio():
    r = _row([1.05] * 21)
    assert r.ratio == pytest.approx(1.05)
    assert r.spread == pytest.approx((1.05, 1.05))
    assert r.interval == pytest.approx((1.05, 1.05))


def test_interval_holds_the_median_inside_the_pairs_and_is_repeatable():
    ratios = [0.90 + 0.005 * i for i in range(41)]          # 0.90 .. 1.10, median 1.00
    r = _row(ratios)
    lo, hi = r.interval
    assert 0.90 <= lo < r.ratio < hi <= 1.10
    q1, q3 = r.spread
    assert q1 <= lo and hi <= q3                            # the median is known better than a pair
    assert r.interval == (lo, hi)                           # fixed seed: the same table twice


def test_a_row_clearly_over_its_target_is_over_with_its_whole_interval():
    r = _row([1.20 + 0.001 * (i % 7) for i in range(21)])
    assert not r.ok
    assert r.interval[0] > r.target
    table = sbs.format_table([r], {"date": "d", "cpu": "c", "cpus": 2, "kernel": "k", "kvm": "kvm_amd",
                                   "load": (0.0, 0.0, 0.0)}, "6.12", (0.0, 0.0, 0.0))
    lo, hi = r.interval
    assert f"{lo:.2f}-{hi:.2f}" in table and "OVER (whole run)" in table
