"""Facts about this host's KVM that decide which tests can run, and what they mean.

``probe_mmu()`` answers the question every MMU selftest depends on: do a guest's
memory accesses go through KVM's MMU (creating SPTEs that the ``pages_*`` stats
count), or is the guest run by the instruction emulator (no SPTEs at all)? It asks
at ring 0 and at CPL3 (kvm_pvm emulates ring 0 but runs CPL3 natively).
``mmu_flavour()`` says which MMU a new VM gets. The ``require_*`` functions raise
:class:`RequirementError` naming what is missing and how to get it (the
selftest fixtures in selftests/conftest.py are built on them).
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass, field

from kvmpy import faults, mmu_probe
from kvmpy.abi import lib
from kvmpy.errors import RequirementError
from kvmpy.kvm import Kvm
from kvmpy.hostmem import hugetlb_pool, read_sysfs, thp_mode
from kvmpy.memory import PAGE_1G, PAGE_2M
from kvmpy.mmu_probe import LevelProbe, MmuProbeError
from kvmpy.mmu_params import MmuFlavour, flavour_of, param_on
from kvmpy.x86 import cpu

VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")

# Capabilities that matter to kvmpy's selftests, with what their absence means.
CAPS = [
    ("KVM_CAP_BINARY_STATS_FD", "stats-based assertions (pages_4k/2m/1g, mmu_unsync) need it"),
    ("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "KVM_CLEAR_DIRTY_LOG tests need it"),
    ("KVM_CAP_DIRTY_LOG_RING", "dirty-ring tests need it (value: max ring bytes)"),
    ("KVM_CAP_DIRTY_LOG_RING_ACQ_REL", "dirty-ring tests use ACQ_REL when offered"),
    ("KVM_CAP_NESTED_STATE", "nested (VMX/SVM) tests need it"),
    ("KVM_CAP_IMMEDIATE_EXIT", "vCPU kicks (timeouts) rely on it"),
    ("KVM_CAP_NR_MEMSLOTS", "maximum memslots per VM"),
    ("KVM_CAP_MAX_VCPUS", "maximum vCPUs per VM"),
    ("KVM_CAP_XSAVE2", "size of the xsave area"),
    ("KVM_CAP_VM_TYPES", "bitmask of VM types (0 before 6.7)"),
    ("KVM_CAP_USER_MEMORY2", "KVM_SET_USER_MEMORY_REGION2 (6.8+)"),
]


def module_params(module: str) -> dict[str, str] | None:
    """A loaded module's parameters from /sys/module/NAME/parameters, None if not loaded."""
    base = f"/sys/module/{module}/parameters"
    if not os.path.isdir(f"/sys/module/{module}"):
        return None
    out = {}
    if os.path.isdir(base):
        for name in sorted(os.listdir(base)):
            val = read_sysfs(os.path.join(base, name))
            if val is not None:
                out[name] = val
    return out


def loaded_vendor_module() -> str | None:
    for m in VENDOR_MODULES:
        if os.path.isdir(f"/sys/module/{m}"):
            return m
    return None


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} if unreadable)."""
    out: dict[str, str] = {}
    for line in (read_sysfs("/proc/cpuinfo") or "").splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def cpu_flags() -> set[str]:
    return set(cpuinfo().get("flags", "").split())


def cpu_vendor() -> str:
    """"intel", "amd" or the raw vendor_id ("unknown" without one)."""
    v = cpuinfo().get("vendor_id", "unknown")
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "amd"}.get(v, v)


@dataclass
class MmuProbe:
    """What the probe guests did at ring 0 and at CPL3 (see :mod:`kvmpy.mmu_probe`)."""

    ring0: LevelProbe
    cpl3: LevelProbe

    @property
    def levels(self) -> tuple[int, ...]:
        """The privilege levels (0, 3) at which guest accesses go through KVM's MMU."""
        return tuple(p.cpl for p in (self.ring0, self.cpl3) if p.through_mmu)

    @property
    def emulates_ring0(self) -> bool:
        """KVM runs ring-0 guests with its instruction emulator (kvm_pvm): whether a guest
        runs natively is KVM's choice, so native execution needs evidence at every step."""
        return self.ring0.instruction_emulated

    def meaning(self) -> str:
        mmu = "KVM's MMU"
        try:
            mmu = "TDP MMU" if mmu_flavour().tdp_mmu else "shadow MMU"
        except RequirementError:
            pass
        return f"{self.ring0.meaning(mmu)}; {self.cpl3.meaning(mmu)}"


@functools.lru_cache(maxsize=1)
def probe_mmu() -> MmuProbe:
    """Run the probe guests once per process: do guest writes create SPTEs, at ring 0 and at CPL3?

    Raises MmuProbeError when a probe cannot run (the answer is unknown: a harness error).
    """
    try:
        faults.check("probe-fails")  # FAULT: probe-fails
        with Kvm() as kvm:
            return MmuProbe(mmu_probe.probe_ring0(kvm), mmu_probe.probe_cpl3(kvm))
    except Exception as e:
        raise probe_error(e) from e


def probe_error(e: Exception) -> MmuProbeError:
    """``e``, raised while probing, as the harness error it is."""
    return e if isinstance(e, MmuProbeError) else MmuProbeError(f"MMU probe failed: {type(e).__name__}: {e}")


def require_mmu_visible(cpl: int = 0) -> MmuProbe:
    """The probe, if guest memory accesses at ``cpl`` create SPTEs that KVM's stats count.

    RequirementError when they do not because KVM emulated them (the probe saw it do so:
    kvm_pvm's ring 0); MmuProbeError when they created no SPTEs although KVM did not
    emulate them (the stats are broken: a failure, never a skip), and when the probe
    failed, however it failed (a requirement can only be judged from a probe that ran).
    """
    try:
        p = probe_mmu()
    except Exception as e:
        raise probe_error(e) from e
    if cpl not in p.levels:
        mod = loaded_vendor_module() or "no vendor module"
        level = p.ring0 if cpl == 0 else p.cpl3
        if not level.emulated:
            raise MmuProbeError(f"SPTE stats broken at CPL{cpl} on this host ({mod}): the probe guest's "
                                f"accesses ran natively (KVM did not emulate them) yet the stats show no SPTEs "
                                f"for them: {p.meaning()}")
        raise RequirementError(f"SPTE stats not observable at CPL{cpl} on this host ({mod}): {p.meaning()}")
    return p


def require_nested(vendor: str | None = None) -> None:
    """RequirementError unless this host can run a nested (L2) guest with ``vendor``'s extension."""
    flags = cpu_flags()
    want = {"intel": ["vmx"], "amd": ["svm"], None: ["vmx", "svm"]}[vendor]
    have = [f for f in want if f in flags]
    if not have:
        raise RequirementError(f"CPU exposes no {'/'.join(want)} (nested virtualization unavailable; "
                               f"vendor module: {loaded_vendor_module() or 'none'}); use `kvmpy bed`")
    mod = {"vmx": "kvm_intel", "svm": "kvm_amd"}[have[0]]
    nested = (module_params(mod) or {}).get("nested")
    if not param_on(nested):
        raise RequirementError(f"{mod} nested={nested!r}: load it with nested=1")


# What L1 needs in KVM_GET_SUPPORTED_CPUID (GuestVm hands it to the vCPU unchanged) to run
# an L2: the feature, the vendor module parameter that makes KVM offer it, and what is lost.
_NESTED_CPUID = {
    # kvm_amd offers NPT to L1 only when it uses NPT itself.
    "amd": (cpu.FEATURE_NPT, "kvm_amd", "npt", "L1 cannot use nested paging"),
    # kvm_intel sets CPUID.1:ECX.VMX only with nested=1.
    "intel": (cpu.FEATURE_VMX, "kvm_intel", "nested", "L1 cannot VMXON"),
}


def require_nested_guest(kvm: Kvm, vendor: str) -> None:
    """RequirementError unless ``kvm``'s guests can run an L2: SVM with NPT ("amd") or VMX ("intel")."""
    require_nested(vendor)
    feature, module, param, lost = _NESTED_CPUID[vendor]
    if not cpu.cpuid_has(kvm.supported_cpuid(), feature):
        value = (module_params(module) or {}).get(param)
        raise RequirementError(f"KVM_GET_SUPPORTED_CPUID lacks {feature.name.upper()} (leaf {feature.leaf:#x} "
                               f"{feature.reg.upper()}[{feature.bit}]), so {lost}; {module} {param}={value}: "
                               f"load {module} with {param}=1")


def mmu_flavour() -> MmuFlavour:
    """The MMU a VM created now gets; RequirementError when the vendor module is unknown."""
    vendor = loaded_vendor_module()
    if vendor not in VENDOR_MODULES:
        raise RequirementError(f"MMU flavour unknown: vendor module is {vendor or 'not loaded'} "
                               f"(need one of {', '.join(VENDOR_MODULES)})")
    return flavour_of(vendor, module_params("kvm") or {}, module_params(vendor) or {})


def require_shadow_paging(cpl: int = 0) -> MmuFlavour:
    """The MMU flavour, if new VMs get shadow paging (TDP off) with SPTEs observable at ``cpl``."""
    require_mmu_visible(cpl)
    fl = mmu_flavour()
    if fl.tdp:
        param = fl.tdp_param
        raise RequirementError(f"needs shadow paging, but {param}=Y (TDP never shadows guest page tables); "
                               f"reload {fl.vendor_module} with {param.split('.')[1]}=0, or run in the bed "
                               f"with --param {param}=0")
    return fl


@dataclass
class HostFacts:
    """Everything `kvmpy info` reports."""

    kernel_release: str
    cpu_vendor: str
    vendor_module: str | None
    api_version: int | None
    capabilities: dict[str, int] = field(default_factory=dict)
    kvm_params: dict[str, str] | None = None
    vendor_params: dict[str, str] | None = None
    cpu_virt_flags: list[str] = field(default_factory=list)
    nested: str = ""
    thp: str | None = None
    hugetlb_2m: dict | None = None
    hugetlb_1g: dict | None = None
    mmu_flavour: str = ""
    mmu_probe: dict | None = None
    mmu_meaning: str = ""
    mmu_probe_error: str = ""
    error: str = ""
    usage_error: str = ""      # bad input (e.g. KVMPY_FAULTS), not a KVM problem; also in ``error``

    def to_dict(self) -> dict:
        return asdict(self)


def gather(probe: bool = True) -> HostFacts:
    """Collect host facts; never raises (a missing /dev/kvm is reported in ``error``; an invalid
    KVMPY_FAULTS in ``usage_error`` and ``error``, and then /dev/kvm is not opened, nor the MMU probed)."""
    vm_mod = loaded_vendor_module()
    facts = HostFacts(
        kernel_release=platform.release(), cpu_vendor=cpu_vendor(), vendor_module=vm_mod, api_version=None,
        kvm_params=module_params("kvm"), vendor_params=module_params(vm_mod) if vm_mod else None,
        cpu_virt_flags=sorted(cpu_flags() & {"vmx", "svm", "ept", "npt", "hypervisor"}),
        thp=thp_mode(), hugetlb_2m=hugetlb_pool(PAGE_2M), hugetlb_1g=hugetlb_pool(PAGE_1G),
    )
    try:
        require_nested()
        facts.nested = "available"
    except RequirementError as e:
        facts.nested = f"unavailable: {e}"
    try:
        faults.enabled()
    except faults.FaultError as e:
        facts.usage_error = facts.error = f"{e} (fix or unset {faults.ENV}; KVM was not asked)"
        return facts
    try:
        with Kvm() as kvm:
            facts.api_version = kvm.api_version
            for name, _ in CAPS:
                facts.capabilities[name] = kvm.check_extension(getattr(lib, name))
    except Exception as e:
        facts.error = str(e)
        return facts
    try:
        fl = mmu_flavour()
        facts.mmu_flavour = f"{fl.name}   {fl.params}"
    except RequirementError as e:
        facts.mmu_flavour = str(e)
    if probe:
        try:
            p = probe_mmu()
        except Exception as e:  # a harness error: reported, and `kvmpy info` exits 1
            facts.mmu_probe_error = str(probe_error(e))
            return facts
        facts.mmu_probe = {"levels": list(p.levels), "ring0": asdict(p.ring0), "cpl3": asdict(p.cpl3)}
        facts.mmu_meaning = p.meaning()
    return facts


def format_facts(f: HostFacts) -> str:
    """Human-readable report of ``f`` with what each fact means for the tests."""
    lines = [
        f"kernel        {f.kernel_release}",
        f"cpu vendor    {f.cpu_vendor}   virt flags: {' '.join(f.cpu_virt_flags) or 'none'}",
        f"kvm module    {f.vendor_module or 'no vendor module loaded'}   API {f.api_version}",
    ]
    if f.usage_error:
        lines.append(f"usage error   {f.usage_error}")
    if f.error and f.error != f.usage_error:
        lines.append(f"/dev/kvm      {f.error}")
    lines.append(f"nested        {f.nested}")
    lines.append(f"THP           {f.thp or 'absent'}" + ("" if f.thp in ("always", "madvise") else
                                                          "   (THP-backed tests will skip)"))
    for label, pool in (("hugetlb 2M", f.hugetlb_2m), ("hugetlb 1G", f.hugetlb_1g)):
        lines.append(f"{label:<13} " + (f"total {pool['total']} free {pool['free']}" if pool else "absent")
                     + ("   (hugetlb-backed tests will skip)" if not pool or not pool["free"] else ""))
    if f.mmu_flavour:
        lines.append(f"MMU           {f.mmu_flavour}")
    if f.mmu_meaning or f.mmu_probe_error:
        lines.append(f"MMU probe     {f.mmu_meaning or f.mmu_probe_error}")
    if f.capabilities:
        lines.append("capabilities:")
        for name, why in CAPS:
            lines.append(f"  {name:<36} {f.capabilities.get(name, 0):<10} {why}")
    for label, params in (("kvm", f.kvm_params), (f.vendor_module, f.vendor_params)):
        if params:
            keys = ["tdp_mmu", "eager_page_split", "nx_huge_pages", "nested", "ept", "npt",
                    "enable_unrestricted_guest", "pml"]
            shown = {k: params[k] for k in keys if k in params} or params
            lines.append(f"{label} params: " + " ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)
