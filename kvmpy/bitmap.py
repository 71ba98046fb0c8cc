"""Dirty bitmaps: one bit per 4K page of a memslot, laid out as KVM does (u64 words, LSB first)."""
from __future__ import annotations

from array import array
from typing import Iterable, Iterator

from kvmpy.abi import ffi, lib

_ZERO_WORD = array("Q", [0])


class DirtyBitmap:
    """A page bitmap with fast popcount, set-bit listing and set algebra.

    ``buffer`` is a bytearray padded to whole u64 words, handed straight to
    KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG.
    """

    __slots__ = ("npages", "buffer", "_cdata")

    def __init__(self, npages: int, buffer: bytearray | None = None) -> None:
        if npages < 0:
            raise ValueError("npages must be >= 0")
        nbytes = ((npages + 63) // 64) * 8
        if buffer is None:
            buffer = bytearray(nbytes)
        elif len(buffer) != nbytes:
            raise ValueError(f"bitmap of {npages} pages needs {nbytes} bytes, got {len(buffer)}")
        self.npages = npages
        self.buffer = buffer
        self._cdata = None

    @classmethod
    def from_pages(cls, npages: int, pages: Iterable[int]) -> "DirtyBitmap":
        bm = cls(npages)
        for p in pages:
            bm.set(p)
        return bm

    @classmethod
    def full(cls, npages: int) -> "DirtyBitmap":
        return cls._from_int(npages, (1 << npages) - 1)

    def _check(self, page: int) -> None:
        if not 0 <= page < self.npages:
            raise IndexError(f"page {page} outside bitmap of {self.npages} pages")

    def set(self, page: int) -> None:
        self._check(page)
        self.buffer[page >> 3] |= 1 << (page & 7)

    def clear(self, page: int) -> None:
        self._check(page)
        self.buffer[page >> 3] &= ~(1 << (page & 7)) & 0xFF

    def __contains__(self, page: int) -> bool:
        return 0 <= page < self.npages and bool(self.buffer[page >> 3] & (1 << (page & 7)))

    def __len__(self) -> int:
        return self.npages

    def cdata(self):
        """A ``char[]`` over the buffer, valid while this bitmap lives (made once: it keeps the
        buffer exported, so the bytearray can be written but never resized)."""
        if self._cdata is None:
            self._cdata = ffi.from_buffer(self.buffer)
        return self._cdata

    def count(self) -> int:
        """Number of set bits."""
        return lib.kvmpy_popcount(ffi.from_buffer("uint64_t[]", self.buffer), len(self.buffer) // 8)

    def pages_array(self) -> array:
        """Set page indices in ascending order, as an ``array('Q')`` (found in C: no Python int per page)."""
        nwords = len(self.buffer) // 8
        words = ffi.from_buffer("uint64_t[]", self.buffer)
        n = lib.kvmpy_popcount(words, nwords)
        out = _ZERO_WORD * n
        if n:
            lib.kvmpy_set_bits(words, nwords, ffi.from_buffer("uint64_t[]", out), n)
        return out

    def pages(self) -> list[int]:
        """Sorted list of set page indices (see :meth:`pages_array` for the bulk form)."""
        return self.pages_array().tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.pages())

    def clear_all(self) -> None:
        self.buffer[:] = bytes(len(self.buffer))

    def copy(self) -> "DirtyBitmap":
        return DirtyBitmap(self.npages, bytearray(self.buffer))

    # Set algebra through Python ints: a few ms even for 16 Mi bits.
    def _int(self) -> int:
        return int.from_bytes(self.buffer, "little")

    @classmethod
    def _from_int(cls, npages: int, value: int) -> "DirtyBitmap":
        nbytes = ((npages + 63) // 64) * 8
        return cls(npages, bytearray(value.to_bytes(nbytes, "little")))

    def _same_size(self, other: "DirtyBitmap") -> None:
        if other.npages != self.npages:
            raise ValueError(f"bitmaps differ in size: {self.npages} vs {other.npages} pages")

    def __or__(self, other: "DirtyBitmap") -> "DirtyBitmap":
        self._same_size(other)
        return self._from_int(self.npages, self._int() | other._int())

    def __and__(self, other: "DirtyBitmap") -> "DirtyBitmap":
        self._same_size(other)
        return self._from_int(self.npages, self._int() & other._int())

    def __sub__(self, other: "DirtyBitmap") -> "DirtyBitmap":
        """Pages set here but not in ``other``."""
        self._same_size(other)
        return self._from_int(self.npages, self._int() & ~other._int())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return self.npages == other.npages and self.buffer == other.buffer

    def __repr__(self) -> str:
        return f"DirtyBitmap(npages={self.npages}, set={self.count()})"
