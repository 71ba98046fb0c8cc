"""Kernels for the test bed: Debian's packaged ones, or one the user built.

A :class:`Kernel` is a bootable image plus its ``lib/modules/<release>`` tree
with a ``modules.dep``.  Debian kernels are fetched with ``apt-get download``
into the user cache directory and unpacked with ``dpkg-deb -x``; nothing is
installed on the host.  Modules are decompressed on demand because busybox
insmod only loads plain ``.ko`` files.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from kvmpy.bed.backend import BedError

#: Kernel lines offered; 6.12 is the default because the upstream selftests
#: of that era need KVM_SET_USER_MEMORY_REGION2 (v6.8+).
KERNEL_LINES = ("6.12", "6.1")
DEFAULT_LINE = "6.12"

_MODULE_SUFFIXES = (".ko.xz", ".ko.gz", ".ko.zst", ".ko")
_TOOL_TIMEOUT = 900  # apt-get download of ~100 MB on a slow mirror


def cache_dir() -> Path:
    """The bed's cache root: $KVMPY_BED_CACHE, else $XDG_CACHE_HOME/kvmpy/bed."""
    env = os.environ.get("KVMPY_BED_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvmpy" / "bed"


def module_name(path: str) -> str:
    """The module name of a module file path: ``kernel/x/kvm-amd.ko.xz`` -> ``kvm_amd``."""
    base = os.path.basename(path)
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> Dict[str, List[str]]:
    """Parse modules.dep into {module path: [dependency paths]}."""
    deps: Dict[str, List[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def module_closure(
    modules_dep: str, wanted: Iterable[str], builtin: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> List[str]:
    """Module paths to insmod, dependencies first, for the ``wanted`` modules.

    ``builtin`` names modules compiled into the kernel (modules.builtin);
    those are skipped.  Raises BedError naming a module that is neither,
    unless it is also named in ``optional``.
    """
    optional_names = {name.replace("-", "_") for name in optional}
    deps = parse_modules_dep(modules_dep)
    by_name = {module_name(p): p for p in deps}
    builtin_names = {module_name(p) for p in builtin}
    order: List[str] = []
    seen = set()

    def visit(path: str, chain: Sequence[str]) -> None:
        if path in seen:
            return
        if path in chain:  # modules.dep cannot have cycles; guard anyway
            raise BedError(f"dependency cycle in modules.dep: {' -> '.join(chain)}")
        for dep in deps.get(path, []):
            visit(dep, [*chain, path])
        seen.add(path)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key], [])
        elif key not in builtin_names and key not in optional_names:
            raise BedError(
                f"module {name} is neither in modules.dep nor in modules.builtin "
                f"(is it enabled in the kernel config?)"
            )
    return order


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A bootable kernel image and its module tree."""

    release: str  # `uname -r` inside, and the lib/modules directory name
    image: Path
    modules_dir: Path  # .../lib/modules/<release>
    origin: str  # "debian:<package>" or "user:<image path>"
    cache: Path  # per-kernel writable cache (decompressed modules, initramfs)

    def modules_dep(self, wanted: Iterable[str] = ()) -> str:
        """modules.dep, or (tree without one) its lines for ``wanted`` from .modinfo."""
        path = self.modules_dir / "modules.dep"
        if path.exists():
            return path.read_text()
        return modinfo_dep(self.modules_dir, wanted)

    def builtin(self) -> List[str]:
        path = self.modules_dir / "modules.builtin"
        return path.read_text().split() if path.exists() else []

    def closure(self, wanted: Iterable[str], optional: Iterable[str] = ()) -> List[str]:
        """Relative module paths to load for ``wanted``, dependencies first."""
        wanted = list(wanted)
        return module_closure(self.modules_dep(wanted), wanted, self.builtin(), optional)

    def plain_module(self, relpath: str) -> Path:
        """A decompressed copy of module ``relpath`` (cached)."""
        src = self.modules_dir / relpath
        plain_rel = relpath
        for suffix in (".xz", ".gz", ".zst"):
            if plain_rel.endswith(suffix):
                plain_rel = plain_rel[: -len(suffix)]
        if plain_rel == relpath:
            return src
        dst = self.cache / "ko" / plain_rel
        # The copy carries its source's mtime: a rebuilt module is seen as new.
        src_mtime = src.stat().st_mtime_ns
        if not dst.exists() or dst.stat().st_mtime_ns != src_mtime:
            dst.parent.mkdir(parents=True, exist_ok=True)
            # A private temporary name: several beds may start at once.
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name + ".")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_decompress(src))
                os.utime(tmp, ns=(src_mtime, src_mtime))
                os.replace(tmp, dst)
            except BaseException:
                os.unlink(tmp)
                raise
        return dst


_DEPENDS_RE = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


def modinfo_dep(modules_dir: Path, wanted: Iterable[str]) -> str:
    """modules.dep lines for ``wanted`` and their dependencies, from .modinfo.

    For a module tree installed without depmod: each module's ``depends=``
    entry names its direct dependencies.
    """
    by_name: Dict[str, str] = {}
    for path in sorted(modules_dir.rglob("*.ko*")):
        rel = path.relative_to(modules_dir).as_posix()
        if rel.endswith(_MODULE_SUFFIXES):
            by_name.setdefault(module_name(rel), rel)
    lines: Dict[str, List[str]] = {}
    todo = [name.replace("-", "_") for name in wanted]
    while todo:
        name = todo.pop()
        rel = by_name.get(name)
        if rel is None or rel in lines:
            continue
        m = _DEPENDS_RE.search(_decompress(modules_dir / rel))
        deps = [d.replace("-", "_") for d in (m.group(1).decode().split(",") if m else []) if d]
        lines[rel] = [by_name[d] for d in deps if d in by_name]
        todo += deps
    return "".join(f"{rel}: {' '.join(deps)}\n" for rel, deps in lines.items())


def _decompress(path: Path) -> bytes:
    raw = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(raw)
    if name.endswith(".gz"):
        return gzip.decompress(raw)
    if name.endswith(".zst"):
        tool = shutil.which("zstd")
        if not tool:
            raise BedError(f"{path} is zstd-compressed: apt-get install zstd")
        return subprocess.run(
            [tool, "-dc", str(path)], check=True, capture_output=True, timeout=60
        ).stdout
    return raw


def _run(cmd: Sequence[str], cwd: Optional[Path] = None, timeout: float = _TOOL_TIMEOUT) -> str:
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise BedError(f"{cmd[0]} not found: {exc}") from None
    except subprocess.TimeoutExpired:
        raise BedError(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise BedError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def busybox() -> Path:
    """The static busybox binary (it goes into the initramfs, so it must be static)."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and _is_static(path):
            return path
    raise BedError("a static busybox is needed: apt-get install busybox-static")


def _is_static(path: Path) -> bool:
    # A dynamically linked ELF has a PT_INTERP program header; its path string
    # "/lib64/ld-linux" appears early in the file.  Cheap and good enough here.
    with open(path, "rb") as f:
        head = f.read(4096)
    return head[:4] == b"\x7fELF" and b"ld-linux" not in head


def _version_key(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version))


def debian_package(line: str = DEFAULT_LINE) -> str:
    """The newest Debian kernel image package of ``line`` ("6.12" or "6.1")."""
    if line == "6.1":
        out = _run(["apt-cache", "depends", "linux-image-amd64"], timeout=60)
        m = re.search(r"Depends:\s*(linux-image-6\.1\.\S+-amd64)\b", out)
        if not m:
            raise BedError("apt-cache depends linux-image-amd64 names no 6.1 kernel; run apt-get update")
        return m.group(1)
    if line == "6.12":
        pattern = r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$"
        out = _run(["apt-cache", "search", "--names-only", pattern], timeout=60)
        names = [l.split(" ", 1)[0] for l in out.splitlines() if l.strip()]
        if not names:
            raise BedError(
                "no linux-image-6.12.N+debNN-amd64-unsigned package is known to apt; "
                "run apt-get update (bookworm-backports or the bookworm 6.12 line is needed)"
            )
        return max(names, key=_version_key)
    raise BedError(f"unknown kernel line {line!r}; choose one of {', '.join(KERNEL_LINES)}")


def fetch_debian(line: str = DEFAULT_LINE, cache: Optional[Path] = None,
                 log=lambda msg: None) -> Kernel:
    """Download and unpack the newest Debian kernel of ``line``; idempotent.

    Without apt metadata (offline, lists cleaned) the newest kernel of that
    line already in the cache is used.
    """
    cache = cache or cache_dir()
    try:
        package = debian_package(line)
    except BedError as exc:
        cached = _cached_packages(cache, line)
        if not cached:
            raise
        package = cached[-1]
        log(f"{exc}; using the cached {package}")
    root = cache / "kernels" / package
    root.parent.mkdir(parents=True, exist_ok=True)
    # Several beds may set up at once: one fetches, the others wait for it.
    with open(root.parent / f"{package}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _fetch_locked(root, package, log)
    return _debian_kernel(root, package)


def _fetch_locked(root: Path, package: str, log) -> None:
    stamp = root / ".complete"
    if not stamp.exists():
        for tool, pkg in (("apt-get", "apt"), ("dpkg-deb", "dpkg")):
            if not shutil.which(tool):
                raise BedError(f"{tool} not found: apt-get install {pkg}")
        log(f"fetching {package} (about 100 MB) ...")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="kvmpy-bed-deb-", dir=root) as tmp:
            _run(["apt-get", "download", package], cwd=Path(tmp))
            debs = list(Path(tmp).glob("*.deb"))
            if len(debs) != 1:
                raise BedError(f"apt-get download {package} left {len(debs)} .deb files")
            _run(["dpkg-deb", "-x", str(debs[0]), str(root / "root")], timeout=300)
        kernel = _debian_kernel(root, package)
        if not (kernel.modules_dir / "modules.dep").exists():
            _depmod(root / "root", kernel.release)
        stamp.write_text(package + "\n")


def _cached_packages(cache: Path, line: str) -> List[str]:
    """Fully unpacked kernels of ``line`` in the cache, oldest first."""
    prefix = f"linux-image-{line}."
    found = [p.name for p in (cache / "kernels").glob(prefix + "*") if (p / ".complete").exists()]
    return sorted(found, key=_version_key)


def _debian_kernel(root: Path, package: str) -> Kernel:
    mods = _find_modules_dirs(root / "root")
    if len(mods) != 1:
        raise BedError(f"{package}: expected one lib/modules/<release>, found {len(mods)}")
    release = mods[0].name
    image = root / "root" / "boot" / f"vmlinuz-{release}"
    if not image.exists():
        raise BedError(f"{package} holds no boot/vmlinuz-{release}")
    return Kernel(release, image, mods[0], f"debian:{package}", root / "cache")


def _find_modules_dirs(root: Path) -> List[Path]:
    found = []
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if base.is_dir():
            found += [p for p in sorted(base.iterdir()) if p.is_dir()]
    return found


def _depmod(root: Path, release: str) -> None:
    _run([str(busybox()), "depmod", "-b", str(root), release], timeout=300)


def image_release(image: Path) -> Optional[str]:
    """The release string embedded in a bzImage (setup header ``kernel_version``)."""
    with open(image, "rb") as f:
        head = f.read(0x10000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    ptr = int.from_bytes(head[0x20E:0x210], "little")
    if not ptr:
        return None
    start = ptr + 0x200
    text = head[start:start + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    return text.split(" ", 1)[0] or None


def user_kernel(image: Path, modules: Path, cache: Optional[Path] = None) -> Kernel:
    """Adopt a kernel the user built (``--kernel bzImage --modules DIR``).

    ``modules`` is an ``INSTALL_MOD_PATH`` root (holding lib/modules/<release>)
    or the ``lib/modules/<release>`` directory itself.  A tree without
    modules.dep is read through each module's .modinfo instead.
    """
    image = Path(image).resolve()
    modules = Path(modules).resolve()
    if not image.is_file():
        raise BedError(f"--kernel {image}: no such file")
    if not modules.is_dir():
        raise BedError(f"--modules {modules}: no such directory")
    release = image_release(image)
    if (modules / "modules.order").exists() or (modules / "modules.dep").exists() or (
        modules / "kernel"
    ).is_dir():
        mod_dir = modules
    else:
        candidates = _find_modules_dirs(modules)
        if release:
            candidates = [c for c in candidates if c.name == release] or candidates
        if len(candidates) != 1:
            raise BedError(
                f"--modules {modules}: expected one lib/modules/<release> inside, "
                f"found {[c.name for c in candidates]}"
            )
        mod_dir = candidates[0]
    # A lib/modules/<release> directory names the release; trust the image's
    # header over a directory the user may have renamed.
    release = release or mod_dir.name
    digest = hashlib.sha256(str(image).encode()).hexdigest()[:12]
    key = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{release}-{digest}")
    kcache = (cache or cache_dir()) / "user" / key
    return Kernel(release, image, mod_dir, f"user:{image}", kcache)
