"""Host side of the ucall ABI defined in guests/lib/ucall_abi.h.

A guest hands the host the GPA of a ``struct ucall`` through a transport: a 32-bit
OUT to UCALL_PORT (ring 0), or an 8-byte store to an MMIO address no memslot backs
(any CPL; the runtime stores there when the host sets its ``ucall_mmio_gpa``).
:func:`ucall_of` is the one decoder every vCPU loop uses for either; it never
reads outside guest memory.
"""
from __future__ import annotations

import struct

from kvmpy.errors import KvmError
from kvmpy.exits import Exit, IoExit, MmioExit
from kvmpy.record import Record
from kvmpy.x86.physmem import PhysMemory

# Mirrors guests/lib/ucall_abi.h (tests/test_ucall.py checks they agree).
UCALL_PORT = 0x1000
UCALL_MAGIC = 0x4B564D55
UCALL_MAX_ARGS = 6
UCALL_BUF_SIZE = 512
UCALL_SIZE = 584

UCALL_SYNC = 1
UCALL_DONE = 2
UCALL_ASSERT = 3
UCALL_PRINTF = 4
UCALL_EXCEPTION = 5

UCALL_F_EQ = 1 << 0
UCALL_F_NE = 1 << 1
UCALL_F_TRUNCATED = 1 << 2

_HEADER = struct.Struct("<IIIIII6Q")
assert _HEADER.size + UCALL_BUF_SIZE == UCALL_SIZE

VECTOR_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
    19: "#XM", 20: "#VE", 21: "#CP", 29: "#VC", 30: "#SX",
}


class BadUcallError(KvmError):
    """The guest's ucall pointer or contents are invalid (outside memory, bad magic, bad length)."""


class Ucall(Record, frozen=True):
    """Base of decoded ucalls; ``gpa`` is where the struct was."""

    gpa: int


class SyncCall(Ucall):
    """GUEST_SYNC(stage, values...): the guest reached ``stage`` (guests/lib/stages.h)."""

    stage: int
    args: tuple[int, ...]


class DoneCall(Ucall):
    """GUEST_DONE() (or a return from guest_main): the program finished."""


class PrintfCall(Ucall):
    """GUEST_PRINTF's formatted ``text`` (``truncated`` if it did not fit the ucall buffer)."""

    text: str
    truncated: bool


class AssertCall(Ucall):
    """A failed GUEST_ASSERT*: where, what, and for _EQ/_NE the two values."""

    file: str
    line: int
    expr: str
    message: str
    values: tuple[int, ...]  # (a, b) for GUEST_ASSERT_EQ/NE, else ()
    op: str                  # "==", "!=" or ""

    def describe(self) -> str:
        """``file:line: expr`` plus the compared values and the message, for error messages."""
        s = f"{self.file}:{self.line}: {self.expr}"
        if self.values:
            a, b = self.values
            s += f" (left {a:#x} = {a}, right {b:#x} = {b})"
        if self.message:
            s += f": {self.message}"
        return s


class ExceptionCall(Ucall):
    """An exception the guest had no handler for: vector, error code and the state at it."""

    vector: int
    error_code: int
    rip: int
    cr2: int
    rsp: int
    cs: int

    @property
    def vector_name(self) -> str:
        return VECTOR_NAMES.get(self.vector, f"vector {self.vector}")


class UcallTransport(Record, frozen=True):
    """How a guest hands over the GPA of its ``struct ucall``.

    ``port``: a 32-bit OUT of the GPA to this I/O port (the runtime's way, ring 0);
    ``mmio_gpa``: an 8-byte store of the GPA to this guest physical address, which
    no memslot may back, so that the store exits as KVM_EXIT_MMIO (works at CPL3).
    """

    port: int | None = UCALL_PORT
    mmio_gpa: int | None = None

    def address_of(self, ex: Exit) -> int | None:
        """The ucall GPA if ``ex`` is a ucall on this transport, else None.

        A ucall with the wrong access size or direction is a BadUcallError.
        """
        if isinstance(ex, IoExit) and self.port is not None and ex.port == self.port:
            if ex.direction != "out" or ex.size != 4 or len(ex.data) < 4:
                raise BadUcallError(f"ucall port {self.port:#x} used with a {ex.size}-byte {ex.direction!r} "
                                    f"access; expected a 32-bit OUT of the ucall GPA")
            return struct.unpack_from("<I", ex.data)[0]
        if isinstance(ex, MmioExit) and self.mmio_gpa is not None and ex.addr == self.mmio_gpa:
            if not ex.is_write or ex.length != 8 or len(ex.data) < 8:
                raise BadUcallError(f"ucall MMIO address {self.mmio_gpa:#x} used with a {ex.length}-byte "
                                    f"{'write' if ex.is_write else 'read'}; expected an 8-byte store of the ucall GPA")
            return struct.unpack_from("<Q", ex.data)[0]
        return None


PORT_IO = UcallTransport()
# No memslot may back this page (kvmpy's test memory lies below it): it is what a
# user-mode (CPL3) guest stores its ucall addresses to.
MMIO = UcallTransport(port=None, mmio_gpa=0xF000_0000)


def ucall_of(ex: Exit, mem: PhysMemory, transport: UcallTransport = PORT_IO) -> Ucall | None:
    """The decoded ucall if ``ex`` is one on ``transport``, else None (any other exit)."""
    gpa = transport.address_of(ex)
    return None if gpa is None else decode(mem, gpa)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def decode(mem: PhysMemory, gpa: int) -> Ucall:
    """Read and validate the ``struct ucall`` at ``gpa``."""
    try:
        raw = mem.read(gpa, UCALL_SIZE)
    except KvmError as e:
        raise BadUcallError(f"ucall pointer {gpa:#x} (+{UCALL_SIZE} bytes) is outside guest memory: {e}") from None
    magic, cmd, line, length, nargs, flags, *args = _HEADER.unpack_from(raw)
    buf = raw[_HEADER.size:]
    if magic != UCALL_MAGIC:
        raise BadUcallError(f"ucall at {gpa:#x}: bad magic {magic:#010x} (expected {UCALL_MAGIC:#010x})")
    if length > UCALL_BUF_SIZE:
        raise BadUcallError(f"ucall at {gpa:#x}: len {length} exceeds the {UCALL_BUF_SIZE}-byte buffer")
    if nargs > UCALL_MAX_ARGS:
        raise BadUcallError(f"ucall at {gpa:#x}: nargs {nargs} exceeds {UCALL_MAX_ARGS}")
    args = tuple(args[:nargs])
    text = buf[:length]
    if cmd == UCALL_SYNC:
        if nargs < 1:
            raise BadUcallError(f"ucall at {gpa:#x}: SYNC without a stage")
        return SyncCall(gpa, args[0], args[1:])
    if cmd == UCALL_DONE:
        return DoneCall(gpa)
    if cmd == UCALL_PRINTF:
        return PrintfCall(gpa, _text(text), bool(flags & UCALL_F_TRUNCATED))
    if cmd == UCALL_ASSERT:
        parts = text.split(b"\0", 2) + [b"", b""]
        op = "==" if flags & UCALL_F_EQ else "!=" if flags & UCALL_F_NE else ""
        return AssertCall(gpa, _text(parts[0]), line, _text(parts[1]), _text(parts[2]).rstrip("\0"),
                          args[:2] if nargs >= 2 else (), op)
    if cmd == UCALL_EXCEPTION:
        if nargs < 6:
            raise BadUcallError(f"ucall at {gpa:#x}: EXCEPTION with {nargs} of 6 args")
        return ExceptionCall(gpa, *args[:6])
    raise BadUcallError(f"ucall at {gpa:#x}: unknown command {cmd}")
