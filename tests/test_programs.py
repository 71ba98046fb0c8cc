"""Guest program lookup: automatic build into KVMPY_GUEST_BUILD_DIR (no /dev/kvm)."""
from __future__ import annotations

import shutil

import pytest

from kvmpy.guest import programs


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_find_builds_missing_program_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPY_GUEST_BUILD_DIR", str(tmp_path))
    elf = programs.find("hello")
    assert elf == tmp_path / "hello.elf" and elf.read_bytes()[:4] == b"\x7fELF"
    mtime = elf.stat().st_mtime_ns
    assert programs.find("hello") == elf
    assert elf.stat().st_mtime_ns == mtime  # up to date: not rebuilt
    elf.unlink()
    assert programs.find("hello").is_file()  # missing: rebuilt


def test_unknown_program_lists_available():
    with pytest.raises(programs.GuestProgramError, match="no guest program 'no_such_prog'.*available: .*hello"):
        programs.find("no_such_prog")


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unusable_build_dir_is_a_guest_program_error(tmp_path, monkeypatch, where):
    if programs.source_root() is None:
        pytest.skip("needs the guest sources")
    if where == "file":
        (tmp_path / "f").write_text("")
        target = tmp_path / "f" / "guests"          # a file where a directory is expected
    else:
        target = "/proc/kvmpy_guests"                # cannot be created, even by root
    monkeypatch.setenv("KVMPY_GUEST_BUILD_DIR", str(target))
    with pytest.raises(programs.GuestProgramError, match=r"cannot build guest programs into .*guests"):
        programs.find("hello")
