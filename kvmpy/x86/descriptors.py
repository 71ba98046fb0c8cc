"""x86-64 descriptor tables: GDT segment/TSS descriptors, the TSS, IDT gates.

Everything here returns plain bytes or :class:`Segment` values; loading them
into a vCPU (struct kvm_segment) is :mod:`kvmpy.x86.cpu`'s job.
"""
from __future__ import annotations

import struct
from typing import Mapping, Sequence

from kvmpy.abi import check_unsigned
from kvmpy.errors import KvmError
from kvmpy.record import Record, replace

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


GDT_MAX_SIZE = 0x10000   # GDTR's limit is 16 bits
IDT_ENTRIES = 256


class DescriptorError(KvmError):
    """A descriptor table request that cannot be encoded."""


def _field(name: str, value: object, bits: int) -> int:
    return check_unsigned(value, bits, name, DescriptorError)


class Segment(Record, frozen=True):
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
        for name, bits in (("type", 4), ("s", 1), ("dpl", 2), ("present", 1), ("avl", 1), ("l", 1),
                           ("db", 1), ("g", 1)):
            _field(f"segment {name}", getattr(self, name), bits)
        # A system descriptor (s=0) is 16 bytes: the high half holds base bits 32..63.
        _field("segment base", self.base, 32 if self.s else 64)
        _field("segment limit", self.limit, 32)
        limit = self.limit >> 12 if self.g else self.limit
        if limit > 0xFFFFF or self.g and self.limit & 0xFFF != 0xFFF:
            raise DescriptorError(f"segment limit {self.limit:#x} does not fit (g={self.g}: "
                                  f"{'4K units, the low 12 bits all ones' if self.g else 'at most 0xfffff'})")
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
    if SEL_TSS0 + 16 * len(tss_bases) > GDT_MAX_SIZE:
        raise DescriptorError(f"{len(tss_bases)} TSS descriptors do not fit in a GDT of at most "
                              f"{GDT_MAX_SIZE:#x} bytes")
    for i, base in enumerate(tss_bases):
        gdt += tss_descriptor(replace(tss_segment(i, base), type=TYPE_TSS_AVAILABLE))
    return gdt


def build_tss(rsp0: int = 0, ist: Mapping[int, int] | None = None) -> bytes:
    """A 104-byte 64-bit TSS with ``rsp0`` and IST stacks ``{1..7: stack top}``; no I/O bitmap."""
    ist = dict(ist or {})
    if any(not isinstance(k, int) or not 1 <= k <= 7 for k in ist):
        raise DescriptorError(f"IST indices must be 1..7, got {sorted(ist, key=repr)}")
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, _field("TSS rsp0", rsp0, 64))
    for k, top in ist.items():
        struct.pack_into("<Q", tss, 36 + 8 * (k - 1), _field(f"TSS IST{k} stack", top, 64))
    struct.pack_into("<H", tss, 102, TSS_SIZE)  # I/O map base beyond the limit: no bitmap
    return bytes(tss)


def idt_gate(handler: int, selector: int = SEL_CODE64, ist: int = 0, dpl: int = 0,
             gate_type: int = GATE_INTERRUPT) -> bytes:
    """One 16-byte IDT gate (``gate_type`` GATE_INTERRUPT or GATE_TRAP: the only 64-bit ones)."""
    if not isinstance(ist, int) or not 0 <= ist <= 7:
        raise DescriptorError(f"IST index {ist!r} is not 0..7")
    if gate_type not in (GATE_INTERRUPT, GATE_TRAP) or isinstance(gate_type, bool):
        raise DescriptorError(f"gate type {gate_type!r} is not GATE_INTERRUPT ({GATE_INTERRUPT:#x}) "
                              f"or GATE_TRAP ({GATE_TRAP:#x})")
    _field("gate handler", handler, 64)
    _field("gate selector", selector, 16)
    attr = gate_type | _field("gate DPL", dpl, 2) << 5 | 1 << 7
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, ist, attr, (handler >> 16) & 0xFFFF,
                       (handler >> 32) & 0xFFFFFFFF, 0)


def build_idt(handlers: Sequence[int], ist: Mapping[int, int] | None = None, entries: int = 256) -> bytes:
    """IDT of ``entries`` gates; vector i points at ``handlers[i]`` (missing ones are not present).

    ``ist`` maps a vector to the IST stack it switches to (e.g. ``{8: 1}`` for #DF).
    """
    if not isinstance(entries, int) or not 0 <= entries <= IDT_ENTRIES:
        raise DescriptorError(f"an IDT has 0..{IDT_ENTRIES} entries, not {entries!r}")
    if len(handlers) > entries:
        raise DescriptorError(f"{len(handlers)} handlers for a {entries}-entry IDT")
    ist = ist or {}
    idt = b"".join(idt_gate(h, ist=ist.get(v, 0)) for v, h in enumerate(handlers))
    return idt + bytes(16 * (entries - len(handlers)))


def decode_gate(gate: bytes) -> tuple[int, int, int, int]:
    """(handler, selector, ist, attr) of a 16-byte gate; the inverse of :func:`idt_gate`."""
    if len(gate) != 16:
        raise DescriptorError(f"an IDT gate is 16 bytes, not {len(gate)}")
    lo, sel, ist, attr, mid, hi, _ = struct.unpack("<HHBBHII", gate)
    return lo | mid << 16 | hi << 32, sel, ist & 7, attr
