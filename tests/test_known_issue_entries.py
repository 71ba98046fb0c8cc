"""Each entry of selftests/known_issues.toml excuses its defect's signature and nothing next to it.

The failure texts are made by the harness's own code (the checker's message, the dirty
ring's summary, the test's assertion), so a change of wording there shows here.
Every entry must have its cases in ``CASES``: a new entry comes with the neighbouring
failures it must not excuse.
"""
from __future__ import annotations

import pytest

from kvmpy.dirtylog.checker import DirtyLogChecker, DirtyLogMismatch
from kvmpy.dirtylog.collectors import DirtyRingCollector
from kvmpy.selftest import known_issues

ENTRIES = {k.test: k for k in known_issues.load(known_issues.DEFAULT_FILE)}
RING = 65536   # test_dirty_ring_full_1g_slot's ring: 65536 entries, soft limit 65472


def lost_pages_text() -> str:
    """The checker's message for pages changed but not reported."""
    chk = DirtyLogChecker(256, label="dirty-ring-plain-anonymous", slot=1)
    chk.begin_round(1)
    chk.record(range(100, 256))
    with pytest.raises(DirtyLogMismatch) as ei:
        chk.verify([1] * 256)
    return str(ei.value)


def ring_summary(harvests: list[int], ring_full_exits: int) -> str:
    """The dirty ring's summary after harvests of these sizes."""
    c = DirtyRingCollector(ring_bytes=RING * 16)
    c.harvests = [(i + 1, 0, n, (1, 65536 * i)) for i, n in enumerate(harvests)]
    return c.summary(1, ring_full_exits)


STALLED = "  the guest STALLED: no write for 3 s after 126976 writes this round (ended by kick)"
# The same storm, seen by its exits (the round ends at once, without waiting out the 3 s).
STALLED_FUTILE = ("  the guest STALLED: 100 KVM_EXIT_DIRTY_RING_FULL exits in a row with nothing to harvest "
                  "after 126976 writes this round (ended by kick)")
# The real defect, in the forms the entries' evidence shows.
OVERWRITE = f"{lost_pages_text()}\n{ring_summary([RING, RING], 2)}"
STORM = f"{lost_pages_text()}\n{STALLED}\n{ring_summary([RING], 24912)}"
STORM_FUTILE = f"{lost_pages_text()}\n{STALLED_FUTILE}\n{ring_summary([RING], 101)}"
WHOLE_NOTHING_LOST = (f"AssertionError: 1 harvests of the whole ring with no page lost?\n"
                      f"{ring_summary([RING, 65534, 65490], 8)}")
# Neighbours: the same test failing for another reason.
LOSSY_COLLECTOR = f"{lost_pages_text()}\n{ring_summary([65490, 65523, 65478], 3)}"   # soft limit + a few: normal
LOSSY_STALLED = f"{lost_pages_text()}\n{STALLED}\n{ring_summary([65490], 3)}"
LOSSY_STALLED_FUTILE = f"{lost_pages_text()}\n{STALLED_FUTILE}\n{ring_summary([65490], 101)}"
NEVER_FILLED = "AssertionError: only 2 ring-full exits: the ring never filled"
NOT_RESET = ("DirtyLogMismatch: dirty-ring-plain: after KVM_RESET_DIRTY_RINGS (which said it reset 65490 entries) "
             f"65490 of vCPU 0's harvested entries still carry the RESET flag\n{ring_summary([RING], 2)}")
STALL_NOTHING_LOST = f"AssertionError: the guest stalled with nothing lost?\n{STALLED}\n{ring_summary([RING], 9)}"
WARN_PUSH = ("WARNING: CPU: 0 PID: 4299 at arch/x86/kvm/../../../virt/kvm/dirty_ring.c:225 "
             "kvm_dirty_ring_push+0xe2/0xf0")
WARN_RESET = ("WARNING: CPU: 1 PID: 4301 at arch/x86/kvm/../../../virt/kvm/dirty_ring.c:160 "
              "kvm_dirty_ring_reset+0x1a/0x200")

# test id -> (failures it excuses, neighbouring failures it must not excuse, splats it names, splats it must not)
CASES = {
    "test_dirty_log.py::test_dirty_ring_full_1g_slot[cpl0-dirty-ring-plain]": (
        [OVERWRITE, STORM, STORM_FUTILE, WHOLE_NOTHING_LOST],
        [LOSSY_COLLECTOR, LOSSY_STALLED, LOSSY_STALLED_FUTILE, NEVER_FILLED, NOT_RESET, STALL_NOTHING_LOST],
        [WARN_PUSH], [WARN_RESET]),
    "test_dirty_log.py::test_dirty_ring_full_1g_slot[cpl0-dirty-ring]": (
        [OVERWRITE, STORM, STORM_FUTILE, WHOLE_NOTHING_LOST],
        [LOSSY_COLLECTOR, LOSSY_STALLED, LOSSY_STALLED_FUTILE, NEVER_FILLED, NOT_RESET, STALL_NOTHING_LOST],
        [WARN_PUSH], [WARN_RESET]),
}


def test_every_entry_has_its_cases():
    assert sorted(ENTRIES) == sorted(CASES), "an entry of known_issues.toml without cases here (or a stale case)"


@pytest.mark.parametrize("test_id", sorted(CASES))
def test_entry_excuses_its_defect(test_id):
    k = ENTRIES[test_id]
    excused, _, splats, _ = CASES[test_id]
    for text in excused:
        assert k.excuses(text), text
    for splat in splats:
        assert k.explains_splat(splat), splat


@pytest.mark.parametrize("test_id", sorted(CASES))
def test_entry_excuses_no_neighbouring_failure(test_id):
    k = ENTRIES[test_id]
    _, neighbours, _, other_splats = CASES[test_id]
    for text in neighbours:
        assert not k.excuses(text), f"{test_id}'s entry excuses a different failure:\n{text}"
    for splat in other_splats:
        assert not k.explains_splat(splat), splat


def test_summary_names_the_whole_ring_only_when_a_harvest_held_it():
    assert "WHOLE" not in ring_summary([65472, 65523], 2)
    assert "0 of them" not in ring_summary([], 0)
    assert "1 of them the WHOLE ring" in ring_summary([65472, RING], 2)
