"""Page-exact verification of KVM dirty logging: the host's model of a slot, checked each round.

The model
---------
A writer guest stores a *stamp* (the first u64 of a 4K page) into pages of a test
slot. The host chooses the stamps: before letting the guest run it sets a guest
global to a value never used before, and the guest writes whatever that global
holds. A page's stamp therefore tells the host *whether* the page changed since it
last looked (the stamp differs from the host's snapshot) and *when* it was written
(which stamp, i.e. which phase of which round).

Each round the host collects dirty pages (as often as it likes, also while the
guest runs), then stops every vCPU at a sync point, collects once more, reads every
page's stamp and calls :meth:`DirtyLogChecker.verify`. The rules, per slot:

1. **No false negatives.** A page whose stamp changed since the previous verify
   must have been reported, if it carries a stamp of a phase in which logging was
   promised (``must_report``; normally every phase) -- and reported by a
   collection made *after* that stamp was handed out: the host hands out a new
   stamp after each collection, the guest reads the stamp for every store, so a
   store carrying it happened after that collection and only a later one can
   have logged it. Missing such a page is always a failure.
2. **Stamps are honest.** A changed page must carry a stamp of this round. The one
   exception is the race below, where the stamp of the previous round is allowed.
3. **Nothing reported that did not change**, except:

   * *INITIALLY_SET*: with KVM_DIRTY_LOG_INITIALLY_SET every page starts dirty, so
     in the first round every page is reported (and KVM must report all of them);
   * *the in-flight race*: a vCPU can have a write logged that has not retired
     when the host reads memory. KVM marks the page dirty at the write fault
     (dirty ring: pushes the gfn), then the vCPU exits before the store completes
     (a kick); the host collects the page and reads the old stamp. The store
     retires later, after the host read the page in this round, carrying the stamp
     the vCPU already held in a register. The harness names such stores exactly
     (:meth:`note_pending_store`: page and stamp, read from the registers of a
     kicked vCPU stopped between loading its stamp and storing it). Such a page
     may be reported unchanged in this round. In the **next** round the store
     retires: KVM re-protected the page when the host cleared/reset it, so the
     page must be reported again, and it must hold that stamp (or a newer one of
     the next round). If it already held that very stamp (written earlier with
     the same stamp), the late store changes nothing: the page is then reported
     but unchanged, which is excused for that page only.
     (:meth:`note_in_flight` names such a page without its stamp; it must then
     change in the next round.) Any other reported but unchanged page is a failure.
4. Pages never written are never reported (a consequence of rule 3).

Failures raise :class:`DirtyLogMismatch` whose message names the mode, slot,
round, stamps and the offending page numbers with their old/new stamps.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import le, ne
from typing import Iterable, Mapping, Sequence

from kvmpy.bitmap import DirtyBitmap
from kvmpy.errors import KvmError
from kvmpy.memory import PAGE_4K

_MAX_LISTED = 20  # pages named in a failure message; the count is always given


class DirtyLogMismatch(KvmError, AssertionError):
    """The dirty log disagrees with the page contents. ``problems`` holds the details."""

    def __init__(self, message: str, problems: dict[str, list[int]]) -> None:
        super().__init__(message)
        self.problems = problems


def read_stamps(view: memoryview) -> list[int]:
    """The first u64 of every 4K page of ``view`` (a slot's memory), in page order."""
    if len(view) % PAGE_4K:
        raise ValueError(f"view of {len(view)} bytes is not a whole number of pages")
    # A strided memoryview reads one u64 per page without copying the slot.
    return view.cast("B").cast("Q")[:: PAGE_4K // 8].tolist()


@dataclass
class RoundReport:
    """What one :meth:`DirtyLogChecker.verify` saw (for logging and assertions)."""

    round: int
    changed: int                 # pages whose stamp changed
    reported: int                # distinct pages reported this round
    clean: int                   # pages neither changed nor reported
    allowed_unchanged: list[int] = field(default_factory=list)  # reported, unchanged, excused
    # Pages reported by two or more collections of the round: written, collected, the log
    # re-armed, written again and logged again.
    rereported: int = 0
    # Changed pages whose stamp KVM need not log (must_report=False) that no collection made
    # after that stamp reported: writes KVM did not log (logging was off).
    unlogged: int = 0
    # The previous round's pending stores, each of them reported in this round.
    late_stores: int = 0

    def __str__(self) -> str:
        s = f"round {self.round}: changed {self.changed}, reported {self.reported}, clean {self.clean}"
        if self.rereported:
            s += f", re-reported {self.rereported}"
        if self.unlogged:
            s += f", unlogged {self.unlogged}"
        if self.late_stores:
            s += f", late stores {self.late_stores}"
        if self.allowed_unchanged:
            s += f", excused unchanged {_fmt_pages(self.allowed_unchanged)}"
        return s


def _fmt_pages(pages: Sequence[int]) -> str:
    pages = sorted(pages)
    head = ", ".join(str(p) for p in pages[:_MAX_LISTED])
    more = f", ... ({len(pages)} in all)" if len(pages) > _MAX_LISTED else ""
    return f"[{head}{more}]"


class DirtyLogChecker:
    """The host's model of one slot's dirty log, verified page by page each round.

    ``initial`` is each page's stamp when logging starts (default: all zero).
    ``initially_set`` says KVM_DIRTY_LOG_INITIALLY_SET is in force, so the first
    round reports every page. ``label`` (mode, backing...) prefixes every message.
    Thread-safe: collectors may :meth:`record` from any thread.
    """

    def __init__(self, npages: int, *, initial: Sequence[int] | None = None,
                 initially_set: bool = False, label: str = "", slot: int | None = None) -> None:
        if initial is not None and len(initial) != npages:
            raise ValueError(f"initial stamps for {len(initial)} pages, slot has {npages}")
        self.npages = npages
        self.label = label
        self.slot = slot
        self.initially_set = initially_set
        self.round = 0
        self._snapshot: list[int] = list(initial) if initial is not None else [0] * npages
        self._max_stamp = max(self._snapshot, default=0)
        self._lock = threading.Lock()
        self._reported: dict[int, int] = {}    # page -> last collection (1-based, this round) reporting it
        self._rereported: set[int] = set()     # pages reported by more than one collection this round
        self._collections = 0
        self._phases: dict[int, tuple[bool, int]] = {}  # stamp -> (must be reported, collections done before it)
        self._prev_phases: dict[int, tuple[bool, int]] = {}
        # page -> stamp (None: unknown) of a store logged or begun, not retired at the round's end
        self._in_flight: dict[int, int | None] = {}
        self._prev_in_flight: dict[int, int | None] = {}
        self._all_set_round = 0
        self.total_changed = 0
        self.total_reported = 0

    # -- a round ----------------------------------------------------------------
    def begin_round(self, stamp: int, must_report: bool = True) -> None:
        """Start a new round whose first phase writes ``stamp``."""
        self.round += 1
        self._prev_phases, self._phases = self._phases, {}
        self._prev_in_flight, self._in_flight = self._in_flight, {}
        with self._lock:
            self._reported = {}
            self._rereported = set()
            self._collections = 0
        self.add_phase(stamp, must_report)

    def add_phase(self, stamp: int, must_report: bool = True) -> None:
        """Declare that the guest may now write ``stamp``.

        ``must_report=False`` for a phase whose writes KVM need not log (logging
        was off for part of it); writes stamped with a ``must_report`` phase are
        always required in the log.
        """
        if self.round == 0:
            raise KvmError("begin_round() first")
        # A stamp equal to a page's old contents would hide the write: stamps only grow.
        if stamp <= self._max_stamp:
            raise ValueError(f"stamp {stamp} is not fresh: stamps must grow (last/highest was {self._max_stamp})")
        self._max_stamp = stamp
        with self._lock:
            self._phases[stamp] = (must_report, self._collections)

    def record(self, pages: Iterable[int]) -> None:
        """Add the pages one collection reported (slot-relative page numbers)."""
        pages = pages if isinstance(pages, list) else list(pages)
        if pages and (min(pages) < 0 or max(pages) >= self.npages):
            bad = [p for p in pages if not 0 <= p < self.npages]
            raise DirtyLogMismatch(
                f"{self._where()}: KVM reported pages outside the slot of {self.npages} pages: {_fmt_pages(bad)}",
                {"out_of_range": bad})
        with self._lock:
            self._collections += 1
            # Set operations, not a loop: a collection can report a whole 1 GiB slot.
            reported = self._reported
            self._rereported.update(reported.keys() & set(pages))   # reported by an earlier collection
            reported.update(dict.fromkeys(pages, self._collections))

    def record_bitmap(self, bitmap: DirtyBitmap) -> None:
        if bitmap.npages != self.npages:
            raise ValueError(f"bitmap of {bitmap.npages} pages for a slot of {self.npages}")
        self.record(bitmap.pages())

    def expect_all_set(self) -> None:
        """KVM set every bit of the slot again this round (logging re-enabled under
        INITIALLY_SET): every page must be reported, unchanged ones are excused."""
        self._all_set_round = self.round

    def note_pending_store(self, page: int, stamp: int) -> None:
        """At the end of this round a vCPU was stopped with a store of ``stamp`` to
        ``page`` begun but not retired (see the module doc)."""
        self._in_flight[page] = stamp

    def note_in_flight(self, page: int) -> None:
        """``page`` was logged for a write that may not have retired, stamp unknown."""
        self._in_flight.setdefault(page, None)

    @property
    def reported(self) -> set[int]:
        with self._lock:
            return set(self._reported)

    def _where(self) -> str:
        parts = [self.label] if self.label else []
        if self.slot is not None:
            parts.append(f"slot {self.slot}")
        parts.append(f"round {self.round}")
        return ", ".join(parts)

    # -- the check ----------------------------------------------------------------
    def verify(self, stamps: Sequence[int]) -> RoundReport:
        """Check this round's collections against the pages' stamps (vCPUs stopped).

        Raises :class:`DirtyLogMismatch` listing every violated rule; on success the
        stamps become the snapshot the next round is compared with.
        """
        if len(stamps) != self.npages:
            raise ValueError(f"{len(stamps)} stamps for a slot of {self.npages} pages")
        with self._lock:
            last_seen = dict(self._reported)
            rereported = len(self._rereported)
        reported = set(last_seen)
        prev = self._snapshot
        first_initially_set = (self.initially_set and self.round == 1) or self._all_set_round == self.round
        phases, prev_phases = self._phases, self._prev_phases

        changed = list(compress(range(self.npages), map(ne, stamps, prev)))
        changed_set = set(changed)
        late = self._prev_in_flight  # last round's unretired stores: they retire in this round

        def is_late(p: int, s: int) -> bool:
            want = late.get(p, -1)
            return s == want or (want is None and s in prev_phases)

        missing, bad_stamp, spurious, excused, landed_missing = [], [], [], [], []
        unlogged = 0
        # The common case at C speed: a stamp of this round's phases, logged by a collection made
        # after the stamp was handed out. Only the other pages go through the rules one by one.
        # (A stamp of no phase gets an infinite "after": every such page is a suspect.)
        phase_after = {s: after for s, (_must, after) in phases.items()}
        afters = map(phase_after.get, map(stamps.__getitem__, changed), repeat(float("inf")))
        seen = map(last_seen.get, changed, repeat(0))
        suspects = list(compress(changed, map(le, seen, afters)))
        for p in suspects:
            s = stamps[p]
            if s in phases:
                must, after = phases[s]
            elif p in late and is_late(p, s):
                # Last round's unretired store: it faulted on a re-protected page, so KVM
                # must have logged it in this round.
                must, after = True, 0
            else:
                bad_stamp.append(p)
                continue
            # The guest read stamp s after the host handed it out, i.e. after collection
            # number `after` had finished: only a later collection can have logged the store.
            if last_seen.get(p, 0) <= after:
                if must:
                    missing.append(p)
                else:
                    unlogged += 1
        for p in reported - changed_set:
            if first_initially_set or p in self._in_flight:
                excused.append(p)
            elif p in late and late[p] is not None and stamps[p] == late[p]:
                # The late store rewrote the stamp the page already held.
                excused.append(p)
            else:
                spurious.append(p)
        for p, s in late.items():
            if p in changed_set:
                continue
            if s is not None and stamps[p] == s:
                if p not in reported:  # it retired (unchanged value) and must have faulted
                    missing.append(p)
            elif p not in self._in_flight:
                landed_missing.append(p)
        not_all_set = []
        if first_initially_set:
            not_all_set = [p for p in range(self.npages) if p not in reported]

        problems = {k: v for k, v in (
            ("missing", missing), ("bad_stamp", bad_stamp), ("spurious", spurious),
            ("in_flight_never_landed", landed_missing), ("initially_set_not_reported", not_all_set)) if v}
        if problems:
            raise DirtyLogMismatch(self._message(problems, stamps, prev, last_seen, len(changed)), problems)

        self._snapshot = list(stamps)
        self.total_changed += len(changed)
        self.total_reported += len(reported)
        clean = self.npages - len(changed_set | reported)
        return RoundReport(self.round, len(changed), len(reported), clean, sorted(excused), rereported, unlogged,
                           sum(1 for p in late if p in reported))

    def _message(self, problems, stamps, prev, seen, nchanged) -> str:
        reported = seen
        items = list(self._phases.items())
        if len(items) > 8:  # e.g. a stamp per collection over thousands of collections
            items = items[:4] + [None] + items[-4:]
        phases = ", ".join(f"... ({len(self._phases)} stamps in all)" if it is None else
                           f"{it[0]} from collection {it[1][1] + 1}{'' if it[1][0] else ' (logging not promised)'}"
                           for it in items)
        lines = [f"dirty log mismatch in {self._where()} (this round's stamps: {phases}; "
                 f"{nchanged} pages changed, {len(reported)} reported in {self._collections} collections)"]
        if self._prev_phases:
            late = ", ".join(f"page {p} stamp {s if s is not None else '?'}"
                             for p, s in sorted(self._prev_in_flight.items())) or "none"
            lines.append(f"  previous round's stamps: {min(self._prev_phases)}..{max(self._prev_phases)}; "
                         f"its unretired stores (retiring in this round): {late}")
        text = {
            "missing": "changed but NOT reported (false negative)",
            "bad_stamp": "changed to a stamp not written this round",
            "spurious": "reported but unchanged and not excused (false positive)",
            "in_flight_never_landed": "in-flight write of the previous round never landed",
            "initially_set_not_reported": "not reported in the first round although INITIALLY_SET",
        }
        for key, pages in problems.items():
            detail = ", ".join(f"{p}: {prev[p]}->{stamps[p]} last reported by collection {seen.get(p, 'none')}"
                               for p in sorted(pages)[:_MAX_LISTED])
            lines.append(f"  {len(pages)} pages {text[key]}: {_fmt_pages(pages)} (page: old->new stamp: {detail})")
        return "\n".join(lines)


def record_all(checkers: Mapping[int, DirtyLogChecker], collected: Mapping[int, Iterable[int]]) -> None:
    """Feed one collection ({slot: pages}) to the per-slot checkers."""
    for slot, pages in collected.items():
        checkers[slot].record(pages)
