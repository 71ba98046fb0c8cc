"""A seeded mutator over the guest ELF loader and the ucall decoder (issue 13 item 6).

Whatever the bytes, only kvmpy's own errors (KvmError and its subclasses) may come
out: an OverflowError, struct.error or MemoryError escaping is a bug. The seed and
the mutation are in the failure message, so a failure reproduces.
"""
from __future__ import annotations

import random
import struct

import pytest

from kvmpy.errors import KvmError
from kvmpy.exits import IoExit, MmioExit
from kvmpy.guest import ucall as u
from kvmpy.guest.elf import GuestElf
from kvmpy.x86.physmem import FlatMemory
from test_elf import globals_elf  # noqa: F401 - the fixture: the built "globals" guest

SEED = 13
ELF_CASES = 1000   # ~1.5 ms each
UCALL_CASES = 5000

INTERESTING = (0, 1, 2, 7, 8, 0x38, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)

# (offset, size) of the ELF64 header fields after e_ident, and of one program/section header's fields.
EHDR_FIELDS = [(16, 2), (18, 2), (20, 4), (24, 8), (32, 8), (40, 8), (48, 4), (52, 2), (54, 2), (56, 2),
               (58, 2), (60, 2), (62, 2)]
PHDR_FIELDS = [(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8)]
SHDR_FIELDS = [(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 4), (44, 4), (48, 8), (56, 8)]


def _value(rng: random.Random, size: int, raw_len: int) -> int:
    v = rng.choice(INTERESTING + (raw_len, raw_len + 1, rng.getrandbits(8 * size)))
    return v & ((1 << 8 * size) - 1)


def _put(buf: bytearray, off: int, size: int, value: int) -> None:
    if 0 <= off and off + size <= len(buf):
        buf[off: off + size] = value.to_bytes(size, "little")


def mutate_elf(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of ``raw`` and a description of it."""
    buf = bytearray(raw)
    phoff, = struct.unpack_from("<Q", raw, 32)
    shoff, = struct.unpack_from("<Q", raw, 40)
    phnum, shnum = struct.unpack_from("<H", raw, 56)[0], struct.unpack_from("<H", raw, 60)[0]
    kind = rng.randrange(6)
    if kind == 0:
        off, size = rng.choice(EHDR_FIELDS)
    elif kind == 1:
        field, size = rng.choice(PHDR_FIELDS)
        off = phoff + 56 * rng.randrange(max(phnum, 1)) + field
    elif kind == 2:
        field, size = rng.choice(SHDR_FIELDS)
        off = shoff + 64 * rng.randrange(max(shnum, 1)) + field
    if kind <= 2:
        value = _value(rng, size, len(raw))
        _put(buf, off, size, value)
        return bytes(buf), f"field at {off:#x} ({size} bytes) = {value:#x}"
    if kind == 3:
        offs = [rng.randrange(len(buf)) for _ in range(rng.randint(1, 16))]
        for off in offs:
            buf[off] ^= 1 << rng.randrange(8)
        return bytes(buf), f"bit flips at {[hex(o) for o in offs]}"
    if kind == 4:
        n = rng.randrange(len(buf))
        return bytes(buf[:n]), f"truncated to {n:#x} bytes"
    off, n = rng.randrange(len(buf)), rng.randint(1, 64)
    return bytes(buf[:off] + bytes(rng.getrandbits(8) for _ in range(n)) + buf[off:]), f"{n} bytes inserted at {off:#x}"


def _use(path, mem: FlatMemory) -> None:
    """Everything a caller does with a guest ELF."""
    elf = GuestElf(path)
    repr(elf)
    elf.end
    elf.load(mem)
    for name in list(elf.symbols)[:8]:
        elf.symbolize(elf.symbols[name].addr)
        elf.read_global_bytes(mem, name)
        elf.read_global(mem, name)
        elf.write_global(mem, name, 1)


def test_mutated_elfs_raise_only_kvmpy_errors(tmp_path, globals_elf):
    rng = random.Random(SEED)
    path = tmp_path / "m.elf"
    mem = FlatMemory(8 << 20)
    escaped = []
    for case in range(ELF_CASES):
        data, how = mutate_elf(globals_elf, rng)
        path.write_bytes(data)
        try:
            _use(path, mem)
        except KvmError:
            pass
        except Exception as e:  # noqa: BLE001 - what the test is looking for
            escaped.append(f"case {case} ({how}): {type(e).__name__}: {e}")
    assert not escaped, f"{len(escaped)} of {ELF_CASES} mutated ELFs (seed {SEED}) escaped:\n" + "\n".join(escaped[:20])


def test_huge_program_header_offset(tmp_path, globals_elf):
    bad = bytearray(globals_elf)
    struct.pack_into("<Q", bad, 32, (1 << 64) - 1)
    (tmp_path / "g.elf").write_bytes(bad)
    with pytest.raises(KvmError, match="g.elf: truncated ELF: .* program headers at offset 0xffffffffffffffff"):
        GuestElf(tmp_path / "g.elf")


UCALL_GPA = 0x2000
MEM_SIZE = 0x4000


def _ucall_bytes(rng: random.Random) -> bytes:
    """A ucall struct: valid to start with, then some fields set to interesting values."""
    cmd = rng.choice((u.UCALL_SYNC, u.UCALL_DONE, u.UCALL_ASSERT, u.UCALL_PRINTF, u.UCALL_EXCEPTION))
    fields = [u.UCALL_MAGIC, cmd, rng.randrange(1000), rng.randrange(u.UCALL_BUF_SIZE + 1),
              rng.randrange(u.UCALL_MAX_ARGS + 1), rng.getrandbits(3)]
    for _ in range(rng.randrange(3)):
        i = rng.randrange(len(fields))
        fields[i] = _value(rng, 4, 0)
    args = [_value(rng, 8, 0) for _ in range(u.UCALL_MAX_ARGS)]
    text = bytes(rng.choice(b"abc\0\xff\x80%") for _ in range(u.UCALL_BUF_SIZE))
    return struct.pack("<IIIIII6Q", *fields, *args) + text


def _exit(rng: random.Random, gpa: int):
    """A port or MMIO exit carrying ``gpa``, possibly with the wrong size, direction or data."""
    if rng.random() < 0.5:
        size = rng.choice((1, 2, 4, 4, 4, 8))
        data = memoryview(bytearray(gpa.to_bytes(8, "little")[: rng.choice((0, 1, 2, 4, 4, 8))]))
        return IoExit(2, rng.choice((u.UCALL_PORT, u.UCALL_PORT, 0x10)), size, rng.choice(("out", "out", "in")),
                      1, data)
    length = rng.choice((1, 4, 8, 8, 8))
    data = memoryview(bytearray(gpa.to_bytes(8, "little")[: rng.choice((0, 4, 8, 8))]))
    return MmioExit(6, rng.choice((0xFFFF0000, 0xFFFF0000, 0x1000)), length, rng.random() < 0.8, data)


def test_mutated_ucalls_raise_only_kvmpy_errors():
    rng = random.Random(SEED)
    transports = (u.PORT_IO, u.UcallTransport(port=None, mmio_gpa=0xFFFF0000))
    escaped = []
    for case in range(UCALL_CASES):
        mem = FlatMemory(MEM_SIZE)
        mem.write(UCALL_GPA, _ucall_bytes(rng))
        gpa = rng.choice((UCALL_GPA, UCALL_GPA, MEM_SIZE - u.UCALL_SIZE, MEM_SIZE - 8, MEM_SIZE,
                          _value(rng, 8, 0)))
        if rng.random() < 0.1:
            gpa = -gpa - 1
        ex = _exit(rng, gpa & (0xFFFFFFFF if rng.random() < 0.5 else (1 << 64) - 1))
        try:
            call = u.ucall_of(ex, mem, rng.choice(transports))
            if isinstance(call, u.AssertCall):
                call.describe()
            elif isinstance(call, u.ExceptionCall):
                call.vector_name
            call = u.decode(mem, gpa)
        except KvmError:
            pass
        except Exception as e:  # noqa: BLE001 - what the test is looking for
            escaped.append(f"case {case} (gpa {gpa:#x}, {ex!r}): {type(e).__name__}: {e}")
    assert not escaped, f"{len(escaped)} of {UCALL_CASES} mutated ucalls (seed {SEED}) escaped:\n" + \
        "\n".join(escaped[:20])
