"""Boot and payload media for machines that cannot load a kernel or share files directly.

Bochs boots from an isolinux ISO 9660 disc and gets the carried files
(:mod:`kvmpy.bed.carry`) either as further cpio archives appended to the
initramfs or on a second ISO; these helpers write both kinds.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import List, Tuple

from kvmpy.bed.protocol import BedError


def make_iso(out: Path, files: List[Tuple[str, Path]], boot: bool) -> Path:
    """Write an ISO 9660 image (Rock Ridge: modes, links, mtimes) of ``files``.

    ``files`` pairs paths in the image with host files or directories;
    directories grafted onto the same path are merged.  With
    ``boot`` the image is an isolinux El Torito disc.
    """
    argv = ["xorriso", "-as", "mkisofs", "-quiet", "-R", "-o", str(out)]
    if boot:
        argv += ["-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat",
                 "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"]
    argv += ["-graft-points"] + [f"{dest}={src}" for dest, src in files]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise BedError(f"xorriso failed: {proc.stderr.strip()[-1500:]}")
    return out


def write_cpio(out: Path, tree: Path) -> Path:
    """Write ``tree`` as a gzipped cpio "newc" archive to ``out``.

    The cpio tool keeps the files' mtimes, which the carried .pyc files are
    checked against (Python recompiles, slowly under Bochs, when they differ).
    """
    # Private to this thread too: rows of --jobs may write the same cached archive at once.
    tmp = out.with_name(out.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    procs: List[subprocess.Popen] = []
    try:
        with open(tmp, "wb") as raw:
            find = subprocess.Popen(["find", ".", "-mindepth", "1"], cwd=tree, stdout=subprocess.PIPE)
            procs.append(find)
            cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree,
                                    stdin=find.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(cpio)
            find.stdout.close()
            with cpio.stdout, cpio.stderr:
                # Level 1: as small as level 6 give or take 10%, several times faster.
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
                    shutil.copyfileobj(cpio.stdout, gz, 1 << 20)
                err = cpio.stderr.read()
            if cpio.wait(timeout=600) != 0 or find.wait(timeout=600) != 0:
                raise BedError(f"cpio failed: {err.decode(errors='replace').strip()}")
        os.replace(tmp, out)
    except BaseException:
        # A failed or interrupted write (a full disk, Ctrl-C) leaves no part archive in the cache
        # and no find or cpio running.
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def append_archive(initrd: Path, archive: Path) -> None:
    """Append a further (compressed) cpio archive to ``initrd``.

    The kernel unpacks concatenated archives in order, but it only looks for
    the next one at a 4-byte boundary (zero bytes in between are skipped).
    """
    with open(initrd, "ab") as out:
        out.write(b"\0" * (-out.tell() % 4))
        with open(archive, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
