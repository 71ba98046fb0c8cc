"""Guest memory backings: Mapping.populate backs exactly the asked range, bad ranges are refused."""
from __future__ import annotations

import os
import struct

import pytest

from kvmpy.errors import KvmError, RequirementError
from kvmpy.memory import PAGE_2M, PAGE_4K, Anonymous, Thp


def present_pages(addr: int, npages: int) -> list[bool]:
    """Which of ``npages`` pages from ``addr`` have a page in this process (/proc/self/pagemap bit 63)."""
    with open("/proc/self/pagemap", "rb") as f:
        raw = os.pread(f.fileno(), 8 * npages, 8 * (addr // PAGE_4K))
    return [bool(e >> 63) for e in struct.unpack(f"<{npages}Q", raw)]


def test_populate_backs_the_range_and_nothing_else():
    m = Anonymous().allocate(64 * PAGE_4K)
    try:
        assert not any(present_pages(m.addr, 64))
        m.populate(8 * PAGE_4K, 16 * PAGE_4K)
        assert present_pages(m.addr, 64) == [False] * 8 + [True] * 16 + [False] * 40
        m.populate()
        assert all(present_pages(m.addr, 64))
        assert m.read(0, 64 * PAGE_4K) == bytes(64 * PAGE_4K), "populating changed the contents"
    finally:
        m.close()


def test_populate_keeps_contents_of_a_thp_mapping_at_its_offset():
    # Thp maps 2M more than asked and starts at an offset: populate must use it.
    try:
        m = Thp().allocate(PAGE_2M)
    except RequirementError as e:
        pytest.skip(str(e))
    try:
        m.write(PAGE_4K, b"kept")
        m.populate()
        assert m.read(PAGE_4K, 4) == b"kept"
        assert all(present_pages(m.addr, PAGE_2M // PAGE_4K))
    finally:
        m.close()


@pytest.mark.parametrize("offset, length", [(-PAGE_4K, PAGE_4K), (0, 65 * PAGE_4K), (64 * PAGE_4K, 1)])
def test_populate_refuses_a_range_outside_the_mapping(offset, length):
    m = Anonymous().allocate(64 * PAGE_4K)
    try:
        with pytest.raises(KvmError, match="outside"):
            m.populate(offset, length)
    finally:
        m.close()


def test_populate_after_close_is_an_error():
    m = Anonymous().allocate(4 * PAGE_4K)
    m.close()
    with pytest.raises(KvmError, match="after close"):
        m.populate()
