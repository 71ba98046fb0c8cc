"""Kernels for the test bed: a bootable image and its KVM modules.

A :class:`Kernel` is a bzImage plus its ``lib/modules/<release>`` tree (with a
``modules.dep``, or read through each module's .modinfo).  Debian's packaged
kernels are fetched by :mod:`kvmpy.bed.debian`; one the user built is adopted
by :func:`user_kernel`, which refuses, before anything boots, an image that is
no bzImage and modules of another release; :func:`require_kvm` refuses a
kernel without KVM for the bed's CPU vendor.  Modules are decompressed on
demand because busybox insmod only loads plain ``.ko`` files.
"""

from __future__ import annotations

import dataclasses
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

from kvmpy.bed.protocol import BedError

_MODULE_SUFFIXES = (".ko.xz", ".ko.gz", ".ko.zst", ".ko")


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

    def module_path(self, name: str) -> Optional[str]:
        """The relative path of module ``name`` in the tree, or None."""
        key = name.replace("-", "_")
        for path in parse_modules_dep(self.modules_dep([key])):
            if module_name(path) == key:
                return path
        return None

    def has_module(self, name: str) -> bool:
        """Whether ``name`` is a module of the tree or built into the kernel."""
        key = name.replace("-", "_")
        return self.module_path(key) is not None or key in {module_name(p) for p in self.builtin()}

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


def find_modules_dirs(root: Path) -> List[Path]:
    found = []
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if base.is_dir():
            found += [p for p in sorted(base.iterdir()) if p.is_dir()]
    return found


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


def check_image(image: Path) -> None:
    """Raise BedError unless ``image`` is a bzImage (an x86 boot header, not an ELF vmlinux)."""
    with open(image, "rb") as f:
        head = f.read(0x210)
    if head[:4] == b"\x7fELF":
        raise BedError(f"--kernel {image} is an ELF vmlinux, which the bed cannot boot: "
                       "use arch/x86/boot/bzImage")
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise BedError(f"--kernel {image} is not a bzImage (no x86 boot header): "
                       "use arch/x86/boot/bzImage")


_VERMAGIC_RE = re.compile(rb"(?:^|\0)vermagic=([^\0 ]+)")


def modules_release(kernel: "Kernel") -> Optional[str]:
    """The release the tree's modules were built for (kvm's vermagic, else any module's), or None."""
    paths = [kernel.module_path(name) for name in ("kvm", "kvm_amd", "kvm_intel")]
    paths += list(parse_modules_dep(kernel.modules_dep()))  # KVM built in: any module will do
    rel = next((p for p in paths if p is not None), None)
    if rel is None:
        return None
    m = _VERMAGIC_RE.search(_decompress(kernel.modules_dir / rel))
    return m.group(1).decode(errors="replace") if m else None


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
    check_image(image)
    release = image_release(image)
    if (modules / "modules.order").exists() or (modules / "modules.dep").exists() or (
        modules / "kernel"
    ).is_dir():
        mod_dir = modules
    else:
        candidates = find_modules_dirs(modules)
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
    kernel = Kernel(release, image, mod_dir, f"user:{image}", kcache)
    # What the kernel checks when loading a module is its vermagic, not a name.
    built_for = modules_release(kernel)
    if built_for is not None and built_for != release:
        raise BedError(f"--kernel {image} is release {release}, but the modules in {mod_dir} were "
                       f"built for {built_for}: they would not load; pass the modules of this build")
    return kernel


#: CPU vendor -> its KVM module and the kernel option that builds it.
VENDOR_MODULES = {"amd": ("kvm_amd", "CONFIG_KVM_AMD"), "intel": ("kvm_intel", "CONFIG_KVM_INTEL")}


def require_kvm(kernel: Kernel, vendor: str) -> None:
    """Raise BedError unless ``kernel`` has kvm and ``vendor``'s module, loadable or built in.

    Without them every selftest in the bed would skip ("no /dev/kvm"): that
    is a wrong kernel, to be named before booting, not a run.
    """
    if vendor not in VENDOR_MODULES:
        raise BedError(f"no KVM module for CPU vendor {vendor!r}")
    for name, option in (("kvm", "CONFIG_KVM"), VENDOR_MODULES[vendor]):
        if not kernel.has_module(name):
            raise BedError(
                f"kernel {kernel.release} ({kernel.origin}) has no {name.replace('_', '-')}.ko in "
                f"{kernel.modules_dir} and does not have {name} built in (modules.builtin): "
                f"build it with {option}=m or =y")
