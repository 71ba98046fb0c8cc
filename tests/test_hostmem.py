"""kvmpy.hostmem: the host's memory facts from /proc and sysfs files (fake trees, no root needed)."""
from __future__ import annotations

from kvmpy import hostmem
from kvmpy.memory import PAGE_2M


def test_mem_available_reads_meminfo_or_says_it_does_not_know(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   15000000 kB\n")
    assert hostmem.mem_available(str(meminfo)) == 15000000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")
    assert hostmem.mem_available(str(meminfo)) is None
    meminfo.write_text("MemAvailable:   lots kB\n")
    assert hostmem.mem_available(str(meminfo)) is None
    assert hostmem.mem_available(str(tmp_path / "none")) is None


def test_hugetlb_pool_and_shortfall_read_the_pool_under_a_root(tmp_path):
    assert hostmem.hugetlb_pool(PAGE_2M, str(tmp_path)) is None
    assert hostmem.hugetlb_shortfall(PAGE_2M, 1, str(tmp_path)) == "no hugetlb pool of 2048kB pages on this host"
    pool = tmp_path / "sys/kernel/mm/hugepages/hugepages-2048kB"
    pool.mkdir(parents=True)
    for name, value in (("nr_hugepages", "8"), ("free_hugepages", "6"), ("resv_hugepages", "2")):
        (pool / name).write_text(value + "\n")
    assert hostmem.hugetlb_pool_dir(PAGE_2M, str(tmp_path)) == str(pool)
    assert hostmem.hugetlb_pool(PAGE_2M, str(tmp_path)) == {"total": 8, "free": 6, "resv": 2}
    assert hostmem.hugetlb_shortfall(PAGE_2M, 4, str(tmp_path)) is None
    assert "needs 5 free 2048kB huge pages, the pool has 4 available (8 total)" in \
        hostmem.hugetlb_shortfall(PAGE_2M, 5, str(tmp_path))
