"""x86-64 descriptor tables: GDT segment/TSS descriptors, the TSS, IDT gates.

Everything here returns plain bytes or :class:`Segment` values; loading them
into a vCPU (struct kvm_segment) is :mod:`kvmpy.x86.cpu`'s job.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from kvmpy.errors import KvmError

# Fixed GDT layout used by kvmpy guests. The user (DPL3) selectors are Linux's __USER_DS and
# __USER_CS: kvm_pvm runs CPL3 code natively only with those.
SEL_NULL = 0x00
SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_USER_DATA = 0x2B    # GDT index 5, RPL 3
SEL_USER_CODE64 = 0x33  # GDT index 6, RPL 3
SEL_TSS0 = 0x38         # one 16-byte TSS descriptor per vCPU from here on

TSS_SIZE = 104
GATE_INTERRUPT = 0xE
GATE_TRAP = 0xF
TYPE_TSS_AVAILABLE = 0x9
TYPE_TSS_BUSY = 0xB


class DescriptorError(KvmError):
    """A descriptor table request that cannot be encoded."""


@dataclass(frozen=True)
class Segment:
    """A segment register's hidden state, with the fields of struct kvm_segment."""

    selector: int
    base: int = 0
    limit: int = 0xFFFFFFFF
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 (the architectural name)
    g: int = 1
    avl: int = 0
    unusable: int = 0

    def descriptor(self) -> bytes:
        """The 8-byte GDT descriptor of a code/data segment (or the low half of a system one)."""
        limit = self.limit >> 12 if self.g else self.limit
        if limit > 0xFFFFF:
            raise DescriptorError(f"segment limit {self.limit:#x} does not fit (g={self.g})")
        access = (self.type & 0xF) | (self.s & 1) << 4 | (self.dpl & 3) << 5 | (self.present & 1) << 7
        flags = (self.avl & 1) | (self.l & 1) << 1 | (self.db & 1) << 2 | (self.g & 1) << 3
        return struct.pack("<HHBBBB", limit & 0xFFFF, self.base & 0xFFFF, (self.base >> 16) & 0xFF,
                           access, (limit >> 16) & 0xF | flags << 4, (self.base >> 24) & 0xFF)


CODE64 = Segment(SEL_CODE64, type=0xB, l=1, db=0)   # execute/read, accessed
DATA = Segment(SEL_DATA, type=0x3, db=1)            # read/write, accessed
USER_CODE64 = Segment(SEL_USER_CODE64, type=0xB, l=1, db=0, dpl=3)
USER_DATA = Segment(SEL_USER_DATA, type=0x3, db=1, dpl=3)


def tss_segment(index: int, base: int) -> Segment:
    """The TR value for vCPU ``index``'s TSS at ``base`` (busy, as after LTR)."""
    return Segment(SEL_TSS0 + 16 * index, base=base, limit=TSS_SIZE - 1, type=TYPE_TSS_BUSY, s=0, g=0)


def tss_descriptor(seg: Segment) -> bytes:
    """16-byte GDT descriptor of a 64-bit TSS."""
    return seg.descriptor() + struct.pack("<II", (seg.base >> 32) & 0xFFFFFFFF, 0)


def build_gdt(tss_bases: Sequence[int]) -> bytes:
    """GDT: null, 64-bit code, data, two null entries, user data, user 64-bit code, then
    one TSS descriptor per entry of ``tss_bases``.

    The TSS descriptors are marked available; the vCPU's TR holds the busy type.
    """
    gdt = bytes(8) + CODE64.descriptor() + DATA.descriptor() + bytes(16) + USER_DATA.descriptor() \
        + USER_CODE64.descriptor()
    assert len(gdt) == SEL_TSS0
    for i, base in enumerate(tss_bases):
        gdt += tss_descriptor(replace(tss_segment(i, base), type=TYPE_TSS_AVAILABLE))
    return gdt


def build_tss(rsp0: int = 0, ist: Mapping[int, int] | None = None) -> bytes:
    """A 104-byte 64-bit TSS with ``rsp0`` and IST stacks ``{1..7: stack top}``; no I/O bitmap."""
    ist = dict(ist or {})
    if any(not 1 <= k <= 7 for k in ist):
        raise DescriptorError(f"IST indices must be 1..7, got {sorted(ist)}")
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, rsp0)
    for k, top in ist.items():
        struct.pack_into("<Q", tss, 36 + 8 * (k - 1), top)
    struct.pack_into("<H", tss, 102, TSS_SIZE)  # I/O map base beyond the limit: no bitmap
    return bytes(tss)


def idt_gate(handler: int, selector: int = SEL_CODE64, ist: int = 0, dpl: int = 0,
             gate_type: int = GATE_INTERRUPT) -> bytes:
    """One 16-byte IDT gate."""
    if not 0 <= ist <= 7:
        raise DescriptorError(f"IST index {ist} is not 0..7")
    attr = gate_type | (dpl & 3) << 5 | 1 << 7
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, ist, attr, (handler >> 16) & 0xFFFF,
                       (handler >> 32) & 0xFFFFFFFF, 0)


def build_idt(handlers: Sequence[int], ist: Mapping[int, int] | None = None, entries: int = 256) -> bytes:
    """IDT of ``entries`` gates; vector i points at ``handlers[i]`` (missing ones are not present).

    ``ist`` maps a vector to the IST stack it switches to (e.g. ``{8: 1}`` for #DF).
    """
    if len(handlers) > entries:
        raise DescriptorError(f"{len(handlers)} handlers for a {entries}-entry IDT")
    ist = ist or {}
    idt = b"".join(idt_gate(h, ist=ist.get(v, 0)) for v, h in enumerate(handlers))
    return idt + bytes(16 * (entries - len(handlers)))


def decode_gate(gate: bytes) -> tuple[int, int, int, int]:
    """(handler, selector, ist, attr) of a 16-byte gate; the inverse of :func:`idt_gate`."""
    lo, sel, ist, attr, mid, hi, _ = struct.unpack("<HHBBHII", gate)
    return lo | mid << 16 | hi << 32, sel, ist & 7, attr
