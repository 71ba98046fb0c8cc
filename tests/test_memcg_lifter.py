"""selftests/memcg.py's limit window, on plain files standing in for a cgroup's."""
from __future__ import annotations

import time

import pytest

from selftests.memcg import MemoryCgroup, start_lifter, stop_lifter


@pytest.fixture
def group(tmp_path):
    (tmp_path / "memory.current").write_text("4096\n")
    (tmp_path / "memory.max").write_text("max\n")
    return tmp_path


def test_limit_is_set_for_the_block_and_lifted_by_the_helper(group):
    lifter = start_lifter(str(group / "memory.max"))
    try:
        cg = MemoryCgroup(str(group), lifter)
        for _ in range(2):                       # the helper serves window after window
            with cg.limited(1000) as limit:
                assert limit == 5096 and (group / "memory.max").read_text() == "5096"
            assert (group / "memory.max").read_text() == "max" and not cg.lifted_by_timeout
    finally:
        stop_lifter(lifter)
    assert lifter.returncode == 0


def test_helper_lifts_the_limit_by_itself_when_not_signalled_in_time(group):
    lifter = start_lifter(str(group / "memory.max"), timeout=0.5)
    try:
        cg = MemoryCgroup(str(group), lifter)
        with cg.limited(0):
            deadline = time.monotonic() + 30
            while (group / "memory.max").read_text() != "max" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (group / "memory.max").read_text() == "max"
        assert cg.lifted_by_timeout
        time.sleep(1.0)                          # the late signal must not start a window of its own
        with cg.limited(0):
            assert (group / "memory.max").read_text() == "4096"
        assert not cg.lifted_by_timeout
    finally:
        stop_lifter(lifter)
