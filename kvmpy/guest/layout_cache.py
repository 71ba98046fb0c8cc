"""Guest ELF layouts on disk, by the ELF's content hash (see :class:`kvmpy.guest.elf.ElfLayout`).

A layout is a pure function of the file's bytes, so an entry can never be stale, only absent
or damaged, and either way the loader reads the headers again; like ``__pycache__``, the
cache changes how fast a guest loads, never what loads. It lives in
``$KVMPY_ELF_CACHE``, else ``$XDG_CACHE_HOME/kvmpy/elf-layout``; ``KVMPY_ELF_CACHE=`` (empty)
turns it off. Entries are small JSON files written whole (rename), so concurrent loaders
never see half of one; at most :data:`MAX_ENTRIES` are kept. A cache that cannot be read
or written is no error: loading goes on without it.
"""
from __future__ import annotations

import itertools
import json
import os

try:    # the builtin, as random.py takes _sha512: hashlib's OpenSSL binding costs 3 ms to load
    from _blake2 import blake2b
except ImportError:
    from hashlib import blake2b

FORMAT = 1                      # bumped when ElfLayout's JSON changes: old entries are ignored
MAX_ENTRIES = 256
_tmp_names = itertools.count()      # next() on it is atomic: threads never share a temporary file


def directory() -> str | None:
    """The cache's directory, or None when ``KVMPY_ELF_CACHE`` is set empty."""
    where = os.environ.get("KVMPY_ELF_CACHE")
    if where is not None:
        return where or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvmpy", "elf-layout")


def _entry(where: str, raw: bytes) -> str:
    return os.path.join(where, f"{blake2b(raw, digest_size=32).hexdigest()}-{FORMAT}.json")


def get(raw: bytes) -> object | None:
    """The JSON stored for the ELF whose bytes are ``raw``, or None (no entry, no cache, or
    an entry that is not JSON). The caller checks its shape."""
    where = directory()
    if where is None:
        return None
    try:
        with open(_entry(where, raw), "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def put(raw: bytes, value: object) -> None:
    """Store ``value`` (JSON) for the ELF whose bytes are ``raw``; silently nothing if the
    cache is off or cannot be written."""
    where = directory()
    if where is None:
        return
    path = _entry(where, raw)
    tmp = f"{path}.{os.getpid()}.{next(_tmp_names)}.tmp"    # one per writer: the rename is the commit
    try:
        os.makedirs(where, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
        _prune(where)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _prune(where: str) -> None:
    """Keep the newest MAX_ENTRIES entries: each rebuilt guest adds one."""
    with os.scandir(where) as it:
        entries = [e for e in it if e.name.endswith(".json")]
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort(key=lambda e: e.stat().st_mtime_ns)
    for e in entries[: len(entries) - MAX_ENTRIES]:
        try:
            os.unlink(e.path)
        except OSError:
            pass
