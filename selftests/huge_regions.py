"""A test memslot of huge host pages, populated by the guest, for the MMU tests that start from
huge SPTEs (test_page_splitting.py, test_nx_huge_pages.py).

``region(name)`` gives the memslot's backing -- THP, or hugetlb 2M/1G from the pool
(host_state.hugetlb_pages: grown only inside the bed) -- as a :class:`Region`;
``touch_guest`` runs mmu_touch over it, ``populate`` writes it and returns the SPTE counts
and which chunks KVM maps huge (exactly those the kernel backs huge).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from kvmpy.errors import require
from kvmpy.memory import PAGE_1G, PAGE_2M, PAGE_4K, Hugetlb, Thp, thp_backed_chunks

from .drivers import TouchGuest
from .host_state import hugetlb_pages

NR_CHUNKS_2M = 8            # 16 MiB region for the 2M backings


@dataclass
class Region:
    """The test region of one backing: ``nr`` huge chunks of ``chunk`` bytes."""

    name: str
    backing: object
    chunk: int
    nr: int

    @property
    def size(self) -> int:
        return self.chunk * self.nr

    @property
    def key(self) -> str:
        return "pages_2m" if self.chunk == PAGE_2M else "pages_1g"

    @property
    def pages_per_chunk(self) -> int:
        return self.chunk // PAGE_4K

    @property
    def write_stride(self) -> int:
        # Every 4K page of a 2M region; one page per 2M of a 1G region (262144
        # write faults after a split would take minutes under TCG).
        return PAGE_4K if self.chunk == PAGE_2M else PAGE_2M


@contextlib.contextmanager
def region(name: str):
    if name == "thp":
        Thp().check(PAGE_2M)
        yield Region(name, Thp(), PAGE_2M, NR_CHUNKS_2M)
    elif name == "hugetlb-2M":
        with hugetlb_pages(PAGE_2M, NR_CHUNKS_2M):
            yield Region(name, Hugetlb(PAGE_2M), PAGE_2M, NR_CHUNKS_2M)
    else:
        with hugetlb_pages(PAGE_1G, 1):
            yield Region(name, Hugetlb(PAGE_1G), PAGE_1G, 1)


def touch_guest(kvm, r: Region, cpl: int) -> TouchGuest:
    """mmu_touch at ``cpl`` over the region, mapped in the guest with pages of the region's chunk size."""
    return TouchGuest(kvm, r.backing, r.size, guest_page=r.chunk, cpl=cpl)


def populate(t: TouchGuest, r: Region) -> tuple[dict[str, int], list[int]]:
    """Write the whole region; return the counts after it and the chunks mapped huge.

    Hugetlb chunks are always huge in the kernel's page tables; THP chunks are huge
    where the kernel gave a transparent huge page (read from /proc/kpageflags), and
    KVM maps a chunk huge exactly when the kernel does.
    """
    start = t.counts()
    assert start["pages_2m"] == start["pages_1g"] == 0, f"memslot 0 has huge SPTEs before the test: {start}"
    t.write(stride=r.write_stride, stamp=1)
    if r.name == "thp":
        backed = thp_backed_chunks(t.slot.hva, r.size)
        require(backed is not None, "cannot tell which chunks the kernel backs with THP: /proc/kpageflags and "
                                    "PFNs in /proc/self/pagemap need CAP_SYS_ADMIN")
        huge = [i for i, b in enumerate(backed) if b]
        require(huge, f"the kernel backed none of the {r.nr} 2M chunks of the THP region with a huge page "
                      f"(see /sys/kernel/mm/transparent_hugepage/defrag and memory fragmentation)")
    else:
        huge = list(range(r.nr))
    pop = t.counts()
    assert pop[r.key] == len(huge), (
        f"{r.name}: {len(huge)} of {r.nr} chunks are huge in the kernel, but KVM maps {pop[r.key]} "
        f"{r.key[6:]} SPTEs after the guest wrote the region ({pop})")
    other = "pages_1g" if r.key == "pages_2m" else "pages_2m"
    assert pop[other] == 0, f"unexpected {other} after population: {pop}"
    # The same pass again must not change any mapping.
    t.write(stride=r.write_stride, stamp=1)
    assert t.counts() == pop, f"a second write pass over a populated region changed the SPTEs: {pop} -> {t.counts()}"
    return pop, huge
