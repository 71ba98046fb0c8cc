"""A bytearray stand-in for guest physical memory.

Offline code (page-table building, ELF loading) only needs ``read``,
``write`` and ``gpa_view`` from a ``Vm``; this class offers the same three on
a plain buffer so the unit tests can run without /dev/kvm.
"""
from __future__ import annotations

from typing import Protocol

from kvmpy.errors import KvmError


class PhysMemory(Protocol):
    """What the x86 and guest helpers need from guest memory (a ``Vm`` fits)."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def gpa_view(self, gpa: int, length: int) -> memoryview: ...


class FlatMemory:
    """``size`` bytes of zeroed memory starting at guest physical ``base``."""

    def __init__(self, size: int, base: int = 0) -> None:
        self.base = base
        self.size = size
        self.buf = bytearray(size)

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """View of ``[gpa, gpa+length)``; KvmError when outside the buffer (like ``Vm``)."""
        if length < 0 or gpa < self.base or gpa + length > self.base + self.size:
            raise KvmError(f"GPA range {gpa:#x}+{length:#x} is outside memory "
                           f"[{self.base:#x}, {self.base + self.size:#x})")
        off = gpa - self.base
        return memoryview(self.buf)[off: off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.gpa_view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.gpa_view(gpa, len(data))[:] = data
