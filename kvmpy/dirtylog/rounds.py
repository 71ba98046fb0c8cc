"""One round of the dirty writer, described by a :class:`RoundPlan` (see kvmpy.dirtylog.writer).

The host hands out a stamp, lets the vCPUs write while it collects (every
``collect_every`` seconds, or only when a ring is full), ends the round at the
guest's sync point or by kicking the vCPUs wherever they are, and checks every
page of every logged slot.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from kvmpy.dirtylog.checker import DirtyLogMismatch, RoundReport
from kvmpy.errors import KvmError

PROGRESS_POLL = 0.05   # seconds between progress checks of a round that collects only on demand


class _Guest(Protocol):
    def check(self) -> None:
        """Raise what a vCPU thread raised, if any did."""


class RoundWriter(Protocol):
    """What :func:`run_round` drives: :class:`kvmpy.dirtylog.writer.DirtyWriterVm` (or a test's
    stand-in). The writer knows rounds through this module, not the other way round."""

    label: str
    stamp: int                          # the guest's current stamp
    collections: int                    # concurrent collections so far
    ring_full_exits: int
    futile_ring_full: int               # RING_FULL exits in a row whose harvest found nothing
    harvest_needed: threading.Event     # a vCPU waits for a harvest
    round_log: list[str]
    guest: _Guest

    def begin_round(self, must_report: bool) -> int: ...
    def writes(self) -> int: ...
    def progress(self) -> tuple[int, int]: ...
    def stalled_on_ring_full(self) -> bool: ...
    def set_stamp(self, stamp: int, must_report: bool = True) -> None: ...
    def collect(self) -> dict[int, list[int]]: ...
    def kick_all(self) -> None: ...
    def end_round(self, by_kick: bool, timeout: float, mid_store: bool = False) -> None: ...
    def verify(self) -> dict[int, RoundReport]: ...
    def ring_summary(self, first_collection: int = 1, ring_full0: int = 0) -> str: ...


@dataclass(frozen=True)
class RoundPlan:
    """How one round runs.

    ``min_writes``/``min_time``: the guest writes at least that much before the
    round ends; ``min_collections``: and the host collected at least that often while
    it wrote (a native writer makes thousands of writes between two collections);
    ``max_time``: a round taking longer fails (no guest progress).
    ``collect_every`` seconds between concurrent collections; None collects while
    the guest runs only when a ring is full.
    ``during(writer)`` runs on the host thread once the guest has done half its writes.
    ``must_report=False``: writes of the stamps handed out before ``during`` has run
    may go unlogged (it turns logging off and on again); later ones may not.
    ``restamp`` hands out a new stamp after every concurrent collection, so the
    checker knows which collection must have logged each store.
    ``end_by_kick`` stops the vCPUs with kicks wherever they are (like upstream's
    dirty_log_test) instead of at their sync point; a vCPU stopped between loading
    its stamp and storing it (its registers say so) leaves exactly that store
    pending: the checker excuses it this round and demands it next round.
    ``kick_collect`` kicks every vCPU out of KVM_RUN before each concurrent
    collection and waits for the exit (the vCPU re-enters at once): upstream's
    dirty_log_test collects the dirty ring this way, racing its kicks with
    KVM_EXIT_DIRTY_RING_FULL.
    ``mid_store`` (with ``end_by_kick``): kick again until a vCPU is stopped
    between loading its stamp and storing it, so that every round leaves a store
    pending (the race the kicks are for, see DirtyWriterVm.end_round).
    ``stall_time``: if the guest makes no write for that long (a vCPU KVM keeps
    from running), end the round there instead of failing on ``max_time``: the
    page check then shows what the log lost. The one stall known by its exits
    (RING_FULL exit after exit with nothing to harvest, see
    DirtyWriterVm.stalled_on_ring_full) ends the round at once, without the wait.
    Needs ``end_by_kick`` (a wedged vCPU never reaches its sync point).
    """

    min_writes: int = 200
    min_time: float = 0.0
    min_collections: int = 0
    collect_every: float | None = 0.01
    max_time: float = 30.0
    during: Callable[[RoundWriter], None] | None = None
    must_report: bool = True
    end_by_kick: bool = False
    restamp: bool = True
    kick_collect: bool = False
    stall_time: float | None = None
    mid_store: bool = False

    def __post_init__(self) -> None:
        if self.stall_time is not None and not self.end_by_kick:
            raise ValueError("stall_time needs end_by_kick")
        if self.mid_store and not self.end_by_kick:
            raise ValueError("mid_store needs end_by_kick")


def run_round(d: RoundWriter, plan: RoundPlan) -> dict[int, RoundReport]:
    """Run one round of ``d`` as ``plan`` says and verify it; returns {slot: RoundReport}."""
    first_collection = d.collections + 1
    ring_full0 = d.ring_full_exits
    w0 = d.begin_round(plan.must_report)
    start = time.monotonic()
    ran_during = plan.during is None
    must = plan.must_report
    last_seen, last_progress, stalled = None, start, ""
    collected = 0
    while True:
        d.guest.check()
        now = time.monotonic()
        seen = d.progress() if plan.stall_time is not None else None
        n = d.writes() - w0
        if plan.stall_time is not None and d.stalled_on_ring_full():
            stalled = (f"{d.futile_ring_full} KVM_EXIT_DIRTY_RING_FULL exits in a row with nothing to harvest "
                       f"after {n} writes this round")
            break
        if seen != last_seen:
            last_seen, last_progress = seen, now
        elif plan.stall_time is not None and now - last_progress > plan.stall_time:
            stalled = f"no write for {plan.stall_time:g} s after {n} writes this round"
            break
        if not ran_during and n >= plan.min_writes // 2:
            plan.during(d)
            ran_during = True
            must = True   # `during` is over: from now on every write must be logged
            continue
        if (ran_during and n >= plan.min_writes and now - start >= plan.min_time
                and collected >= plan.min_collections):
            break
        if now - start > plan.max_time:
            raise KvmError(f"{d.label}: round {d.stamp}: only {n} guest writes in {plan.max_time:g} s "
                           f"(wanted {plan.min_writes}): is the guest making progress?")
        if plan.collect_every is None:
            # Woken at once by a full ring; otherwise the progress checks need no finer steps
            # (in a test bed every poll takes CPU from the guest it waits for).
            if d.harvest_needed.wait(PROGRESS_POLL):
                # A new stamp only after a collection that found something: one after an
                # empty one would say nothing more (and a KVM that exits with RING_FULL
                # over an empty ring would make thousands).
                collected += 1
                if any(d.collect().values()):
                    # The vCPU waited for this harvest: no progress was due meanwhile.
                    last_progress = time.monotonic()
                    if plan.restamp:
                        d.set_stamp(d.stamp + 1, must)
        else:
            d.harvest_needed.wait(plan.collect_every)
            if plan.kick_collect:
                d.kick_all()
            d.collect()
            collected += 1
            if plan.restamp:
                d.set_stamp(d.stamp + 1, must)
    d.end_round(plan.end_by_kick, plan.max_time, plan.mid_store)
    nwrites = d.writes() - w0
    try:
        reports = d.verify()
    except DirtyLogMismatch as e:
        extra = d.ring_summary(first_collection, ring_full0)
        if stalled:
            extra = f"  the guest STALLED: {stalled} (ended by kick)" + ("\n" + extra if extra else "")
        if not extra:
            raise
        raise DirtyLogMismatch(f"{e}\n{extra}", e.problems) from None
    d.round_log.append(f"{d.label}: round {d.stamp}: {nwrites} writes"
                       + (f" (STALLED: {stalled})" if stalled else "") + " in "
                       f"{time.monotonic() - start:.2f} s, ring-full exits so far {d.ring_full_exits}; "
                       + "; ".join(f"slot {s}: {r}" for s, r in reports.items()))
    return reports
