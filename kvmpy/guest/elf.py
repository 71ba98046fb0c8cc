"""Load a static x86-64 guest ELF into guest physical memory (pyelftools).

PT_LOAD segments go to their physical addresses; the symbol table gives
access to guest globals (the host writes parameters before a run and reads
results after it, like the kernel selftests' sync_global_to_guest()).

pyelftools reads the headers into an :class:`ElfLayout` (the entry, the PT_LOAD table and
where .symtab is); :mod:`kvmpy.guest.layout_cache` keeps each layout on disk under the
ELF's content hash, so a later process loading the same program neither imports pyelftools
nor builds its structs (about 30 ms of a ``kvmpy perf`` run, a third of its start-up).
"""
from __future__ import annotations

import functools
import itertools
import struct
import threading
from pathlib import Path

from kvmpy.errors import KvmError
from kvmpy.guest import layout_cache
from kvmpy.record import Record
from kvmpy.x86.physmem import PhysMemory

_SYM = struct.Struct("<IBBHQQ")    # Elf64_Sym: st_name, st_info, st_other, st_shndx, st_value, st_size
_SHN_UNDEF = 0
_STT = {0: "STT_NOTYPE", 1: "STT_OBJECT", 2: "STT_FUNC", 3: "STT_SECTION", 4: "STT_FILE", 5: "STT_COMMON",
        6: "STT_TLS", 10: "STT_LOOS"}    # pyelftools' names (st_info's low nibble)
# What reading a corrupt file's headers or tables raises besides ElfError.
_CORRUPT = (struct.error, ValueError, KeyError, IndexError, AttributeError, OverflowError)
_EM_NAMES = {3: "EM_386 (i386)", 40: "EM_ARM", 62: "EM_X86_64", 183: "EM_AARCH64", 243: "EM_RISCV"}


class ElfError(KvmError):
    """A guest ELF that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class LoadSegment(Record, frozen=True):
    """One PT_LOAD segment."""

    paddr: int
    vaddr: int
    filesz: int
    memsz: int
    flags: int  # PF_X=1, PF_W=2, PF_R=4
    data: bytes


class ElfLayout(Record, frozen=True):
    """What a guest ELF's headers say, as pyelftools read them: the entry point, each
    PT_LOAD's ``(paddr, vaddr, file offset, filesz, memsz, flags)``, and .symtab's
    ``(offset, size, entry size)`` with its string table's ``(offset, size)`` (None
    without one). The bytes they point at are read from the file itself."""

    entry: int
    loads: tuple
    symtab: tuple | None
    strtab: tuple | None

    def to_json(self) -> dict:
        return {"entry": self.entry, "loads": [list(t) for t in self.loads],
                "symtab": None if self.symtab is None else list(self.symtab),
                "strtab": None if self.strtab is None else list(self.strtab)}

    @classmethod
    def from_json(cls, obj: object) -> ElfLayout:
        """The layout ``to_json`` gave; ValueError if ``obj`` is not one (a damaged cache file)."""
        def ints(value: object, n: int) -> tuple:
            if not isinstance(value, list) or len(value) != n or \
                    not all(type(v) is int and v >= 0 for v in value):
                raise ValueError(f"expected {n} non-negative ints, got {value!r:.80}")
            return tuple(value)
        if not isinstance(obj, dict) or set(obj) != {"entry", "loads", "symtab", "strtab"} \
                or not isinstance(obj["loads"], list) or (obj["symtab"] is None) != (obj["strtab"] is None):
            raise ValueError(f"not an ElfLayout: {obj!r:.80}")
        (entry,) = ints([obj["entry"]], 1)
        return cls(entry, tuple(ints(t, 6) for t in obj["loads"]),
                   None if obj["symtab"] is None else ints(obj["symtab"], 3),
                   None if obj["strtab"] is None else ints(obj["strtab"], 2))


class Symbol(Record, frozen=True):
    """A symbol from .symtab: ``addr`` is its (identity-mapped) guest address."""

    name: str
    addr: int
    size: int
    type: str  # STT_OBJECT, STT_FUNC, ...


@functools.lru_cache(maxsize=8)
def _structs(e_type: str | None = None, e_machine: str | None = None, osabi: str | None = None):
    """pyelftools' structs of a little-endian ELF64 (its header alone without arguments; all of them
    for a header's type, machine and OS ABI). Built once: building them costs more than a parse.

    These, not pyelftools' ELFFile, which imports its DWARF and ehabi readers too: that tripled
    the import cost of every guest-loading process."""
    from elftools.elf.structs import ELFStructs     # only when the layout is not in the cache

    structs = ELFStructs(little_endian=True, elfclass=64)
    structs.create_basic_structs()
    if e_type is not None:
        structs.create_advanced_structs(e_type, e_machine, osabi)
    return structs


# Programs parsed so far, by their bytes: a test builds a guest from the same ELF again and again,
# and a parse costs ~0.7 ms here, ten times that in a test bed.
_PARSED: dict[bytes, tuple[int, list[LoadSegment], dict[str, Symbol], dict[str, tuple[Symbol, ...]]]] = {}
_PARSED_MAX = 32
_PARSED_LOCK = threading.Lock()     # threads build guests at once: eviction must not race


class GuestElf:
    """A parsed guest program.  Validation happens here, at construction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise ElfError(path, f"cannot read: {e.strerror}") from None
        with _PARSED_LOCK:
            parsed = _PARSED.get(raw)
        if parsed is None:
            self._parse(raw)        # outside the lock: other threads need not wait for this parse
            with _PARSED_LOCK:
                while len(_PARSED) >= _PARSED_MAX:
                    _PARSED.pop(next(iter(_PARSED)))
                _PARSED[raw] = (self.entry, self.segments, self.symbols, self._ambiguous)
        else:       # the same bytes parse the same way: copies, so no instance shares mutable state
            self.entry, self.segments = parsed[0], list(parsed[1])
            self.symbols, self._ambiguous = dict(parsed[2]), dict(parsed[3])

    def _fail(self, problem: str) -> ElfError:
        return ElfError(self.path, problem)

    def _parse(self, raw: bytes) -> None:
        if len(raw) < 4 or raw[:4] != b"\x7fELF":
            raise self._fail("not an ELF file (bad magic)")
        if len(raw) < 64:
            raise self._fail(f"truncated ELF: {len(raw)} bytes, shorter than the ELF header")
        if raw[4] != 2:
            raise self._fail("wrong architecture: 32-bit ELF (ELFCLASS32), expected ELFCLASS64 x86-64")
        if raw[5] != 1:
            raise self._fail("wrong architecture: big-endian ELF, expected little-endian x86-64")
        (machine,) = struct.unpack_from("<H", raw, 18)
        if machine != 62:
            name = _EM_NAMES.get(machine, f"e_machine {machine}")
            raise self._fail(f"wrong architecture: {name}, expected EM_X86_64")
        cached = layout_cache.get(raw)
        if cached is not None:
            try:
                self._use_layout(raw, ElfLayout.from_json(cached))
                return
            except (ElfError, *_CORRUPT):
                pass        # a damaged entry, or one that does not fit its file: read the headers again
        try:
            layout = self._read_layout(raw)
            self._use_layout(raw, layout)
        except ElfError:
            raise
        except _CORRUPT as e:
            raise self._fail(f"truncated or corrupt ELF: {e}") from None
        layout_cache.put(raw, layout.to_json())     # only a layout that loaded: a corrupt file leaves none

    def _read_layout(self, raw: bytes) -> ElfLayout:
        """The headers' layout, read by pyelftools; ElfError naming what is corrupt."""
        from elftools.construct import ConstructError

        try:
            ehdr = _structs().Elf_Ehdr.parse(raw)
            if ehdr.e_type != "ET_EXEC":
                raise self._fail(f"not a static executable (e_type {ehdr.e_type})")
            elf = _structs(ehdr.e_type, ehdr.e_machine, ehdr.e_ident.EI_OSABI)
            loads = tuple((seg.p_paddr, seg.p_vaddr, seg.p_offset, seg.p_filesz, seg.p_memsz, seg.p_flags)
                          for seg in self._table(raw, elf.Elf_Phdr, ehdr.e_phoff, ehdr.e_phnum,
                                                 ehdr.e_phentsize, "program")
                          if seg.p_type == "PT_LOAD")
            sections = self._table(raw, elf.Elf_Shdr, ehdr.e_shoff, ehdr.e_shnum, ehdr.e_shentsize, "section")
            symtab = self._section(raw, sections, ehdr.e_shstrndx, ".symtab")
            if symtab is None:
                return ElfLayout(ehdr.e_entry, loads, None, None)
            if symtab.sh_link >= len(sections):
                raise self._fail(f"corrupt .symtab: its string table is section {symtab.sh_link} of {len(sections)}")
            strtab = sections[symtab.sh_link]
            return ElfLayout(ehdr.e_entry, loads, (symtab.sh_offset, symtab.sh_size, symtab.sh_entsize),
                             (strtab.sh_offset, strtab.sh_size))
        except ConstructError as e:
            raise self._fail(f"truncated or corrupt ELF: {e}") from None

    def _use_layout(self, raw: bytes, layout: ElfLayout) -> None:
        """Take the entry, the segments' bytes and the symbols from ``raw`` where ``layout``
        says they are, checking that they are there (a fresh layout and a cached one alike)."""
        segs = []
        for paddr, vaddr, off, filesz, memsz, flags in layout.loads:
            if off + filesz > len(raw):
                raise self._fail(f"truncated ELF: segment at offset {off:#x}+{filesz:#x} "
                                 f"runs past the end of the file ({len(raw):#x} bytes)")
            if filesz > memsz:
                raise self._fail(f"corrupt segment at {paddr:#x}: filesz > memsz")
            if vaddr != paddr:
                # Segments load at p_paddr but symbols and the entry are virtual addresses,
                # and the host maps guest memory GVA == GPA (guests/lib/guest.ld).
                raise self._fail(f"segment at p_vaddr {vaddr:#x} loads at p_paddr {paddr:#x}: "
                                 "kvmpy guests must be linked with equal virtual and physical addresses")
            segs.append(LoadSegment(paddr, vaddr, filesz, memsz, flags, raw[off: off + filesz]))
        if not segs:
            raise self._fail("no PT_LOAD segments")
        self.symbols, self._ambiguous = ({}, {}) if layout.symtab is None else \
            self._symbols(raw, layout.symtab, layout.strtab)
        self.entry, self.segments = layout.entry, segs

    def _table(self, raw: bytes, entry, offset: int, count: int, entsize: int, what: str) -> list:
        """The ``count`` headers (``entry``, a pyelftools struct) ``entsize`` bytes apart from ``offset``."""
        if count and entsize < entry.sizeof():
            raise self._fail(f"corrupt ELF header: {what} header entries of {entsize} bytes, "
                             f"expected {entry.sizeof()}")
        if offset + count * entsize > len(raw):
            raise self._fail(f"truncated ELF: {count} {what} headers at offset {offset:#x} run past "
                             f"the end of the file ({len(raw):#x} bytes)")
        return [entry.parse(raw[offset + i * entsize: offset + (i + 1) * entsize]) for i in range(count)]

    def _section(self, raw: bytes, sections: list, names_index: int, name: str):
        """The header of the section called ``name`` (None if there is none); the names are
        in section ``names_index`` (e_shstrndx)."""
        if not sections:
            return None
        if names_index >= len(sections):
            raise self._fail(f"corrupt ELF header: section names in section {names_index} of {len(sections)}")
        names = sections[names_index]
        start, end = names.sh_offset, names.sh_offset + names.sh_size
        if end > len(raw):
            raise self._fail("truncated ELF: the section name table runs past the end of the file")
        wanted = name.encode() + b"\0"
        return next((s for s in sections if s.sh_name < names.sh_size
                     and raw.startswith(wanted, start + s.sh_name, end)), None)

    def _symbols(self, raw: bytes, symtab: tuple, strtab: tuple) -> tuple[dict[str, Symbol],
                                                                          dict[str, tuple[Symbol, ...]]]:
        """The defined, named symbols of ``symtab`` (the last of each name), and every symbol of
        each name that several addresses have (e.g. two ``static`` variables).

        Read with struct: pyelftools' per-symbol parse was most of a guest's set-up in a
        one-shot process (the ~140 symbols took 45 ms)."""
        (off, size, entsize), (str_off, str_size) = symtab, strtab
        if entsize != _SYM.size or size % _SYM.size:
            raise self._fail(f"corrupt .symtab: entry size {entsize}, section size {size}")
        if off + size > len(raw) or str_off + str_size > len(raw):
            raise self._fail("truncated ELF: .symtab or its string table runs past the end of the file")
        strings = raw[str_off: str_off + str_size]
        symbols: dict[str, Symbol] = {}
        ambiguous: dict[str, tuple[Symbol, ...]] = {}
        for st_name, st_info, _other, st_shndx, st_value, st_size in _SYM.iter_unpack(raw[off: off + size]):
            if st_shndx == _SHN_UNDEF or not st_name:
                continue
            end = strings.find(b"\0", st_name)
            if st_name >= len(strings) or end < 0:
                raise self._fail(f"corrupt .symtab: a name at {st_name:#x} outside its string table")
            name = strings[st_name:end].decode("utf-8", "replace")
            if name:
                sym = Symbol(name, st_value, st_size, _STT.get(st_info & 0xF, st_info & 0xF))
                old = symbols.get(name)
                if old is not None and old.addr != sym.addr:
                    ambiguous[name] = ambiguous.get(name, (old,)) + (sym,)
                symbols[name] = sym
        return symbols, ambiguous

    def __repr__(self) -> str:
        return f"GuestElf({str(self.path)!r}, entry={self.entry:#x})"

    @property
    def end(self) -> int:
        """First guest physical address after the highest segment."""
        return max(s.paddr + s.memsz for s in self.segments)

    def symbol(self, name: str) -> Symbol:
        """The symbol ``name``; ElfError naming the file if it is missing, or if several
        symbols of that name have different addresses (which one is meant is unknowable)."""
        try:
            sym = self.symbols[name]
        except (KeyError, TypeError):
            raise self._fail(f"no symbol {name!r} in the symbol table") from None
        if name in self._ambiguous:
            where = ", ".join(f"{s.addr:#x} ({s.size} bytes)" for s in self._ambiguous[name])
            raise self._fail(f"symbol {name!r} is ambiguous: the symbol table has it at {where}")
        return sym

    def symbolize(self, addr: int) -> str:
        """``func+0xoff`` for an address inside a function symbol, else the hex address."""
        for sym in itertools.chain(self.symbols.values(), *self._ambiguous.values()):
            if sym.type == "STT_FUNC" and sym.addr <= addr < sym.addr + max(sym.size, 1):
                return f"{sym.name}+{addr - sym.addr:#x}"
        return f"{addr:#x}"

    def load(self, mem: PhysMemory) -> None:
        """Copy every PT_LOAD segment to guest memory, zero-filling the bss part.

        ElfError if a segment is not wholly inside guest memory (one memslot).
        """
        for seg in self.segments:
            try:
                view = mem.gpa_view(seg.paddr, seg.memsz)
            except KvmError as e:
                raise self._fail(f"segment {seg.paddr:#x}+{seg.memsz:#x} is outside guest memory ({e})") from None
            view[: seg.filesz] = seg.data
            view[seg.filesz:] = bytes(seg.memsz - seg.filesz)

    def _global_view(self, mem: PhysMemory, name: str, offset: int, length: int | None) -> memoryview:
        sym = self.symbol(name)
        if not isinstance(offset, int) or not isinstance(length, (int, type(None))):
            raise self._fail(f"access to {name!r}: offset {offset!r} and size {length!r} must be ints")
        length = sym.size - offset if length is None else length
        if offset < 0 or length <= 0 or offset + length > sym.size:
            raise self._fail(f"access {offset:#x}+{length:#x} is outside {name!r} ({sym.size} bytes)")
        try:
            return mem.gpa_view(sym.addr + offset, length)
        except KvmError as e:
            raise self._fail(f"global {name!r} at {sym.addr:#x} is outside guest memory ({e})") from None

    def write_global(self, mem: PhysMemory, name: str, value: int | bytes, offset: int = 0) -> None:
        """Set guest global ``name`` (from ``offset``): an int fills the whole symbol (or the
        rest of it, up to 8 bytes), little endian; bytes are copied as they are."""
        sym = self.symbol(name)
        if not isinstance(offset, int) or not 0 <= offset < sym.size:
            raise self._fail(f"offset {offset!r} is outside {name!r} ({sym.size} bytes)")
        if isinstance(value, int):
            size = min(sym.size - offset, 8)
            try:
                data = value.to_bytes(size, "little", signed=value < 0)
            except OverflowError:
                raise self._fail(f"value {value:#x} does not fit in {name!r} ({size} bytes)") from None
        else:
            try:
                if isinstance(value, str):      # bytes(str) needs an encoding: say what is wrong instead
                    raise TypeError("a str, encode it first")
                data = bytes(value)
            except (TypeError, ValueError) as e:
                raise self._fail(f"value for {name!r} must be an int or bytes ({e})") from None
        self._global_view(mem, name, offset, len(data))[:] = data

    def read_global(self, mem: PhysMemory, name: str, offset: int = 0, size: int | None = None) -> int:
        """Read guest global ``name`` as an unsigned little-endian int (at most 8 bytes)."""
        size = min(self.symbol(name).size - offset, 8) if size is None else size
        return int.from_bytes(self._global_view(mem, name, offset, size), "little")

    def global_view(self, mem: PhysMemory, name: str) -> memoryview:
        """A live view of the whole of guest global ``name`` (released when the memory closes),
        for a value the host polls: reading it costs no lookup."""
        return self._global_view(mem, name, 0, None)

    def read_global_bytes(self, mem: PhysMemory, name: str) -> bytes:
        """The whole of guest global ``name`` as bytes."""
        return bytes(self._global_view(mem, name, 0, None))
