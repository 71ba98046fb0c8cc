"""KVM MMU behaviour that changed upstream between the kernels the selftests run on, keyed by release.

A :class:`Change` is an upstream commit and the first release that has it. A test that
asserts a behaviour one of them changed calls :func:`expect` with both expectations; the
running kernel's release (``uname -r``: Debian's ``6.1.0-57-amd64`` is 6.1) picks one. A
distro kernel may carry a backport (or a revert), so an observation that matches the
*other* expectation is not accepted: it fails with "this kernel behaves as if it
has/lacks <commit>". One that matches neither fails naming the commit and both values.

The audit behind this table (every stats assertion in selftests/, read in Debian's 6.1 and
6.12 sources and run in the bed on both):

    lazy split on a write fault, TDP MMU       differs: SPLIT_ON_FAULT
    recovery after dirty logging, TDP MMU      zap in 6.1 and 6.12; in place from RECOVER_IN_PLACE
    refault over a zapped range, shadow MMU    differs with kvm.nx_huge_pages=Y: NX_HUGE_PAGE_CHECK
    KVM_CLEAR_DIRTY_LOG split                  whole 64-page words: same; a single page at the
                                               start of a huge page: CLEAR_SPLIT_OFF_BY_ONE (TDP MMU);
                                               the nested MMU splits it in 6.1 and 6.12 alike (its
                                               rmap walk visits the first rmap of an empty range)
    eager split at enable, TDP MMU             same in 6.1 and 6.12; from TDP_EAGER_SPLIT (with the
                                               kvm.eager_page_split parameter) and, at
                                               KVM_CLEAR_DIRTY_LOG, CLEAR_EAGER_SPLIT
    eager split at enable, nested MMU          same in 6.1 and 6.12; from NESTED_EAGER_SPLIT (before
                                               it the nested MMU split only lazily)
    lazy split, shadow MMU flavours            same (never split: drop the huge SPTE, map 4K)
    nested MMU (test_nested_*.py), unsync      same, but for L1's own huge TDP SPTE under its
                                               edited tables (split meets unsync): SPLIT_ON_FAULT
    memslot replaced under the nested MMU      same (all zapped); with KVM_X86_QUIRK_SLOT_ZAP_ALL
                                               off, which SLOT_ZAP_QUIRK added, the slot's shadow
                                               pages go since SLOT_ZAP_SHADOW_FIX (both v6.12)
    second eager split of a slot, nested MMU   same (the first split's orphaned pages are found
                                               again); with kvm.nx_huge_pages=Y only from
                                               NX_HUGE_PAGE_CHECK (before it, nothing is huge again)
    NX huge page split and recovery, nested    same, but in a dirty-logged slot the recovery worker
                                               zaps the split (6.1) or only unaccounts it:
                                               NX_RECOVERY_SKIPS_DIRTY_LOGGED
    NX huge page split, L1                     shadow MMU flavours the same; the TDP MMU maps the
                                               fetched page alone (6.1) or splits: SPLIT_ON_FAULT
"""
from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Change:
    """An upstream KVM commit that changed what a selftest observes."""

    commit: str
    subject: str
    release: tuple[int, int]    # the first upstream release that has it

    @property
    def first(self) -> str:
        return f"v{self.release[0]}.{self.release[1]}"

    def __str__(self) -> str:
        return f'{self.commit} "{self.subject}" ({self.first})'


TDP_EAGER_SPLIT = Change("a3fe5dbda0a4", "KVM: x86/mmu: Split huge pages mapped by the TDP MMU when dirty logging "
                                         "is enabled", (5, 18))
CLEAR_EAGER_SPLIT = Change("cb00a70bd4b7", "KVM: x86/mmu: Split huge pages mapped by the TDP MMU during "
                                           "KVM_CLEAR_DIRTY_LOG", (5, 18))
NESTED_EAGER_SPLIT = Change("ada51a9de737", "KVM: x86/mmu: Extend Eager Page Splitting to nested MMUs", (6, 0))
SPLIT_ON_FAULT = Change("c4b33d28ea51", "KVM: x86/mmu: Split huge pages mapped by the TDP MMU on fault", (6, 2))
NX_HUGE_PAGE_CHECK = Change("76901e56fb51", "KVM: x86/mmu: explicitly check nx_hugepage in "
                                            "disallowed_hugepage_adjust()", (6, 2))
NX_RECOVERY_SKIPS_DIRTY_LOGGED = Change("eb298605705a", "KVM: x86/mmu: Do not recover dirty-tracked NX Huge Pages",
                                        (6, 2))
CLEAR_SPLIT_OFF_BY_ONE = Change("1aa4bb916808", "KVM: x86/mmu: Fix off-by-1 when splitting huge pages during CLEAR",
                                (6, 8))
SLOT_ZAP_QUIRK = Change("aa8d1f48d353", "KVM: x86/mmu: Introduce a quirk to control memslot zap behavior", (6, 12))
# v6.12-rc2, so no release lacks it: in -rc1, with the quirk disabled, a deleted memslot's shadow
# pages went unzapped.
SLOT_ZAP_SHADOW_FIX = Change("fcd1ec9cb59c", "KVM: x86/mmu: fix KVM_X86_QUIRK_SLOT_ZAP_ALL for shadow MMU", (6, 12))
RECOVER_IN_PLACE = Change("13e2e4f62a4b", "KVM: x86/mmu: Recover TDP MMU huge page mappings in-place instead "
                                          "of zapping", (6, 13))


def parse_release(release: str) -> tuple[int, int]:
    """``"6.1.0-57-amd64"`` -> (6, 1); ValueError for a string that starts with no version."""
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise ValueError(f"kernel release {release!r} does not start with MAJOR.MINOR")
    return int(m.group(1)), int(m.group(2))


def running_release() -> str:
    """The running kernel's release (``uname -r``): inside the bed, the bed's kernel."""
    return platform.release()


def has(change: Change, release: str | None = None) -> bool:
    """Whether a kernel of ``release`` (default: the running one) is at least ``change``'s first release."""
    return parse_release(release or running_release()) >= change.release


def expect(what: str, got: Any, change: Change, *, before: Any, since: Any, release: str | None = None) -> None:
    """Assert ``got`` is what this kernel shows: ``since`` from ``change``'s release on, else ``before``.

    ``what`` says what was observed (it starts the failure message).
    """
    release = release or running_release()
    new = has(change, release)
    want, other = (since, before) if new else (before, since)
    if got == want:
        return
    if got == other:
        raise AssertionError(
            f"{what}: got {got}, as kernels {'before' if new else 'since'} {change.first} do; this kernel "
            f"({release}) behaves as if it {'lacks' if new else 'has'} {change}, expected {want}")
    raise AssertionError(
        f"{what}: got {got}, expected {want} on {release}; before {change} KVM gives {before}, since it {since}")
