"""Which of KVM's MMUs a VM gets, from the module parameters alone.

Pure (no sysfs, no /dev/kvm): :mod:`kvmpy.hostinfo` reads this host's parameters, and the
bed's facts (:mod:`kvmpy.bed.request`) name the MMU of the parameters its kernel reported.
"""
from __future__ import annotations

from typing import Mapping

from kvmpy.record import Record

# The vendor modules that can use two-dimensional paging, and the parameter that turns it on.
TDP_PARAM = {"kvm_amd": "npt", "kvm_intel": "ept"}


def param_on(value: str | None) -> bool:
    """True for a boolean module parameter that is on ("Y", "y" or "1")."""
    return value in ("Y", "y", "1")


class MmuFlavour(Record, frozen=True):
    """Which of KVM's MMUs backs a VM created now, from the module parameters."""

    vendor_module: str
    tdp: bool                   # two-dimensional paging (NPT/EPT) in use
    tdp_mmu: bool               # the TDP MMU (tdp_mmu.c) handles this VM
    eager_page_split: bool
    tdp_mmu_param: str = "?"
    # kvm.nx_huge_pages (the iTLB-multihit workaround): before v6.2 it kept the shadow MMU
    # from mapping huge again over an emptied table (selftests/kernel_changes.py).
    nx_huge_pages: bool = False

    @property
    def has_tdp(self) -> bool:
        """Whether the vendor module can use TDP at all (kvm_pvm always shadows guest page tables)."""
        return self.vendor_module in TDP_PARAM

    @property
    def name(self) -> str:
        if self.tdp_mmu:
            return "TDP MMU"
        if not self.has_tdp:
            return f"shadow MMU, no TDP ({self.vendor_module})"
        return "shadow MMU over TDP" if self.tdp else "shadow MMU with shadow paging (TDP off)"

    @property
    def tdp_param(self) -> str:
        """The vendor module's TDP parameter: kvm_amd.npt or kvm_intel.ept ('' without TDP)."""
        return f"{self.vendor_module}.{TDP_PARAM[self.vendor_module]}" if self.has_tdp else ""

    @property
    def params(self) -> str:
        tdp = f"{self.tdp_param}={'Y' if self.tdp else 'N'} " if self.has_tdp else ""
        return (f"{tdp}kvm.tdp_mmu={self.tdp_mmu_param} kvm.eager_page_split={'Y' if self.eager_page_split else 'N'} "
                f"kvm.nx_huge_pages={'Y' if self.nx_huge_pages else 'N'}")


def flavour_of(vendor: str, kvm: Mapping[str, str], vendor_params: Mapping[str, str]) -> MmuFlavour:
    """The MMU of ``vendor`` (a vendor module's name) with these ``kvm`` and vendor parameters."""
    tdp = vendor in TDP_PARAM and param_on(vendor_params.get(TDP_PARAM[vendor]))
    # kvm.tdp_mmu can read Y with npt=0/ept=0 (6.1 does): the TDP MMU needs TDP too.
    return MmuFlavour(vendor, tdp, tdp and param_on(kvm.get("tdp_mmu")), param_on(kvm.get("eager_page_split")),
                      kvm.get("tdp_mmu", "absent"), param_on(kvm.get("nx_huge_pages")))
