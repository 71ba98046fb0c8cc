"""The host's memory as /proc and sysfs tell it: MemAvailable, the THP mode, the hugetlb pools.

Plain file reads with no KVM in them, so that any layer (the perf checks, the bed's
bound on parallel boots, the backings' requirements) asks the same questions one way.
"""
from __future__ import annotations

import os

MEMINFO = "/proc/meminfo"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def read_sysfs(path: str) -> str | None:
    """Stripped contents of a sysfs/procfs file, None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def thp_mode() -> str | None:
    """The bracketed THP mode ('always', 'madvise', 'never'), or None if THP is absent."""
    raw = read_sysfs(THP_ENABLED)
    if raw is None or "[" not in raw:
        return None
    return raw[raw.index("[") + 1 : raw.index("]")]


def hugetlb_pool_dir(page_size: int, root: str = "/") -> str:
    """The sysfs directory of the hugetlb pool of ``page_size`` pages (under ``root``)."""
    return os.path.join(root, f"sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB")


def hugetlb_pool(page_size: int, root: str = "/") -> dict[str, int] | None:
    """Counters of the hugetlb pool for ``page_size`` (total/free/resv), None if absent."""
    base = hugetlb_pool_dir(page_size, root)
    if not os.path.isdir(base):
        return None
    out = {}
    for key, name in (("total", "nr_hugepages"), ("free", "free_hugepages"), ("resv", "resv_hugepages")):
        val = read_sysfs(os.path.join(base, name))
        out[key] = int(val) if val is not None and val.isdigit() else 0
    return out


def hugetlb_shortfall(page_size: int, count: int, root: str = "/") -> str | None:
    """Why the host cannot provide ``count`` huge pages of ``page_size`` now (None: it can)."""
    pool = hugetlb_pool(page_size, root)
    kb = page_size // 1024
    if pool is None:
        return f"no hugetlb pool of {kb}kB pages on this host"
    available = pool["free"] - pool["resv"]
    if available >= count:
        return None
    return (f"needs {count} free {kb}kB huge pages, the pool has {available} available ({pool['total']} total); "
            f"reserve them with `echo N > /sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages`")


def mem_available(meminfo: str = MEMINFO) -> int | None:
    """MemAvailable of ``meminfo`` in bytes (None if it does not say)."""
    try:
        with open(meminfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "MemAvailable":
                    return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
