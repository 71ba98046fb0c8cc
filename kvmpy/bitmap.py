"""Dirty bitmaps: one bit per 4K page of a memslot, laid out as KVM does (u64 words, LSB first)."""
from __future__ import annotations

from array import array
from typing import Iterable, Iterator

from kvmpy.abi import ffi, lib

_ZERO_WORD = array("Q", [0])


class DirtyBitmap:
    """A page bitmap with fast popcount, set-bit listing and set algebra.

    ``buffer`` is a writable buffer (a bytearray by default) padded to whole u64 words,
    handed straight to KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG. Its size is fixed: the
    bitmap holds it exported from the start (a resize raises BufferError), and neither
    it nor ``npages`` can be replaced, because the kernel writes as many bits as the
    memslot has, trusting that the buffer holds them.
    """

    __slots__ = ("_npages", "_buffer", "_cdata")

    def __init__(self, npages: int, buffer: bytearray | None = None) -> None:
        if not isinstance(npages, int) or npages < 0:
            raise ValueError(f"npages must be an int >= 0, not {npages!r}")
        nbytes = ((npages + 63) // 64) * 8
        if buffer is None:
            buffer = bytearray(nbytes)
        elif len(buffer) != nbytes:
            raise ValueError(f"bitmap of {npages} pages needs {nbytes} bytes, got {len(buffer)}")
        try:
            cdata = ffi.from_buffer(buffer, require_writable=True)
        except (TypeError, BufferError):
            raise ValueError(f"a bitmap's buffer must be writable (a bytearray), not "
                             f"{type(buffer).__name__}") from None
        self._npages = npages
        self._buffer = buffer
        self._cdata = cdata

    @property
    def npages(self) -> int:
        return self._npages

    @property
    def buffer(self) -> bytearray:
        return self._buffer

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
        if not 0 <= page < self._npages:
            raise IndexError(f"page {page} outside bitmap of {self._npages} pages")

    def set(self, page: int) -> None:
        self._check(page)
        self._buffer[page >> 3] |= 1 << (page & 7)

    def clear(self, page: int) -> None:
        self._check(page)
        self._buffer[page >> 3] &= ~(1 << (page & 7)) & 0xFF

    def __contains__(self, page: int) -> bool:
        return 0 <= page < self._npages and bool(self._buffer[page >> 3] & (1 << (page & 7)))

    def __len__(self) -> int:
        return self._npages

    def cdata(self):
        """A ``char[]`` over the buffer, valid while this bitmap lives (it keeps the buffer
        exported, so the bytearray can be written but never resized)."""
        return self._cdata

    def count(self) -> int:
        """Number of set bits."""
        return lib.kvmpy_popcount(ffi.from_buffer("uint64_t[]", self._buffer), len(self._buffer) // 8)

    def pages_array(self) -> array:
        """Set page indices in ascending order, as an ``array('Q')`` (found in C: no Python int per page)."""
        nwords = len(self._buffer) // 8
        words = ffi.from_buffer("uint64_t[]", self._buffer)
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
        self._buffer[:] = bytes(len(self._buffer))

    def copy(self) -> "DirtyBitmap":
        return DirtyBitmap(self._npages, bytearray(self._buffer))

    # Set algebra through Python ints: a few ms even for 16 Mi bits.
    def _int(self) -> int:
        return int.from_bytes(self._buffer, "little")

    @classmethod
    def _from_int(cls, npages: int, value: int) -> "DirtyBitmap":
        nbytes = ((npages + 63) // 64) * 8
        return cls(npages, bytearray(value.to_bytes(nbytes, "little")))

    def _same_size(self, other: "DirtyBitmap") -> None:
        if not isinstance(other, DirtyBitmap):
            raise TypeError(f"a DirtyBitmap combines with a DirtyBitmap, not {type(other).__name__}")
        if other.npages != self._npages:
            raise ValueError(f"bitmaps differ in size: {self._npages} vs {other.npages} pages")

    def __or__(self, other: "DirtyBitmap") -> "DirtyBitmap":
        self._same_size(other)
        return self._from_int(self._npages, self._int() | other._int())

    def __and__(self, other: "DirtyBitmap") -> "DirtyBitmap":
        self._same_size(other)
        return self._from_int(self._npages, self._int() & other._int())

    def __sub__(self, other: "DirtyBitmap") -> "DirtyBitmap":
        """Pages set here but not in ``other``."""
        self._same_size(other)
        return self._from_int(self._npages, self._int() & ~other._int())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return self._npages == other.npages and self._buffer == other.buffer

    def __repr__(self) -> str:
        return f"DirtyBitmap(npages={self._npages}, set={self.count()})"
