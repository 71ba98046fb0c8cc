"""DirtyBitmap: bit layout as KVM uses it, counting, listing and set algebra."""
from __future__ import annotations

import random

import pytest

from kvmpy.bitmap import DirtyBitmap


def test_layout_is_kvm_little_endian_words():
    bm = DirtyBitmap(130)
    assert len(bm.buffer) == 24  # rounded up to whole u64 words
    bm.set(0)
    bm.set(65)
    bm.set(129)
    assert bm.buffer[0] == 1 and bm.buffer[8] == 2 and bm.buffer[16] == 2
    assert bm.pages() == [0, 65, 129]
    assert 65 in bm and 64 not in bm and 500 not in bm
    bm.clear(65)
    assert bm.pages() == [0, 129]


def test_bounds():
    bm = DirtyBitmap(10)
    with pytest.raises(IndexError):
        bm.set(10)
    with pytest.raises(ValueError):
        DirtyBitmap(10, bytearray(3))


def test_count_and_pages_random():
    rng = random.Random(7)
    n = 100_003
    pages = sorted(rng.sample(range(n), 5000))
    bm = DirtyBitmap.from_pages(n, pages)
    assert bm.count() == 5000
    assert bm.pages() == pages
    assert list(bm) == pages


def test_set_algebra():
    a = DirtyBitmap.from_pages(200, [1, 2, 3, 150])
    b = DirtyBitmap.from_pages(200, [2, 3, 4])
    assert (a - b).pages() == [1, 150]
    assert (a & b).pages() == [2, 3]
    assert (a | b).pages() == [1, 2, 3, 4, 150]
    assert a == a.copy() and a != b
    with pytest.raises(ValueError):
        _ = a | DirtyBitmap(201)


def test_full_and_clear_all():
    bm = DirtyBitmap.full(70)
    assert bm.count() == 70 and bm.pages()[-1] == 69
    bm.clear_all()
    assert bm.count() == 0


def test_64gib_slot_bitmap_ops_are_cheap():
    # 64 GiB of 4K pages = 16 Mi bits; a per-page Python loop would take seconds.
    # Counted, not timed: the work must stay word-level (checked via set pages count).
    n = 16 << 20
    bm = DirtyBitmap(n, bytearray(b"\xff" * (n // 8)))
    assert bm.count() == n
    bm2 = DirtyBitmap.from_pages(n, [0, n - 1])
    assert (bm - bm2).count() == n - 2
