"""Debian's packaged kernels for the bed: fetched with apt, unpacked into the cache.

``apt-get download`` puts the newest kernel image package of a line (6.12 or
6.1) into the user cache directory and ``dpkg-deb -x`` unpacks it; nothing is
installed on the host.  When apt's lists are stale (a machine image's lists
know no 6.12 kernel, or name a file the mirror dropped at a point release),
they are refreshed once with ``apt-get update`` where this user may, and the
fetch is tried again.  Offline, the newest kernel of that line already in
the cache is used.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

from kvmpy.bed.initramfs import busybox
from kvmpy.bed.kernel import Kernel, cache_dir, find_modules_dirs
from kvmpy.bed.protocol import BedError

#: Kernel lines offered; 6.12 is the default because the upstream selftests
#: of that era need KVM_SET_USER_MEMORY_REGION2 (v6.8+).
KERNEL_LINES = ("6.12", "6.1")
DEFAULT_LINE = "6.12"

_TOOL_TIMEOUT = 900  # apt-get download of ~100 MB on a slow mirror


class AptError(BedError):
    """apt could not name or fetch a package: what refreshed lists may mend."""


def _run(cmd: Sequence[str], cwd: Optional[Path] = None, timeout: float = _TOOL_TIMEOUT) -> str:
    error = AptError if cmd[0] in ("apt-get", "apt-cache") else BedError
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise BedError(f"{cmd[0]} not found: {exc}") from None
    except subprocess.TimeoutExpired:
        raise error(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise error(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _version_key(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version))


def debian_package(line: str = DEFAULT_LINE) -> str:
    """The newest Debian kernel image package of ``line`` ("6.12" or "6.1")."""
    if line == "6.1":
        out = _run(["apt-cache", "depends", "linux-image-amd64"], timeout=60)
        m = re.search(r"Depends:\s*(linux-image-6\.1\.\S+-amd64)\b", out)
        if not m:
            raise AptError("apt-cache depends linux-image-amd64 names no 6.1 kernel; run apt-get update")
        return m.group(1)
    if line == "6.12":
        pattern = r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$"
        out = _run(["apt-cache", "search", "--names-only", pattern], timeout=60)
        names = [l.split(" ", 1)[0] for l in out.splitlines() if l.strip()]
        if not names:
            raise AptError(
                "no linux-image-6.12.N+debNN-amd64-unsigned package is known to apt; "
                "run apt-get update (bookworm-backports or the bookworm 6.12 line is needed)"
            )
        return max(names, key=_version_key)
    raise BedError(f"unknown kernel line {line!r}; choose one of {', '.join(KERNEL_LINES)}")


def fetch_debian(line: str = DEFAULT_LINE, cache: Optional[Path] = None,
                 log=lambda msg: None) -> Kernel:
    """Download and unpack the newest Debian kernel of ``line``; idempotent.

    If apt cannot name or download it, apt's lists are refreshed (once, where
    this user may) and it is tried again; failing that (or unpacking it), the
    newest kernel of that line already in the cache is used.
    """
    cache = cache or cache_dir()
    try:
        return _fetch_package(debian_package(line), cache, log)
    except BedError as exc:
        failure = exc
    if isinstance(failure, AptError) and refresh_apt_lists(log, why=str(failure)):
        try:
            return _fetch_package(debian_package(line), cache, log)
        except BedError as exc:
            failure = exc
    cached = _cached_packages(cache, line)
    if not cached:
        raise failure
    log(f"{failure}; using the cached {cached[-1]}")
    return _fetch_package(cached[-1], cache, log)


def refresh_apt_lists(log=lambda msg: None, why: str = "") -> bool:
    """``apt-get update`` as root, or through ``sudo -n``; True if the lists were refreshed.

    For a package apt could not name or fetch (``why``); False, with a note, when
    this user may not update or the update failed.
    """
    if os.geteuid() == 0:
        cmd = ["apt-get", "update", "-qq"]
    elif shutil.which("sudo"):
        cmd = ["sudo", "-n", "apt-get", "update", "-qq"]
    else:
        log(f"{why}; not root and no sudo, so apt's lists stay as they are (run apt-get update)")
        return False
    log(f"{why}; refreshing apt's lists: {' '.join(cmd)}")
    try:
        _run(cmd)
    except BedError as exc:
        log(f"{exc}; going on with the lists there are")
        return False
    return True


def _fetch_package(package: str, cache: Path, log) -> Kernel:
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
    mods = find_modules_dirs(root / "root")
    if len(mods) != 1:
        raise BedError(f"{package}: expected one lib/modules/<release>, found {len(mods)}")
    release = mods[0].name
    image = root / "root" / "boot" / f"vmlinuz-{release}"
    if not image.exists():
        raise BedError(f"{package} holds no boot/vmlinuz-{release}")
    return Kernel(release, image, mods[0], f"debian:{package}", root / "cache")


def _depmod(root: Path, release: str) -> None:
    _run([str(busybox()), "depmod", "-b", str(root), release], timeout=300)
