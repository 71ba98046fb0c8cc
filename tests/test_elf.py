"""Guest ELF loader: real guest programs and bad inputs (no /dev/kvm)."""
from __future__ import annotations

import struct

import pytest

from kvmpy.guest import programs
from kvmpy.guest.elf import ElfError, GuestElf
from kvmpy.x86.physmem import FlatMemory


@pytest.fixture(scope="module")
def globals_elf() -> bytes:
    try:
        return programs.find("globals").read_bytes()
    except programs.GuestProgramError as e:
        pytest.skip(f"cannot build guest programs: {e}")


def write(tmp_path, data: bytes, name="g.elf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def pt_loads(raw: bytes) -> list[tuple[int, int, int, int]]:
    """(p_offset, p_paddr, p_filesz, p_memsz) of each PT_LOAD, read from the ELF64 program
    headers by hand (not by the loader under test)."""
    e_phoff, = struct.unpack_from("<Q", raw, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", raw, 54)
    out = []
    for i in range(e_phnum):
        phdr = struct.unpack_from("<IIQQQQQ", raw, e_phoff + i * e_phentsize)
        p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz = phdr
        if p_type == 1:
            out.append((p_offset, p_paddr, p_filesz, p_memsz))
    return out


def test_loads_segments_and_zeroes_bss(tmp_path, globals_elf):
    elf = GuestElf(write(tmp_path, globals_elf))
    assert elf.entry == elf.symbol("_start").addr == 0x400000
    mem = FlatMemory(8 << 20)
    mem.buf[:] = b"\xff" * len(mem.buf)
    elf.load(mem)
    loads = pt_loads(globals_elf)
    assert len(loads) >= 2 and any(memsz > filesz for *_, filesz, memsz in loads), "expected text and data+bss"
    for offset, paddr, filesz, memsz in loads:
        assert mem.read(paddr, filesz) == globals_elf[offset: offset + filesz], f"segment at {paddr:#x}"
        assert mem.read(paddr + filesz, memsz - filesz) == bytes(memsz - filesz), f"bss of segment at {paddr:#x}"
    # Only the segments were written.
    spans = sorted((paddr, paddr + memsz) for _, paddr, _, memsz in loads)
    assert mem.read(spans[0][0] - 1, 1) == b"\xff" and mem.read(spans[-1][1], 1) == b"\xff"
    # .bss globals read as zero after loading, memory outside the segments is untouched
    assert elf.read_global(mem, "out_value") == 0
    assert mem.read(0x3FF000, 1) == b"\xff"


def test_globals_roundtrip(tmp_path, globals_elf):
    elf = GuestElf(write(tmp_path, globals_elf))
    mem = FlatMemory(8 << 20)
    elf.load(mem)
    elf.write_global(mem, "in_value", 0x1122334455667788)
    assert mem.read(elf.symbol("in_value").addr, 8) == struct.pack("<Q", 0x1122334455667788)
    elf.write_global(mem, "in_array", 7, offset=8)  # in_array[2], a uint32_t
    assert elf.read_global(mem, "in_array", offset=8) == 7
    assert elf.read_global(mem, "in_array", offset=0, size=8) == 0
    with pytest.raises(ElfError, match="does not fit in 'in_array'"):
        elf.write_global(mem, "in_array", 1 << 32, offset=12)
    with pytest.raises(ElfError, match="outside 'in_array'"):
        elf.write_global(mem, "in_array", b"\0" * 17)
    with pytest.raises(ElfError, match=r"g\.elf: no symbol 'nonexistent'"):
        elf.read_global(mem, "nonexistent")


def test_garbage_and_empty(tmp_path):
    with pytest.raises(ElfError, match=r"junk\.elf: not an ELF file \(bad magic\)"):
        GuestElf(write(tmp_path, b"#!/bin/sh\necho hi\n" * 10, "junk.elf"))
    with pytest.raises(ElfError, match="not an ELF file"):
        GuestElf(write(tmp_path, b"", "empty.elf"))
    with pytest.raises(ElfError, match="cannot read"):
        GuestElf(tmp_path / "missing.elf")


def test_truncated(tmp_path, globals_elf):
    with pytest.raises(ElfError, match="truncated ELF: 40 bytes"):
        GuestElf(write(tmp_path, globals_elf[:40]))
    with pytest.raises(ElfError, match="truncated"):
        GuestElf(write(tmp_path, globals_elf[:0x1800]))  # headers intact, text cut short


def test_corrupt_program_header_offset(tmp_path, globals_elf):
    bad = bytearray(globals_elf)
    struct.pack_into("<Q", bad, 32, 1 << 40)  # e_phoff far past the end
    with pytest.raises(ElfError, match=r"truncated ELF: \d+ program headers at offset 0x10000000000 run past"):
        GuestElf(write(tmp_path, bytes(bad)))


@pytest.mark.parametrize("offset,fmt,value,match", [
    (54, "<H", 16, "corrupt ELF header: program header entries of 16 bytes, expected 56"),   # e_phentsize
    (58, "<H", 8, "corrupt ELF header: section header entries of 8 bytes, expected 64"),     # e_shentsize
    (62, "<H", 999, r"corrupt ELF header: section names in section 999 of \d+"),              # e_shstrndx
    (60, "<H", 4000, "truncated ELF: 4000 section headers at offset"),                        # e_shnum
])
def test_a_corrupt_header_table_is_named(tmp_path, globals_elf, offset, fmt, value, match):
    bad = bytearray(globals_elf)
    struct.pack_into(fmt, bad, offset, value)
    with pytest.raises(ElfError, match=match):
        GuestElf(write(tmp_path, bytes(bad)))


@pytest.mark.parametrize("patch,match", [
    ((4, b"\x01"), "32-bit ELF"),
    ((5, b"\x02"), "big-endian"),
    ((18, struct.pack("<H", 183)), "wrong architecture: EM_AARCH64, expected EM_X86_64"),
    ((18, struct.pack("<H", 3)), "wrong architecture: EM_386"),
    ((16, struct.pack("<H", 3)), "not a static executable"),  # ET_DYN
])
def test_wrong_kind(tmp_path, globals_elf, patch, match):
    off, data = patch
    bad = bytearray(globals_elf)
    bad[off: off + len(data)] = data
    with pytest.raises(ElfError, match=match):
        GuestElf(write(tmp_path, bytes(bad)))


def test_segment_outside_guest_memory(tmp_path, globals_elf):
    elf = GuestElf(write(tmp_path, globals_elf))
    with pytest.raises(ElfError, match=r"g\.elf: segment 0x400000\+0x[0-9a-f]+ is outside guest memory"):
        elf.load(FlatMemory(4 << 20))  # ends exactly where the program starts


def test_symbolize(tmp_path, globals_elf):
    elf = GuestElf(write(tmp_path, globals_elf))
    main = elf.symbol("guest_main")
    assert elf.symbolize(main.addr + 4) == "guest_main+0x4"
    assert elf.symbolize(0x10) == "0x10"


def _symtab_header(raw: bytes) -> int:
    """File offset of .symtab's section header, found by hand (sh_type SHT_SYMTAB = 2)."""
    e_shoff, = struct.unpack_from("<Q", raw, 40)
    e_shentsize, e_shnum = struct.unpack_from("<HH", raw, 58)
    for i in range(e_shnum):
        if struct.unpack_from("<I", raw, e_shoff + i * e_shentsize + 4)[0] == 2:
            return e_shoff + i * e_shentsize
    raise AssertionError("no .symtab")


def test_entry_segments_and_symbols_are_those_pyelftools_elffile_reads_for_every_guest_program(globals_elf):
    import io

    from elftools.elf.elffile import ELFFile

    paths = sorted(programs.find("globals").parent.glob("*.elf"))
    assert len(paths) > 10
    for path in paths:
        full = ELFFile(io.BytesIO(path.read_bytes()))
        guest = GuestElf(path)
        assert guest.entry == full["e_entry"], path.name
        assert [(s.paddr, s.vaddr, s.filesz, s.memsz, s.flags, s.data) for s in guest.segments] == [
            (s["p_paddr"], s["p_vaddr"], s["p_filesz"], s["p_memsz"], s["p_flags"], s.data())
            for s in full.iter_segments() if s["p_type"] == "PT_LOAD"], path.name
        symtab = full.get_section_by_name(".symtab")
        want = {s.name: (s["st_value"], s["st_size"], s["st_info"]["type"]) for s in symtab.iter_symbols()
                if s.name and s["st_shndx"] != "SHN_UNDEF"}
        got = {n: (s.addr, s.size, s.type) for n, s in guest.symbols.items()}
        assert got == want, path.name
        assert {"STT_FUNC", "STT_OBJECT"} <= {t for _, _, t in got.values()}


@pytest.mark.parametrize("field,value,match", [
    (56, 8, "corrupt .symtab: entry size 8"),                   # sh_entsize
    (56, 16, r"corrupt .symtab: entry size 16, section size \d+"),
    (32, 24 << 36, "truncated ELF: .symtab or its string table"),  # sh_size
    (40, 999, r"corrupt .symtab: its string table is section 999 of \d+"),  # sh_link (and sh_info 0)
])
def test_a_corrupt_symbol_table_is_named(tmp_path, globals_elf, field, value, match):
    bad = bytearray(globals_elf)
    struct.pack_into("<Q", bad, _symtab_header(globals_elf) + field, value)
    with pytest.raises(ElfError, match=match):
        GuestElf(write(tmp_path, bytes(bad)))


def test_a_symbol_name_outside_its_string_table_is_named(tmp_path, globals_elf):
    bad = bytearray(globals_elf)
    sh = _symtab_header(globals_elf)
    sym_off, = struct.unpack_from("<Q", bad, sh + 24)
    struct.pack_into("<I", bad, sym_off + 24, 1 << 30)   # the second symbol's st_name
    with pytest.raises(ElfError, match="corrupt .symtab: a name at 0x40000000 outside its string table"):
        GuestElf(write(tmp_path, bytes(bad)))


def _patch_symbol_name(raw: bytes, victim: str, donor: str) -> bytes:
    """``raw`` with symbol ``victim`` renamed to ``donor`` (its st_name pointed at donor's name)."""
    sh = _symtab_header(raw)
    sym_off, sym_size = struct.unpack_from("<QQ", raw, sh + 24)
    e_shoff, = struct.unpack_from("<Q", raw, 40)
    link, = struct.unpack_from("<I", raw, sh + 40)
    str_off, = struct.unpack_from("<Q", raw, e_shoff + link * 64 + 24)
    names = {}
    for off in range(sym_off, sym_off + sym_size, 24):
        st_name, = struct.unpack_from("<I", raw, off)
        end = raw.index(b"\0", str_off + st_name)
        names[raw[str_off + st_name: end].decode()] = (off, st_name)
    bad = bytearray(raw)
    struct.pack_into("<I", bad, names[victim][0], names[donor][1])
    return bytes(bad)


def test_an_ambiguous_symbol_name_is_refused_naming_both_addresses(tmp_path, globals_elf):
    real = GuestElf(write(tmp_path, globals_elf, "real.elf"))
    a, b = real.symbol("in_value"), real.symbol("out_value")
    elf = GuestElf(write(tmp_path, _patch_symbol_name(globals_elf, "out_value", "in_value")))
    mem = FlatMemory(8 << 20)
    elf.load(mem)
    with pytest.raises(ElfError, match=rf"symbol 'in_value' is ambiguous: .* at {a.addr:#x} \(8 bytes\), "
                                       rf"{b.addr:#x} \(8 bytes\)|symbol 'in_value' is ambiguous: .* at "
                                       rf"{b.addr:#x} \(8 bytes\), {a.addr:#x} \(8 bytes\)"):
        elf.read_global(mem, "in_value")
    elf.write_global(mem, "in_array", 3)                # unique names still work
    assert elf.read_global(mem, "in_array") == 3
    again = GuestElf(write(tmp_path, _patch_symbol_name(globals_elf, "out_value", "in_value"), "again.elf"))
    with pytest.raises(ElfError, match="ambiguous"):    # also when the parse comes from the cache
        again.symbol("in_value")


def test_a_segment_whose_physical_address_is_not_its_virtual_one_is_refused(tmp_path, globals_elf):
    bad = bytearray(globals_elf)
    e_phoff, = struct.unpack_from("<Q", bad, 32)
    e_phentsize, = struct.unpack_from("<H", bad, 54)
    loads = [e_phoff + i * e_phentsize for i in range(struct.unpack_from("<H", bad, 56)[0])
             if struct.unpack_from("<I", bad, e_phoff + i * e_phentsize)[0] == 1]
    paddr, = struct.unpack_from("<Q", bad, loads[1] + 24)
    struct.pack_into("<Q", bad, loads[1] + 24, paddr + 0x100000)     # an AT() in the linker script
    with pytest.raises(ElfError, match=rf"segment at p_vaddr {paddr:#x} loads at p_paddr {paddr + 0x100000:#x}"):
        GuestElf(write(tmp_path, bytes(bad)))


@pytest.mark.parametrize("args,match", [
    (("in_value", 1, 16), r"offset 16 is outside 'in_value' \(8 bytes\)"),
    (("in_value", 1, -1), r"offset -1 is outside 'in_value'"),
    (("in_value", "abc"), r"value for 'in_value' must be an int or bytes \(a str, encode it first\)"),
    (("in_value", [300]), r"value for 'in_value' must be an int or bytes"),
    (("in_value", 1, 0.5), r"offset 0.5 is outside"),
])
def test_bad_write_global_arguments_are_elf_errors(tmp_path, globals_elf, args, match):
    elf = GuestElf(write(tmp_path, globals_elf))
    mem = FlatMemory(8 << 20)
    with pytest.raises(ElfError, match=match):
        elf.write_global(mem, *args)
    with pytest.raises(ElfError, match="must be ints"):
        elf.read_global(mem, "in_value", 0, 2.0)


def test_the_parse_cache_is_safe_across_threads(tmp_path, globals_elf, monkeypatch):
    import threading
    import time

    from kvmpy.guest import elf as elf_module

    class SlowEvictions(dict):
        """The cache, with a window between choosing the entry to evict and evicting it."""

        def pop(self, *args):
            time.sleep(0.002)
            return super().pop(*args)

    full = SlowEvictions((b"old%d" % i, None) for i in range(elf_module._PARSED_MAX))
    monkeypatch.setattr(elf_module, "_PARSED", full)
    paths = []
    for i in range(8):
        raw = bytearray(globals_elf)
        raw[9:13] = i.to_bytes(4, "little")            # EI_PAD: another key, the same program
        paths.append(write(tmp_path, bytes(raw), f"v{i}.elf"))
    errors = []
    go = threading.Barrier(len(paths))

    def load(path):
        go.wait()
        try:
            GuestElf(path)
        except Exception as e:      # noqa: BLE001 - collected for the assert
            errors.append(e)
    threads = [threading.Thread(target=load, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} errors, e.g. {type(errors[0]).__name__}: {str(errors[0])[:200]}"
    assert len(full) == elf_module._PARSED_MAX and all(p.read_bytes() in full for p in paths)


def _layout_fields(elf: GuestElf) -> tuple:
    return (elf.entry, [(s.paddr, s.vaddr, s.filesz, s.memsz, s.flags, s.data) for s in elf.segments],
            elf.symbols, elf._ambiguous)


@pytest.fixture
def layout_cache_dir(tmp_path, monkeypatch):
    """The guest-layout cache in a directory of its own, and the in-process parse cache empty."""
    from kvmpy.guest import elf as elf_module

    where = tmp_path / "layouts"
    monkeypatch.setenv("KVMPY_ELF_CACHE", str(where))
    monkeypatch.setattr(elf_module, "_PARSED", {})
    return where


def test_every_guest_program_loads_the_same_from_the_layout_cache(tmp_path, globals_elf, layout_cache_dir):
    from kvmpy.guest import elf as elf_module

    paths = sorted(programs.find("globals").parent.glob("*.elf"))
    fresh = {p.name: _layout_fields(GuestElf(p)) for p in paths}
    assert len(list(layout_cache_dir.glob("*.json"))) == len(paths)
    elf_module._PARSED.clear()
    read = []
    real_read = GuestElf._read_layout
    with pytest.MonkeyPatch.context() as m:
        m.setattr(GuestElf, "_read_layout", lambda self, raw: read.append(self.path) or real_read(self, raw))
        cached = {p.name: _layout_fields(GuestElf(p)) for p in paths}
    assert read == [], "a cached layout was read from the headers again"
    assert cached == fresh


def test_a_cached_layout_spares_the_pyelftools_import(tmp_path, globals_elf, layout_cache_dir):
    import subprocess
    import sys

    path = write(tmp_path, globals_elf)
    code = ("import sys; from kvmpy.guest.elf import GuestElf; e = GuestElf(sys.argv[1]); "
            "print(e.symbol('in_value').addr, 'elftools' in sys.modules)")
    env = {**__import__("os").environ, "KVMPY_ELF_CACHE": str(layout_cache_dir)}
    first, second = (subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True,
                                    text=True, check=True).stdout.split() for _ in range(2))
    assert first[1] == "True" and second == [first[0], "False"]


@pytest.mark.parametrize("damage", [
    b"", b"{not json", b'{"entry": 1}', b'{"entry": -1, "loads": [], "symtab": null, "strtab": null}',
    b'{"entry": 1, "loads": [[1, 2, 3]], "symtab": null, "strtab": null}',
    b'{"entry": 1, "loads": [], "symtab": [1, 2, 3], "strtab": null}',
    b'{"entry": true, "loads": [], "symtab": null, "strtab": null}',
])
def test_a_damaged_cache_entry_is_read_again_and_replaced(tmp_path, globals_elf, layout_cache_dir, damage):
    from kvmpy.guest import elf as elf_module

    path = write(tmp_path, globals_elf)
    want = _layout_fields(GuestElf(path))
    (entry,) = layout_cache_dir.glob("*.json")
    good = entry.read_bytes()
    entry.write_bytes(damage)
    elf_module._PARSED.clear()
    assert _layout_fields(GuestElf(path)) == want
    assert entry.read_bytes() == good


@pytest.mark.parametrize("field,value", [
    ("loads", []),                          # "no PT_LOAD segments"
    ("loads", [[0x400000, 0x400000, 0, 1 << 30, 1 << 30, 5]]),     # a segment past the end of the file
    ("symtab", [0, 24 * 1000, 8]),          # a wrong entry size
])
def test_a_cached_layout_that_does_not_fit_its_file_is_read_again_and_replaced(
        tmp_path, globals_elf, layout_cache_dir, field, value):
    import json

    from kvmpy.guest import elf as elf_module

    path = write(tmp_path, globals_elf)
    want = _layout_fields(GuestElf(path))
    (entry,) = layout_cache_dir.glob("*.json")
    good = entry.read_bytes()
    layout = json.loads(good)
    layout[field] = value                   # well-formed, but the checks on the file's bytes fail
    entry.write_text(json.dumps(layout))
    elf_module._PARSED.clear()
    assert _layout_fields(GuestElf(path)) == want
    assert entry.read_bytes() == good


def test_a_corrupt_elf_leaves_no_cache_entry_and_an_empty_setting_turns_the_cache_off(
        tmp_path, globals_elf, layout_cache_dir, monkeypatch):
    bad = bytearray(globals_elf)
    struct.pack_into("<H", bad, 62, 999)                # e_shstrndx
    with pytest.raises(ElfError):
        GuestElf(write(tmp_path, bytes(bad), "bad.elf"))
    assert not layout_cache_dir.exists() or not list(layout_cache_dir.iterdir())
    monkeypatch.setenv("KVMPY_ELF_CACHE", "")
    GuestElf(write(tmp_path, globals_elf))
    assert not layout_cache_dir.exists()


def test_an_unwritable_cache_is_no_error(tmp_path, globals_elf, monkeypatch):
    from kvmpy.guest import elf as elf_module

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KVMPY_ELF_CACHE", str(blocker / "cache"))    # below a file: mkdir fails
    monkeypatch.setattr(elf_module, "_PARSED", {})
    assert GuestElf(write(tmp_path, globals_elf)).symbol("in_value")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "g.elf"]


def test_the_cache_keeps_its_newest_entries(tmp_path, layout_cache_dir, monkeypatch):
    import os

    from kvmpy.guest import layout_cache

    monkeypatch.setattr(layout_cache, "MAX_ENTRIES", 3)
    for i in range(5):
        layout_cache.put(b"elf%d" % i, {"i": i})
        for p in layout_cache_dir.glob("*.json"):       # distinct mtimes, oldest first
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 1_000_000))
    assert [layout_cache.get(b"elf%d" % i) for i in range(5)] == [None, None, {"i": 2}, {"i": 3}, {"i": 4}]
    assert not list(layout_cache_dir.glob("*.tmp"))
