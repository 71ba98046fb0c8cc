"""Carry host files into a machine that cannot share the host's ``/``.

Bochs has no virtio, so a command in its bed cannot reach the host's files
over 9p the way QEMU's can.  This module lays out a *staging directory* whose
files sit at the same paths as on the host, so that the command runs exactly
as it would there: the Python interpreter (its shared libraries, its standard
library without tests and GUI toolkits), the site-packages kvmpy needs, and
source trees such as the kvmpy checkout.  A backend then packs the directory
into its boot medium (an initramfs or a disk image).

The Python part is cached (see :func:`python_stage`): building it copies and
strips a few hundred files, and it only changes when the interpreter or the
packages do.
"""

from __future__ import annotations

import compileall
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Set

from kvmpy.bed.protocol import BedError

#: Import names of what kvmpy and its test suites import at run time.
PACKAGES = ("cffi", "_cffi_backend", "pycparser", "elftools", "pytest", "_pytest", "py",
            "pluggy", "iniconfig", "packaging", "psutil", "pygments")

#: Standard-library entries that no bed command needs (relative to the
#: stdlib directory).  lib-dynload entries are name prefixes of extension
#: modules: they pull in OpenSSL, Tk, ncurses, SQLite, ... (megabytes each).
STDLIB_PRUNE = (
    "test", "idlelib", "tkinter", "turtledemo", "turtle.py", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "sqlite3", "venv", "dbm", "curses", "msilib", "xmlrpc", "wsgiref",
    "site-packages", "dist-packages",
)
DYNLOAD_PRUNE = (
    "_tkinter", "_ssl", "_hashlib", "_sqlite3", "readline", "_curses", "nis", "_dbm", "_gdbm",
    "_crypt", "spwd", "ossaudiodev", "xxlimited", "_test", "_ctypes_test", "_xxtestfuzz",
    "xxsubtype", "_xxsubinterpreters",
)
#: Never carried from a source tree.
TREE_EXCLUDE = (".git", ".venv", "__pycache__", ".pytest_cache", "results", "build", "dist",
                "*.egg-info", "*.o")

_STRIP_TIMEOUT = 120


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def shared_libraries(paths: Iterable[Path]) -> Set[Path]:
    """Absolute paths of the shared libraries the ELF files ``paths`` load (ldd)."""
    libs: Set[Path] = set()
    for path in paths:
        try:
            out = subprocess.run(["ldd", str(path)], capture_output=True, text=True,
                                 timeout=60).stdout
        except FileNotFoundError:
            raise BedError("ldd not found: apt-get install libc-bin") from None
        for line in out.splitlines():
            m = re.search(r"(/\S+) \(0x[0-9a-f]+\)", line)
            if m:
                libs.add(Path(m.group(1)))
    return libs


class Stage:
    """A staging directory that mirrors host paths (``/a/b`` -> ``root/a/b``)."""

    def __init__(self, root: Path, strip: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.strip = strip and shutil.which("strip") is not None
        self.elves: List[Path] = []  # host paths of carried ELF files (for ldd)

    def inside(self, host_path: Path) -> Path:
        return self.root / str(host_path).lstrip("/")

    def add_file(self, src: Path, dest: Optional[Path] = None) -> None:
        """Copy host file ``src`` to ``dest`` (default: the same path), mtime kept.

        Symlinks along ``src`` itself are recreated, so ``python3 -> python3.11``
        stays a link.  ELF files are stripped of debug information.
        """
        src = Path(src)
        dest = Path(dest or src)
        out = self.inside(dest)
        if os.path.lexists(out):
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink() and dest == src:
            target = os.readlink(src)
            os.symlink(target, out)
            self.add_file(Path(os.path.normpath(src.parent / target)))
            return
        if _is_elf(src):
            self.elves.append(src)
            if self.strip and subprocess.run(
                ["strip", "--strip-unneeded", "-o", str(out), str(src)],
                capture_output=True, timeout=_STRIP_TIMEOUT,
            ).returncode == 0:
                shutil.copystat(src, out)
                return
        shutil.copy2(src, out)

    def add_tree(self, src: Path, exclude: Sequence[str] = (), keep=lambda rel: True) -> None:
        """Copy host directory ``src`` to the same path.

        ``exclude`` holds glob patterns matched against each entry name;
        ``keep(relative path)`` can refuse files, and directories (asked
        with a trailing ``/``) with everything under them.
        """
        import fnmatch

        src = Path(src)
        for dirpath, dirnames, filenames in os.walk(src):
            base = Path(dirpath)
            dirnames[:] = [d for d in dirnames
                           if not any(fnmatch.fnmatch(d, pat) for pat in exclude)
                           and keep((base / d).relative_to(src).as_posix() + "/")]
            for name in filenames:
                if any(fnmatch.fnmatch(name, pat) for pat in exclude):
                    continue
                path = base / name
                if keep(path.relative_to(src).as_posix()):
                    self.add_file(path)
            for name in dirnames:
                path = base / name
                if path.is_symlink():
                    self.add_file(path)
                else:
                    self.inside(path).mkdir(parents=True, exist_ok=True)

    def add_libraries(self) -> None:
        """Carry the shared libraries (and the dynamic loader) of every ELF added."""
        for lib in sorted(shared_libraries(self.elves)):
            self.add_file(lib)
            if lib.is_symlink():
                self.add_file(lib.resolve())

    def compile(self, host_dir: Path) -> None:
        """Byte-compile the staged copy of ``host_dir`` so the bed need not.

        The .pyc files record the staged sources' mtimes, which are the host's.
        """
        compileall.compile_dir(str(self.inside(host_dir)), quiet=2, workers=1,
                               ddir=str(host_dir))


def _cache_keep(wanted: Callable[[str], bool]):
    """A ``keep`` for :meth:`Stage.add_tree`: everything but the files of ``__pycache__``
    whose names ``wanted`` refuses."""

    def keep(rel: str) -> bool:
        if rel.endswith("/"):
            return True
        parts = rel.split("/")
        return "__pycache__" not in parts[:-1] or wanted(parts[-1])
    return keep


def _pycache_keep(tag: str):
    # Only this interpreter's plain .pyc (not .opt-1/.opt-2, not other versions).
    suffix = f".{tag}.pyc"
    return _cache_keep(lambda name: name.endswith(suffix))


def _stdlib_keep(tag: str):
    pyc = _pycache_keep(tag)

    def keep(rel: str) -> bool:
        top = rel.split("/", 1)[0]
        if top in STDLIB_PRUNE:
            return False
        if rel.startswith("lib-dynload/") and rel.split("/")[1].startswith(DYNLOAD_PRUNE):
            return False
        if top.startswith("config-"):  # static libpython and Makefile for extension builds
            return False
        return pyc(rel)
    return keep


def _package_paths(names: Sequence[str]) -> List[Path]:
    """Host paths of the packages/modules ``names`` and their .dist-info dirs."""
    paths: List[Path] = []
    dists = importlib.metadata.packages_distributions()
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
            continue
        origin = Path(spec.origin)
        paths.append(origin.parent if spec.submodule_search_locations else origin)
        for dist_name in dists.get(name, []):
            try:
                dist = importlib.metadata.distribution(dist_name)
            except importlib.metadata.PackageNotFoundError:
                continue
            for f in dist.files or []:
                if f.parts and f.parts[0].endswith(".dist-info"):
                    paths.append(Path(dist.locate_file(f.parts[0])))
                    break
    return sorted(set(paths))


def python_identity(executable: str = sys.executable, packages: Sequence[str] = PACKAGES) -> dict:
    """What the staged Python depends on (the cache key of :func:`python_stage`)."""
    real = Path(executable).resolve()
    found = _package_paths(packages)
    return {
        "executable": executable,
        "real": str(real),
        "mtime": real.stat().st_mtime_ns,
        "prefix": sys.prefix,
        "packages": [(str(p), p.stat().st_mtime_ns) for p in found],
        "strip": shutil.which("strip") is not None,
        "version": 2,  # bump when stage_python changes what it carries (2: no distutils-precedence.pth)
    }


def stage_python(stage: Stage, executable: str = sys.executable,
                 packages: Sequence[str] = PACKAGES) -> None:
    """Carry this interpreter, its pruned stdlib, ``packages`` and their libraries.

    Must run in the interpreter being carried (it asks it where things are).
    """
    tag = sys.implementation.cache_tag
    stage.add_file(Path(executable))
    stage.add_file(Path(executable).resolve())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    stage.add_tree(stdlib, keep=_stdlib_keep(tag))
    if sys.prefix != sys.base_prefix:  # a virtualenv: its config and site-packages hooks
        stage.add_file(Path(sys.prefix) / "pyvenv.cfg")
    keep = _pycache_keep(tag)
    for path in _package_paths(packages):
        if path.is_dir():
            stage.add_tree(path, exclude=("tests", "testing"), keep=keep)
        else:
            stage.add_file(path)
    # Editable installs (kvmpy's own) work through .pth files and finders.
    for site_dir in {Path(p) for p in sys.path if p.endswith("-packages")}:
        if site_dir.is_dir():
            for entry in site_dir.iterdir():
                # (setuptools' distutils-precedence.pth needs setuptools: not carried)
                if entry.name == "distutils-precedence.pth":
                    continue
                if entry.suffix == ".pth" or entry.name.startswith("__editable__"):
                    if entry.is_file():
                        stage.add_file(entry)
    stage.add_libraries()


def python_stage(cache: Path, executable: str = sys.executable,
                 packages: Sequence[str] = PACKAGES, log=lambda msg: None) -> Path:
    """The cached staging directory of this Python (built on first use)."""
    ident = python_identity(executable, packages)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache) / f"python-{key}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"python-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several beds may start at once
        stamp = root.parent / f"python-{key}.complete"
        if not stamp.exists():
            log(f"staging Python {sys.version.split()[0]} for the bed ...")
            tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
            try:
                stage_python(Stage(tmp / "root"), executable, packages)
                shutil.rmtree(root, ignore_errors=True)  # a half-built one
                (tmp / "root").rename(root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            stamp.write_text(json.dumps(ident, indent=1) + "\n")
    return root


def _rewritten_keep(tag: str):
    # Of __pycache__, only pytest's rewritten modules (``a.cpython-311-pytest-9.2.0.pyc``):
    # the bed would rewrite them at each boot, and pytest checks them by source hash, so a
    # copy is as good as the host's. Plain .pyc files are compiled for the stage instead.
    rewritten = f".{tag}-pytest-"
    return _cache_keep(lambda name: rewritten in name and name.endswith(".pyc"))


def stage_tree(stage: Stage, src: Path, exclude: Sequence[str] = TREE_EXCLUDE) -> None:
    """Carry a source tree (e.g. the kvmpy checkout) and byte-compile it; pytest's
    rewritten test modules found in it (see :mod:`kvmpy.selftest.bytecode`) come along."""
    stage.add_tree(Path(src), exclude=[p for p in exclude if p != "__pycache__"],
                   keep=_rewritten_keep(sys.implementation.cache_tag))
    stage.compile(Path(src))


def stage_guests(stage: Stage, build_dir: Optional[Path] = None) -> None:
    """Carry the built guest programs (``build/`` is excluded from trees), unstripped.

    The runner loads them by symbol (exc_stub_table, globals), which
    --strip-unneeded removes; their mtimes are kept, so the bed, which has no
    compiler, sees them as up to date with the carried sources.
    """
    if build_dir is None:
        from kvmpy.guest import programs

        build_dir = programs.build_dir()
    if not Path(build_dir).is_dir():
        return
    strip, stage.strip = stage.strip, False
    try:
        stage.add_tree(Path(build_dir), exclude=("*.o", "*.tmp", ".lock", "lib"))
    finally:
        stage.strip = strip


def tree_size(root: Path) -> int:
    """Bytes of regular files under ``root`` (for messages and measurements)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total
