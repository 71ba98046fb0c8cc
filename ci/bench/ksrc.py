"""The kernel's C KVM selftests, built for the side-by-side benchmark.

From Debian's ``linux-source-X.Y`` package (fetched with ``apt-get download``) or
a kernel tree you give: unpack what the KVM selftests need into the cache
(``~/.cache/kvmpy/bench``), install the uapi headers there (``make headers``
with a build directory, so a given tree is left as it is), build
``dirty_log_perf_test`` with the selftests' own Makefile, and build the C
peers (peer.c, next to this file) with the exact compile and link commands
that Makefile uses for its tests, linked with its kvm_util library.

Every step leaves a stamp; a repeated run reuses what is there.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kvmpy.bed.debian import refresh_apt_lists

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvmpy" / "bench"
HERE = Path(__file__).resolve().parent
PEER_SRC = HERE / "peer.c"

# What the KVM selftests and `make headers` need from a kernel source tarball
# (measured: about 100 MB of the 1.5 GB tree; `make headers` runs in half a minute).
TREE_PARTS = ("Makefile", "Kbuild", "scripts", "tools", "include/uapi", "arch/x86/Makefile", "arch/x86/Kbuild",
              "arch/x86/include/uapi", "arch/x86/include/asm", "arch/x86/entry/syscalls", "arch/x86/tools")
KVM_SELFTESTS = "tools/testing/selftests/kvm"


class BuildError(RuntimeError):
    """A step of fetching or building the C selftests failed; the message says which and why."""


@dataclass(frozen=True)
class CSelftests:
    """The built C side: the kernel version, ``dirty_log_perf_test`` and the peer binary."""

    version: str
    perf_test: Path
    peer: Path


def log(msg: str) -> None:
    print(f"[ksrc] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str, cwd: Path | None = None, capture: bool = False) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise BuildError(f"{what}: cannot run {cmd[0]}: {e.strerror}") from None
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-25:])
        raise BuildError(f"{what} failed (exit {p.returncode}): {shlex.join(cmd)}\n{tail}")
    return p.stdout if capture else ""


def fetch_deb(package: str, cache: Path = CACHE) -> Path:
    """The .deb of ``package`` in the cache, downloaded with ``apt-get download`` when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    log(f"apt-get download {package} (into {cache})")
    what = f"downloading {package} (is it in your apt sources? `apt-cache policy {package}`)"
    try:
        _run(["apt-get", "download", package], what, cwd=cache)
    except BuildError as e:
        # A machine image's stale lists may not know the package (or its current file).
        if not refresh_apt_lists(log, why=str(e).splitlines()[0]):
            raise
        _run(["apt-get", "download", package], what, cwd=cache)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        raise BuildError(f"apt-get download {package} left no {package}_*.deb in {cache}")
    return found[-1]


def unpack_deb(deb: Path, cache: Path = CACHE) -> Path:
    """The kernel tree of a linux-source .deb, partly unpacked (TREE_PARTS) into the cache."""
    version = deb.name.split("_")[1].split("-")[0]
    tree = cache / f"linux-{version}"
    stamp = tree / ".kvmpy-unpacked"
    if stamp.exists():
        return tree
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    log(f"unpacking {deb.name} ({', '.join(TREE_PARTS)}) into {tree}")
    listing = _run(["dpkg-deb", "--contents", deb.as_posix()], f"reading {deb}", capture=True)
    tarball = next((line.split()[-1] for line in listing.splitlines() if line.rstrip().endswith(".tar.xz")), None)
    if tarball is None:
        raise BuildError(f"{deb} holds no linux-source tarball (.tar.xz)")
    top = Path(tarball).name[: -len(".tar.xz")]
    script = (f"dpkg-deb --fsys-tarfile {shlex.quote(deb.as_posix())} | tar -xO {shlex.quote(tarball)} | "
              f"tar -xJ --strip-components=1 -C {shlex.quote(tree.as_posix())} "
              + " ".join(shlex.quote(f"{top}/{p}") for p in TREE_PARTS))
    _run(["bash", "-c", "set -o pipefail; " + script], f"unpacking {deb}")
    stamp.write_text(deb.name + "\n")
    return tree


def kernel_version(tree: Path) -> str:
    vals = {}
    for line in (tree / "Makefile").read_text().splitlines()[:10]:
        key, _, val = line.partition("=")
        vals[key.strip()] = val.strip()
    return ".".join(vals.get(k, "?") for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL"))


def install_headers(tree: Path, out: Path) -> Path:
    """``make headers`` of ``tree`` with build directory ``out``; returns the uapi include directory."""
    inc = out / "usr" / "include"
    stamp = out / ".kvmpy-headers"
    if stamp.exists():
        return inc
    out.mkdir(parents=True, exist_ok=True)
    log(f"make headers ({tree} -> {out})")
    _run(["make", "-s", "-C", tree.as_posix(), f"O={out}", f"-j{os.cpu_count() or 1}", "headers"],
         "installing the kernel's uapi headers (make headers)")
    if not (inc / "linux" / "kvm.h").is_file():
        raise BuildError(f"make headers left no {inc}/linux/kvm.h")
    stamp.write_text("ok\n")
    return inc


def _make_vars(tree: Path, inc: Path, out: Path) -> list[str]:
    return [f"OUTPUT={out}", f"LINUX_HDR_PATH={inc}/", f"KHDR_INCLUDES=-isystem {inc}"]


def build_selftests(tree: Path, inc: Path, out: Path) -> Path:
    """Build dirty_log_perf_test (and with it the kvm_util library objects) into ``out``."""
    kdir = tree / KVM_SELFTESTS
    if not (kdir / "Makefile").is_file():
        raise BuildError(f"{kdir}: no KVM selftests Makefile (not a kernel tree?)")
    target = out / "dirty_log_perf_test"
    out.mkdir(parents=True, exist_ok=True)
    log(f"building {target}")
    _run(["make", "-s", "-C", kdir.as_posix(), f"-j{os.cpu_count() or 1}", *_make_vars(tree, inc, out),
          target.as_posix()], "building the KVM selftests (dirty_log_perf_test)")
    return target


def build_peer(tree: Path, inc: Path, out: Path) -> Path:
    """Compile peer.c and link it with the kvm_util objects, with the commands the selftests'
    Makefile prints for dirty_log_perf_test (``make -n``): the same flags as the kernel's tests."""
    kdir = tree / KVM_SELFTESTS
    peer = out / "kvmpy_peer"
    digest = hashlib.sha256(PEER_SRC.read_bytes()).hexdigest()[:16]
    stamp = out / ".kvmpy-peer"
    if peer.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return peer
    target = (out / "dirty_log_perf_test").as_posix()
    dry = _run(["make", "-n", "-B", "-C", kdir.as_posix(), *_make_vars(tree, inc, out), target],
               "asking the selftests' Makefile for its commands", capture=True)
    lines = [shlex.split(line) for line in dry.splitlines() if line.startswith(("gcc", "cc ", "clang"))]
    compile_cmd = next((c for c in lines if c[-3:] == ["dirty_log_perf_test.c", "-o", target + ".o"]), None)
    link_cmd = next((c for c in lines if c[-2:] == ["-o", target]), None)
    if compile_cmd is None or link_cmd is None:
        raise BuildError("the selftests' Makefile printed no compile/link command for dirty_log_perf_test")
    obj = out / "kvmpy_peer.o"
    compile_cmd = compile_cmd[:-3] + [PEER_SRC.as_posix(), "-o", obj.as_posix()]
    link_cmd = [a if a != target + ".o" else obj.as_posix() for a in link_cmd[:-2]] + ["-o", peer.as_posix()]
    log(f"building {peer}")
    _run(compile_cmd, f"compiling {PEER_SRC}", cwd=kdir)
    _run(link_cmd, f"linking {peer}", cwd=kdir)
    stamp.write_text(digest + "\n")
    return peer


def prepare(kernel_tree: str | None = None, deb: str | None = None, package: str = "linux-source-6.12",
            cache: Path = CACHE) -> CSelftests:
    """Everything the benchmark runs on the C side, built (or found) in ``cache``."""
    if kernel_tree:
        tree = Path(kernel_tree).resolve()
        if not (tree / "Makefile").is_file():
            raise BuildError(f"{tree}: not a kernel tree (no Makefile)")
    else:
        tree = unpack_deb(Path(deb).resolve() if deb else fetch_deb(package, cache), cache)
    version = kernel_version(tree)
    key = hashlib.sha256(tree.as_posix().encode()).hexdigest()[:8]
    out = cache / f"build-{version}-{key}"
    inc = install_headers(tree, out / "headers")
    perf_test = out / "selftests" / "dirty_log_perf_test"
    if not perf_test.exists():
        perf_test = build_selftests(tree, inc, out / "selftests")
    peer = build_peer(tree, inc, out / "selftests")
    return CSelftests(version, perf_test, peer)


def _leftover_builds(cache: Path = CACHE) -> list[str]:
    return sorted(glob.glob(str(cache / "build-*")))


if __name__ == "__main__":
    try:
        built = prepare(*(sys.argv[1:2] or [None]))
    except BuildError as e:
        sys.exit(f"ksrc: {e}")
    print(built)
