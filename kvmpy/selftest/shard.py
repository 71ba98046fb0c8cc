"""Shards: the K-th of N deterministic slices of a bed run's rows (kernel x configuration x backend).

A CI system's own matrix (GitHub Actions ``strategy.matrix``, GitLab ``parallel``)
runs ``kvmpy selftest --bed --matrix --shard K/N --json`` once per K on its runners;
``kvmpy report merge`` (:mod:`kvmpy.selftest.merge`) joins their reports into the
report of the whole run. Shard K gets the K-th of N contiguous, near-equal blocks of
the rows in the run's order, so that rows of one kernel tend to share a runner (one
kernel fetched per runner) and the merged rows come back in the unsharded order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kvmpy.selftest.json_fields import describe, expect, require


class ShardError(ValueError):
    """A --shard that cannot be run (malformed, or a slice with no rows): a usage error."""


def parse(text: str) -> tuple[int, int]:
    """``"K/N"`` as (K, N), 1 <= K <= N; ShardError saying what is wrong otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise ShardError(f"--shard {text!r}: expected K/N, e.g. 1/4 (the K-th of N slices)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise ShardError(f"--shard {text}: K must be 1..N and N at least 1")
    return k, n


def slice_of(rows: list[str], k: int, n: int) -> list[str]:
    """Shard ``k`` of ``n`` of ``rows``: the k-th of n contiguous blocks whose sizes differ by at most 1."""
    return rows[(k - 1) * len(rows) // n:k * len(rows) // n]


@dataclass(frozen=True)
class Shard:
    """Which slice of which rows a run ran: ``rows`` of ``all_rows`` (in the run's order)."""

    index: int
    count: int
    rows: tuple[str, ...]
    all_rows: tuple[str, ...]

    @classmethod
    def select(cls, text: str, all_rows: list[str]) -> "Shard":
        """The shard ``text`` (K/N) of ``all_rows``; ShardError if it has no rows (nothing would be tested)."""
        k, n = parse(text)
        rows = slice_of(all_rows, k, n)
        if not rows:
            raise ShardError(f"--shard {k}/{n}: no rows in this slice: the run has {len(all_rows)} row(s) "
                             f"({', '.join(all_rows) or 'none'}); use N <= {len(all_rows)}")
        return cls(k, n, tuple(rows), tuple(all_rows))

    @property
    def name(self) -> str:
        return f"{self.index}/{self.count}"

    def describe(self) -> str:
        """``shard 1/2: 4 of 8 rows: qemu/6.12/tdp+split, ...``"""
        return f"shard {self.name}: {len(self.rows)} of {len(self.all_rows)} rows: {', '.join(self.rows)}"

    def to_dict(self) -> dict:
        return {"index": self.index, "count": self.count, "rows": list(self.rows), "all_rows": list(self.all_rows)}

    @classmethod
    def from_dict(cls, data: dict) -> "Shard":
        """A report's ``shard`` object (ValueError naming the bad field if malformed): whole numbers
        1 <= index <= count, ``all_rows`` the run's rows (each once, at least one) and ``rows`` the
        shard's (at least one, all of them rows of the run)."""
        expect("shard", data, (dict,), "an object")
        require("shard", data, ("index", "count", "rows", "all_rows"))
        for key in ("index", "count"):
            expect(f"shard.{key}", data[key], (int,), "a whole number")
        for key in ("rows", "all_rows"):
            value = data[key]
            if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
                raise ValueError(f"shard.{key}: a list of row names expected, not {describe(value)}"[:300])
            if not value:
                raise ValueError(f"shard.{key}: empty (a shard runs at least one row)")
            if len(set(value)) != len(value):
                raise ValueError(f"shard.{key}: a row given twice")
        shard = cls(data["index"], data["count"], tuple(data["rows"]), tuple(data["all_rows"]))
        if not 1 <= shard.index <= shard.count:
            raise ValueError(f"shard {shard.name}: index out of range")
        stray = [r for r in shard.rows if r not in shard.all_rows]
        if stray:
            raise ValueError(f"shard.rows: {', '.join(stray)} not in shard.all_rows")
        return shard
