"""Result files brought back from the bed, confined to the results directory.

Whatever runs in the bed (the command, or anything that can print to its
console) controls what a backend brings back: a directory on a writable 9p
share (QEMU) or a tar stream in the console (Bochs), read by a harness that
often runs as root.  So nothing is taken on trust: a result file is a
regular file (no symlink, hard link, device or fifo) with a relative name
that stays inside the results directory, and sizes are bounded per file and
in total.  What is left out is named, with the reason, in ``dropped``.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import BedResult

#: Largest result file brought back (a whole suite's JUnit XML is ~100 KB).
MAX_FILE_BYTES = 64 << 20
#: Largest total of one boot's result files (and of what is read to find them).
MAX_TOTAL_BYTES = 256 << 20

#: (files by relative name, dropped names with the reason)
Collected = Tuple[Dict[str, bytes], List[str]]


def safe_name(name: str) -> Optional[str]:
    """``name`` as a plain relative path inside a directory, or None if it is not one.

    Leading ``./`` (as tar writes) and ``.`` components are removed; an
    absolute name, a ``..`` component, a NUL or an empty name is refused.
    """
    if not name or "\0" in name or name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def read_regular(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The contents of ``path`` if it is a regular file (not a link) of at most ``limit`` bytes.

    Raises ValueError saying why not (OSError for a file that cannot be read).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):
            raise ValueError("a symbolic link") from None
        raise exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{st.st_size} bytes, over the {limit}-byte bound")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"over the {limit}-byte bound")
    return data


def files_from_dir(root: Path, limit: int = MAX_FILE_BYTES, total: int = MAX_TOTAL_BYTES) -> Collected:
    """The regular files under ``root`` by relative path; links and special files are dropped."""
    files: Dict[str, bytes] = {}
    dropped: List[str] = []
    root = Path(root)
    if root.is_symlink():
        return files, [f"{root.name}: a symbolic link"]
    if not root.is_dir():
        return files, dropped
    budget = total
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames):
            if (base / name).is_symlink():  # os.walk lists it and does not follow it
                dropped.append(f"{(base / name).relative_to(root).as_posix()}: a symbolic link")
        for name in sorted(filenames):
            path = base / name
            rel = path.relative_to(root).as_posix()
            try:
                data = read_regular(path, min(limit, budget))
            except (ValueError, OSError) as exc:
                dropped.append(f"{rel}: {exc}")
                continue
            budget -= len(data)
            files[rel] = data
    return files, dropped


def read_log(path: Path, dropped: List[str], limit: int = MAX_FILE_BYTES) -> str:
    """A log file the bed left (e.g. its dmesg), read like a result file; "" if absent or refused."""
    if not os.path.lexists(path):
        return ""
    try:
        return read_regular(path, limit).decode(errors="replace")
    except (ValueError, OSError) as exc:
        dropped.append(f"{Path(path).name}: {exc}")
        return ""


def files_from_tar(data: bytes, limit: int = MAX_FILE_BYTES, total: int = MAX_TOTAL_BYTES) -> Collected:
    """The regular files of a (gzipped) tar archive by safe name, read as a bounded stream.

    Every member's size counts against ``total``, read or not, so a crafted
    archive cannot make the host decompress more than that.  Raises
    tarfile.TarError (or EOFError, OSError, zlib.error) for a damaged archive.
    """
    files: Dict[str, bytes] = {}
    dropped: List[str] = []
    budget = total
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        for member in tar:
            name = safe_name(member.name)
            label = name or repr(member.name)
            budget -= member.size
            if budget < 0:
                dropped.append(f"{label} and what follows: over the {total}-byte total bound")
                break
            if member.isdir():
                continue
            if name is None:
                dropped.append(f"{label}: leaves the results directory")
            elif not member.isfile():
                dropped.append(f"{label}: not a regular file")
            elif member.size > limit:
                dropped.append(f"{label}: {member.size} bytes, over the {limit}-byte bound")
            else:
                files[name] = tar.extractfile(member).read(limit)
    return files, dropped


def _make_dir(outdir: Path, what: str) -> Path:
    """``outdir`` created with its parents if need be; BedError naming ``what`` if it cannot be."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BedError(f"{what} {outdir}: exists and is not a directory") from None
    except OSError as exc:
        raise BedError(f"{what} {outdir}: cannot create the directory: {exc.strerror or exc}") from None
    return outdir


def prepare_results_dir(outdir: Path, option: str = "--results") -> Path:
    """Create ``outdir`` (with its parents) if need be and check that files can be written in it,
    before anything boots; BedError saying why not (not a directory, no permission, read-only...)."""
    outdir = _make_dir(Path(outdir), option)
    try:
        fd, probe = tempfile.mkstemp(prefix=".kvmpy-write-check-", dir=outdir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BedError(f"{option} {outdir}: cannot write files in it: {exc.strerror or exc}") from None
    return outdir


def save_files(files: Mapping[str, bytes], outdir: Path) -> List[Path]:
    """Write ``files`` (relative name -> contents) under ``outdir``; return the paths.

    Raises BedError, writing nothing of it, for a name that would land outside
    ``outdir`` (absolute, ``..``, or through a symbolic link already there); BedError
    too for a directory or file that cannot be created or written.
    """
    outdir = _make_dir(Path(outdir), "results directory")
    top = os.path.realpath(outdir)
    written = []
    for name, data in files.items():
        rel = safe_name(name)
        if rel is None:
            raise BedError(f"result file {name!r}: refusing a name outside {outdir}")
        path = outdir / rel
        if posixpath.commonpath([top, os.path.realpath(path.parent)]) != top:
            raise BedError(f"result file {name!r}: {path.parent} leads outside {outdir}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise BedError(f"result file {name!r}: cannot write {path}: {exc.strerror or exc}") from None
        written.append(path)
    return written


def save_result_or_keep(result: BedResult, outdir: Path, log) -> bool:
    """:func:`save_result` into ``outdir``; if that fails, say why through ``log`` and save into a new
    temporary directory instead (named through ``log``), so that the results are not lost.
    True when they went to ``outdir``."""
    try:
        save_result(result, outdir)
        return True
    except BedError as exc:
        log(f"results not saved in {outdir}: {exc}")
    try:
        fallback = Path(tempfile.mkdtemp(prefix="kvmpy-bed-results-"))
        save_result(result, fallback)
        log(f"results saved in {fallback} instead")
    except (BedError, OSError) as exc:
        log(f"results lost: cannot save them in a temporary directory either: {exc}")
    return False


def save_result(result: BedResult, outdir: Path) -> List[Path]:
    """Write a boot's result files, its console and its kernel log into ``outdir``."""
    items: Dict[str, bytes] = dict(result.files)
    items["console.log"] = result.console.encode()
    if result.kernel_log:
        items["kernel.log"] = result.kernel_log.encode()
    return save_files(items, outdir)
