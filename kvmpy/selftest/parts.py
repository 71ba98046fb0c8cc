"""One configuration's tests split across several boots of the bed (``--bed --jobs N``, one row).

A pytest plugin: ``--kvmpy-part K/N`` keeps every N-th selected test, starting at the
K-th, so the boots of one configuration share its work (a suite's few long tests are
neighbours in collection order and land in different parts). Every boot collects
the same tests (same kernel, same parameters), so together the parts run each
selected test once. :func:`merge_parts` turns the parts' results back into the one
run of that configuration, its tests in collection order.
"""
from __future__ import annotations

from itertools import zip_longest

import pytest

from kvmpy.selftest.report import WATCH_OFF, RunResults

NO_TESTS = 5   # pytest's exit status when it collected nothing


def parse(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), 1 <= K <= N (ValueError otherwise)."""
    k, sep, n = text.partition("/")
    if not sep or not k.isdigit() or not n.isdigit() or not 1 <= int(k) <= int(n):
        raise ValueError(f"--kvmpy-part {text!r}: want K/N with 1 <= K <= N")
    return int(k), int(n)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("kvmpy").addoption("--kvmpy-part", metavar="K/N", default=None,
                                       help="run only every N-th selected test, from the K-th (one boot's part)")


@pytest.hookimpl(trylast=True)   # after -k and -m have deselected theirs
def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    text = config.getoption("--kvmpy-part")
    if not text:
        return
    try:
        k, n = parse(text)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    keep = items[k - 1::n]
    dropped = [item for i, item in enumerate(items) if i % n != k - 1]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def merge_parts(parts: list[RunResults | None]) -> RunResults:
    """The run of one configuration from the runs of its parts (in part order; None for a part
    a stop caught before it finished, whose results are lost).

    Tests interleave back into collection order; entries that are not tests (a splat
    of the bed's kernel log no test claimed) come last. The run took as long as its
    longest part; it failed to run if any part did.
    """
    finished = [(i, p) for i, p in enumerate(parts, 1) if p is not None]
    # A part left with no test (fewer selected tests than parts) exits "no tests collected".
    with_tests = [(i, p) for i, p in finished if p.exitstatus != NO_TESTS]
    numbered = with_tests or finished   # all empty: their "no tests collected" is the error
    ran = [p for _, p in numbered]
    tests_of = [[t for t in p.tests if "::" in t["nodeid"]] for p in ran]
    tests = [t for row in zip_longest(*tests_of) for t in row if t is not None]
    tests += [t for _, p in finished for t in p.tests if "::" not in t["nodeid"]]
    statuses = [p.exitstatus for p in ran]
    errors = [f"part {i}/{len(parts)}: {p.harness_error}" for i, p in numbered if p.harness_error]
    if len({_ran_on(p) for p in ran if p.bed.get("facts", {}).get("params")}) > 1:
        errors.append("the parts ran on different configurations (kernel or parameters differ)")
    collected = [p.collected for p in ran]
    scales = {p.scale for p in ran}
    if len(scales) > 1:
        errors.append(f"the parts ran at different size multipliers ({', '.join(map(str, sorted(scales, key=str)))})")
    return RunResults(
        ran[0].config, tests,
        exitstatus=None if None in statuses else max(statuses, key=lambda s: (s != 0, s)),
        harness_error="; ".join(errors), seconds=max(p.seconds for p in ran),
        collected=None if None in collected else sum(collected), bed=ran[0].bed, row=ran[0].row,
        splat_watch=_merged_watch([p.splat_watch for p in ran]), scale=scales.pop() if len(scales) == 1 else None)


def _merged_watch(watches: list[str | None]) -> str | None:
    """What the splat watch read in a run of parts: a part's OFF (its kernel log unwatched) if any,
    else each kernel log read, once (None when no part said)."""
    off = [w for w in watches if w is not None and w.startswith(WATCH_OFF)]
    if off:
        return off[0]
    read = list(dict.fromkeys(w for w in watches if w is not None))
    return "; ".join(read) if read else None


def _ran_on(run: RunResults) -> tuple:
    """The kernel and module parameters a part's boot read back."""
    facts = run.bed.get("facts", {})
    return facts.get("kernel"), tuple(sorted(facts.get("params", {}).items()))
