"""build_guest.sh: output, incremental rebuilds, missing compiler (no /dev/kvm)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kvmpy.guest.elf import GuestElf

ROOT = Path(__file__).resolve().parents[1]
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")


@pytest.fixture
def tree(tmp_path):
    """A private copy of the script and guest sources, so tests can touch files."""
    shutil.copy2(ROOT / "build_guest.sh", tmp_path)
    shutil.copytree(ROOT / "guests", tmp_path / "guests")
    return tmp_path


def build(tree, *args, env=None):
    return subprocess.run(["bash", str(tree / "build_guest.sh"), *args], cwd=tree, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def bump(path: Path) -> None:
    t = time.time() + 5
    os.utime(path, (t, t))


@needs_gcc
def test_builds_all_then_only_what_changed(tree):
    out = tree / "out"
    r = build(tree, str(out))
    assert r.returncode == 0, r.stderr
    names = sorted(p.stem for p in (tree / "guests").glob("*.c"))
    assert sorted(p.stem for p in out.glob("*.elf")) == names
    assert GuestElf(out / "hello.elf").symbol("guest_main")
    assert "0 program(s) linked" in build(tree, str(out)).stdout

    bump(tree / "guests" / "hello.c")
    r = build(tree, str(out))
    assert "1 program(s) linked" in r.stdout and "guests/hello.c" in r.stdout and "runtime.c" not in r.stdout

    bump(tree / "guests" / "lib" / "guest.h")  # runtime change: everything relinks
    assert f"{len(names)} program(s) linked" in build(tree, str(out)).stdout


@needs_gcc
def test_build_dir_from_environment_and_program_list(tree):
    out = tree / "envout"
    r = build(tree, env={"KVMPY_GUEST_BUILD_DIR": str(out)})
    assert r.returncode == 0 and (out / "hello.elf").is_file()
    r = build(tree, str(tree / "one"), "globals")
    assert sorted(p.name for p in (tree / "one").glob("*.elf")) == ["globals.elf"]
    r = build(tree, str(tree / "one"), "nosuch")
    assert r.returncode != 0 and "no guest program guests/nosuch.c" in r.stderr


def test_missing_compiler_names_the_package(tree):
    r = build(tree, str(tree / "out"), env={"CC": "no-such-gcc-kvmpy"})
    assert r.returncode == 1
    assert "install the Debian package 'gcc'" in r.stderr
    assert not list(tree.glob("out/*.elf"))


@needs_gcc
def test_compile_error_fails_the_build(tree):
    (tree / "guests" / "broken.c").write_text("void guest_main(void) { this is not C }\n")
    r = build(tree, str(tree / "out"))
    assert r.returncode != 0 and "broken.c" in r.stderr
