"""x86 control-register/MSR constants, CPUID queries and long-mode vCPU setup."""
from __future__ import annotations

from typing import NamedTuple

from kvmpy.errors import RequirementError
from kvmpy.x86.descriptors import CODE64, DATA, USER_CODE64, USER_DATA, Segment

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31

CR4_VME = 1 << 0
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21

EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102

RFLAGS_FIXED = 1 << 1  # bit 1 always reads as one
RFLAGS_IF = 1 << 9


class CpuidFeature(NamedTuple):
    """A CPUID feature flag: leaf, subleaf, register name and bit."""

    name: str
    leaf: int
    subleaf: int
    reg: str
    bit: int


FEATURE_PSE = CpuidFeature("pse", 1, 0, "edx", 3)
FEATURE_PAE = CpuidFeature("pae", 1, 0, "edx", 6)
FEATURE_PGE = CpuidFeature("pge", 1, 0, "edx", 13)
FEATURE_NX = CpuidFeature("nx", 0x80000001, 0, "edx", 20)
FEATURE_GBPAGES = CpuidFeature("pdpe1gb", 0x80000001, 0, "edx", 26)
FEATURE_LM = CpuidFeature("lm", 0x80000001, 0, "edx", 29)
FEATURE_VMX = CpuidFeature("vmx", 1, 0, "ecx", 5)
FEATURE_NPT = CpuidFeature("npt", 0x8000000A, 0, "edx", 0)


def cpuid_lookup(cpuid2, leaf: int, subleaf: int = 0):
    """The entry of a ``struct kvm_cpuid2 *`` for ``leaf``/``subleaf``, or None."""
    for i in range(cpuid2.nent):
        e = cpuid2.entries[i]
        # flags bit 0 is KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        if e.function == leaf and (e.index == subleaf or not e.flags & 1):
            return e
    return None


def cpuid_has(cpuid2, feature: CpuidFeature) -> bool:
    """Whether ``feature`` is set in ``cpuid2``."""
    e = cpuid_lookup(cpuid2, feature.leaf, feature.subleaf)
    return e is not None and bool(getattr(e, feature.reg) >> feature.bit & 1)


def require_feature(cpuid2, feature: CpuidFeature, why: str = "") -> None:
    """RequirementError naming the feature when ``cpuid2`` lacks it."""
    if not cpuid_has(cpuid2, feature):
        raise RequirementError(f"CPUID lacks {feature.name} (leaf {feature.leaf:#x} {feature.reg} "
                               f"bit {feature.bit})" + (f": needed for {why}" if why else ""))


def phys_bits(cpuid2) -> int:
    """MAXPHYADDR from CPUID 0x80000008 (36 when the leaf is absent, as the SDM says)."""
    e = cpuid_lookup(cpuid2, 0x80000008)
    return e.eax & 0xFF if e is not None and e.eax & 0xFF else 36


def vcpu_cpuid(kvm, vcpu_id: int):
    """KVM's supported CPUID with the initial APIC id set to ``vcpu_id`` (a fresh copy)."""
    cpuid2 = kvm.supported_cpuid()
    for i in range(cpuid2.nent):
        e = cpuid2.entries[i]
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (vcpu_id & 0xFF) << 24
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu_id
    return cpuid2


def load_segment(kseg, seg: Segment) -> None:
    """Copy ``seg`` into a ``struct kvm_segment`` cdata."""
    for f in ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"):
        setattr(kseg, f, getattr(seg, f))


def setup_long_mode(vcpu, *, cr3: int, gdt_base: int, gdt_limit: int, idt_base: int, idt_limit: int,
                    tss: Segment, nx: bool = True, user: bool = False, cr0_extra: int = 0,
                    cr4_extra: int = 0) -> None:
    """Put ``vcpu`` in 64-bit mode: flat CS/DS, the given GDT/IDT/TR, paging on with ``cr3``.

    ``user``: start at CPL3 (user code and data selectors), with CR0.AM and EFER.SCE
    set as a Linux user process has them (kvm_pvm runs such a vCPU natively).
    CPUID must already be set (KVM checks EFER.NXE against it).
    """
    s = vcpu.get_sregs()
    load_segment(s.cs, USER_CODE64 if user else CODE64)
    for name in ("ds", "es", "fs", "gs", "ss"):
        load_segment(getattr(s, name), USER_DATA if user else DATA)
    load_segment(s.tr, tss)
    load_segment(s.ldt, Segment(0, limit=0, s=0, g=0, type=2, present=0, unusable=1))
    s.gdt.base, s.gdt.limit = gdt_base, gdt_limit
    s.idt.base, s.idt.limit = idt_base, idt_limit
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG | (CR0_AM if user else 0) | cr0_extra
    s.cr4 = CR4_PAE | cr4_extra
    s.cr3 = cr3
    s.efer = EFER_LME | EFER_LMA | (EFER_NXE if nx else 0) | (EFER_SCE if user else 0)
    vcpu.set_sregs(s)
