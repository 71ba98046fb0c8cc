"""GDT/TSS/IDT encodings against known architectural values (no /dev/kvm)."""
from __future__ import annotations

import struct

import pytest

from kvmpy.x86 import descriptors as d


def test_flat_code_and_data_descriptors():
    assert struct.unpack("<Q", d.CODE64.descriptor())[0] == 0x00AF9B000000FFFF  # 64-bit code, DPL0
    assert struct.unpack("<Q", d.DATA.descriptor())[0] == 0x00CF93000000FFFF    # flat data
    assert struct.unpack("<Q", d.USER_CODE64.descriptor())[0] == 0x00AFFB000000FFFF  # 64-bit code, DPL3
    assert struct.unpack("<Q", d.USER_DATA.descriptor())[0] == 0x00CFF3000000FFFF    # flat data, DPL3


def test_gdt_layout_and_tss_descriptor():
    gdt = d.build_gdt([0x3000, 0xFFFF_8000_1234_5680])
    assert len(gdt) == 0x38 + 2 * 16
    assert gdt[:8] == bytes(8)
    # Linux's user selectors: __USER_DS 0x2b (index 5), __USER_CS 0x33 (index 6)
    assert (d.SEL_USER_DATA, d.SEL_USER_CODE64) == (0x2B, 0x33)
    assert gdt[0x28:0x30] == d.USER_DATA.descriptor() and gdt[0x30:0x38] == d.USER_CODE64.descriptor()
    lo, hi = struct.unpack_from("<QQ", gdt, d.SEL_TSS0 + 16)
    base = (lo >> 16) & 0xFFFFFF | ((lo >> 56) & 0xFF) << 24 | (hi & 0xFFFFFFFF) << 32
    assert base == 0xFFFF_8000_1234_5680
    assert lo & 0xFFFF == d.TSS_SIZE - 1
    assert (lo >> 40) & 0xFF == 0x80 | d.TYPE_TSS_AVAILABLE  # present, system, available TSS
    assert d.tss_segment(1, 0x3080).selector == d.SEL_TSS0 + 16


def test_tss_fields():
    tss = d.build_tss(rsp0=0x1000, ist={1: 0x2000, 7: 0x7000})
    assert len(tss) == 104
    assert struct.unpack_from("<Q", tss, 4)[0] == 0x1000
    assert struct.unpack_from("<Q", tss, 36)[0] == 0x2000
    assert struct.unpack_from("<Q", tss, 84)[0] == 0x7000
    assert struct.unpack_from("<H", tss, 102)[0] == 104
    with pytest.raises(d.DescriptorError):
        d.build_tss(ist={8: 1})


def test_idt_gates_roundtrip():
    handlers = [0x400000 + 16 * v for v in range(32)] + [0xFFFF_FFFF_8123_4567]
    idt = d.build_idt(handlers, ist={8: 1})
    assert len(idt) == 256 * 16
    for v, h in enumerate(handlers):
        assert d.decode_gate(idt[16 * v: 16 * v + 16]) == (h, d.SEL_CODE64, 1 if v == 8 else 0, 0x8E)
    assert idt[16 * 33:] == bytes(16 * (256 - 33))  # not present
    with pytest.raises(d.DescriptorError):
        d.idt_gate(0, ist=8)


def test_limit_overflow_rejected():
    with pytest.raises(d.DescriptorError):
        d.Segment(0, limit=0x100000, g=0).descriptor()


@pytest.mark.parametrize("call,match", [
    (lambda: d.build_tss(rsp0=-1), "TSS rsp0 -1 is not an unsigned 64-bit value"),
    (lambda: d.build_tss(rsp0=1 << 64), "TSS rsp0 .* is not an unsigned 64-bit value"),
    (lambda: d.build_tss(ist={1: 1 << 64}), "TSS IST1 stack .* is not an unsigned 64-bit"),
    (lambda: d.idt_gate(0x1000, selector=0x10000), "gate selector 65536 is not an unsigned 16-bit"),
    (lambda: d.idt_gate(0x1000, dpl=4), "gate DPL 4 is not an unsigned 2-bit"),          # was masked to 0
    (lambda: d.idt_gate(0x1000, gate_type=0x1F), "gate type 31 is not GATE_INTERRUPT"),  # was ORed into DPL
    (lambda: d.idt_gate(1 << 64), "gate handler .* is not an unsigned 64-bit"),
    (lambda: d.decode_gate(bytes(8)), "an IDT gate is 16 bytes, not 8"),
    (lambda: d.build_idt([], entries=300), "an IDT has 0..256 entries, not 300"),
    (lambda: d.Segment(0x8, limit=-1, g=0).descriptor(), "segment limit -1 is not an unsigned 32-bit"),
    (lambda: d.Segment(0x8, limit=0x1000).descriptor(), r"segment limit 0x1000 does not fit \(g=1"),
    (lambda: d.Segment(0x8, base=1 << 32).descriptor(), "segment base .* is not an unsigned 32-bit"),
    (lambda: d.Segment(0x8, dpl=4).descriptor(), "segment dpl 4 is not an unsigned 2-bit"),
    (lambda: d.build_gdt([0] * 5000), "5000 TSS descriptors do not fit in a GDT"),
])
def test_out_of_range_values_are_refused_not_altered(call, match):
    with pytest.raises(d.DescriptorError, match=match):
        call()


def test_in_range_extremes_encode():
    assert d.decode_gate(d.idt_gate(2**64 - 1, selector=0xFFFF, dpl=3, gate_type=d.GATE_TRAP)) == \
        (2**64 - 1, 0xFFFF, 0, 0x80 | 3 << 5 | d.GATE_TRAP)
    assert struct.unpack_from("<Q", d.build_tss(rsp0=2**64 - 1), 4)[0] == 2**64 - 1
    assert len(d.build_gdt([0] * ((0x10000 - d.SEL_TSS0) // 16))) == 0x10000 - 8
