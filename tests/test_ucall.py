"""ucall decoding and agreement with guests/lib/ucall_abi.h (no /dev/kvm)."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmpy.abi import lib
from kvmpy.exits import IoExit, MmioExit
from kvmpy.guest import ucall as u
from kvmpy.x86.physmem import FlatMemory

HEADER = Path(u.__file__).resolve().parents[2] / "guests" / "lib" / "ucall_abi.h"


def test_constants_match_header():
    text = HEADER.read_text()
    defs = dict(re.findall(r"^#define\s+(UCALL_\w+)\s+(0x[0-9a-fA-F]+|\d+)u?\b", text, re.M))
    enums = dict(re.findall(r"(UCALL_\w+)\s*=\s*(\d+)", text))
    for name, value in {**defs, **enums}.items():
        assert getattr(u, name) == int(value, 0), name
    flags = dict(re.findall(r"#define\s+(UCALL_F_\w+)\s+\(1u << (\d+)\)", text))
    assert {k: 1 << int(v) for k, v in flags.items()} == {k: getattr(u, k) for k in flags}
    assert len(defs) == 5 and len(enums) == 5 and len(flags) == 3


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_layout_matches_compiler(tmp_path):
    src = tmp_path / "l.c"
    src.write_text('#include <stdio.h>\n#include <stddef.h>\n#include "ucall_abi.h"\n'
                   'int main(void){printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu\\n", sizeof(struct ucall),'
                   ' offsetof(struct ucall, magic), offsetof(struct ucall, cmd), offsetof(struct ucall, line),'
                   ' offsetof(struct ucall, len), offsetof(struct ucall, nargs), offsetof(struct ucall, flags),'
                   ' offsetof(struct ucall, args), offsetof(struct ucall, buf)); return 0;}\n')
    subprocess.run(["gcc", "-I", str(HEADER.parent), "-o", str(tmp_path / "l"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "l")], capture_output=True, text=True, check=True).stdout.split()
    assert [int(x) for x in out] == [u.UCALL_SIZE, 0, 4, 8, 12, 16, 20, 24, 72]


def put(mem, gpa, cmd, *, line=0, length=None, nargs=None, flags=0, args=(), buf=b"", magic=u.UCALL_MAGIC):
    a = list(args) + [0] * (6 - len(args))
    hdr = struct.pack("<IIIIII6Q", magic, cmd, line, len(buf) if length is None else length,
                      len(args) if nargs is None else nargs, flags, *a)
    mem.write(gpa, hdr + buf.ljust(u.UCALL_BUF_SIZE, b"\0"))


@pytest.fixture
def mem():
    return FlatMemory(0x10000)


# 64-bit arguments whose halves differ: a decoder reading 32 bits (or the wrong half) gets them wrong.
BIG = (0x1_0000_0003, 0xFFFF_FFFF_0000_0007, 0x8000_0000_0000_0009, 0x2545_F491_4F6C_DD1D)


def test_decode_each_command(mem):
    put(mem, 0x100, u.UCALL_SYNC, args=(3, 7, 9))
    assert u.decode(mem, 0x100) == u.SyncCall(0x100, 3, (7, 9))
    put(mem, 0x100, u.UCALL_SYNC, args=(3,) + BIG + (1 << 63,))
    assert u.decode(mem, 0x100) == u.SyncCall(0x100, 3, BIG + (1 << 63,))
    put(mem, 0x100, u.UCALL_DONE)
    assert u.decode(mem, 0x100) == u.DoneCall(0x100)
    put(mem, 0x100, u.UCALL_PRINTF, buf=b"x" * 511, flags=u.UCALL_F_TRUNCATED)
    assert u.decode(mem, 0x100) == u.PrintfCall(0x100, "x" * 511, True)
    put(mem, 0x100, u.UCALL_ASSERT, line=12, args=(41, 42), flags=u.UCALL_F_EQ, buf=b"guests/a.c\0v == 42\0")
    a = u.decode(mem, 0x100)
    assert (a.file, a.line, a.expr, a.values, a.op, a.message) == ("guests/a.c", 12, "v == 42", (41, 42), "==", "")
    assert a.describe() == "guests/a.c:12: v == 42 (left 0x29 = 41, right 0x2a = 42)"
    put(mem, 0x100, u.UCALL_ASSERT, line=7, args=BIG[1:3], flags=u.UCALL_F_NE, buf=b"g.c\0a != b\0")
    assert u.decode(mem, 0x100).values == BIG[1:3]
    put(mem, 0x100, u.UCALL_EXCEPTION, args=(14, 2, 0xFFFF_FFFF_8040_1000, 0x7F12_3456_7000, 0xFFFF_8000_0010_7F00, 8))
    e = u.decode(mem, 0x100)
    assert (e.vector_name, e.error_code, e.rip, e.cr2, e.rsp, e.cs) == (
        "#PF", 2, 0xFFFF_FFFF_8040_1000, 0x7F12_3456_7000, 0xFFFF_8000_0010_7F00, 8)


@pytest.mark.parametrize("gpa,kw,match", [
    (0x10000 - 100, {}, "outside guest memory"),
    (0x20000, {}, "outside guest memory"),
    (0x100, {"magic": 0}, "bad magic"),
    (0x100, {"length": 513}, "len 513 exceeds"),
    (0x100, {"nargs": 7}, "nargs 7 exceeds"),
    (0x100, {"nargs": 0}, "SYNC without a stage"),
])
def test_bad_ucalls(mem, gpa, kw, match):
    if gpa + u.UCALL_SIZE <= mem.size:
        put(mem, gpa, u.UCALL_SYNC, args=(1,), **kw)
    with pytest.raises(u.BadUcallError, match=match):
        u.decode(mem, gpa)


def io(port, size, direction, data):
    return IoExit(lib.KVM_EXIT_IO, port, size, direction, 1, memoryview(data))


def mmio(addr, length, is_write, data):
    return MmioExit(lib.KVM_EXIT_MMIO, addr, length, is_write, memoryview(data))


def test_unknown_command_and_port_checks(mem):
    put(mem, 0x100, 99)
    with pytest.raises(u.BadUcallError, match="unknown command 99"):
        u.decode(mem, 0x100)
    port = u.PORT_IO
    assert port.address_of(io(0x3F8, 1, "out", b"a")) is None
    assert port.address_of(io(u.UCALL_PORT, 4, "out", struct.pack("<I", 0x1234))) == 0x1234
    with pytest.raises(u.BadUcallError, match="1-byte 'out'"):
        port.address_of(io(u.UCALL_PORT, 1, "out", b"\0"))
    with pytest.raises(u.BadUcallError, match="'in'"):
        port.address_of(io(u.UCALL_PORT, 4, "in", b"\0\0\0\0"))
    # The port transport ignores MMIO, whatever the address.
    assert port.address_of(mmio(0xFEE00000, 8, True, struct.pack("<Q", 0x100))) is None


def test_mmio_transport_decodes_through_the_same_decoder(mem):
    """A CPL3 guest stores the ucall GPA to an unbacked MMIO address instead of OUT."""
    t = u.UcallTransport(port=None, mmio_gpa=0xFEB0_0000)
    put(mem, 0x200, u.UCALL_SYNC, args=(5, 6))
    assert u.ucall_of(mmio(0xFEB0_0000, 8, True, struct.pack("<Q", 0x200)), mem, t) == u.SyncCall(0x200, 5, (6,))
    assert u.ucall_of(mmio(0xFEB0_1000, 8, True, struct.pack("<Q", 0x200)), mem, t) is None
    assert u.ucall_of(io(u.UCALL_PORT, 4, "out", struct.pack("<I", 0x200)), mem, t) is None
    with pytest.raises(u.BadUcallError, match="4-byte write"):
        t.address_of(mmio(0xFEB0_0000, 4, True, b"\0" * 4))
    with pytest.raises(u.BadUcallError, match="8-byte read"):
        t.address_of(mmio(0xFEB0_0000, 8, False, b"\0" * 8))
