"""Nested VMX: an L1 guest enters VMX operation and runs an L2 guest, with EPT where offered.

L1 (guests/vmx_probe.c, built on guests/lib/vmx.c) locks IA32_FEATURE_CONTROL,
applies the VMX CR0/CR4 fixed bits, VMXONs, builds a VMCS for a 64-bit L2 that
shares its page tables and descriptor tables, and VMLAUNCHes/VMRESUMEs it.
KVM (L0) emulates all of that from its vmcs12 and runs L2 on a vmcs02; with
EPT, L2's memory goes through KVM's nested (shadow-EPT) MMU.

Needs a host whose KVM offers VMX to its guests (kvm_intel nested=1); elsewhere
the test skips saying so.  `kvmpy selftest --bed --backend bochs -k nested_vmx`
runs it on a 6.12 kernel under Bochs (an emulated Skylake-X with VMX and EPT).
"""
from __future__ import annotations

import pytest

from kvmpy.errors import RequirementError
from kvmpy.guest.runner import GuestVm
from kvmpy.hostinfo import module_params, require_nested
from kvmpy.x86 import cpu

# Basic exit reasons (SDM vol. 3D appendix C) and EPT-violation qualification bits (vol. 3C table 28-7).
EXIT_HLT = 12
EXIT_VMCALL = 18
EXIT_EPT_VIOLATION = 48
EPT_READ, EPT_WRITE, EPT_FETCH = 1 << 0, 1 << 1, 1 << 2
EPT_READABLE, EPT_WRITABLE, EPT_EXECUTABLE = 1 << 3, 1 << 4, 1 << 5
EPT_GLA_VALID, EPT_GLA_TRANSLATED = 1 << 7, 1 << 8

FEATURE_VMX = cpu.CpuidFeature("vmx", 1, 0, "ecx", 5)
MSR_IA32_VMX_BASIC = 0x480
MSR_IA32_VMX_PROCBASED_CTLS = 0x482
MSR_IA32_VMX_PROCBASED_CTLS2 = 0x48B
MSR_IA32_VMX_EPT_VPID_CAP = 0x48C
MSR_IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E

# vmx_probe.c's constants.
HOLE = 0x3E00000 + 0x123000 + 8
WRITE_MAGIC = 0x5EED5EED5EED5EED


@pytest.fixture
def nested_vmx(kvm):
    """/dev/kvm whose guests can use VMX, or a skip naming what is missing."""
    try:
        require_nested("intel")
    except RequirementError as e:
        pytest.skip(str(e))
    # kvm_intel sets CPUID.1:ECX.VMX in KVM_GET_SUPPORTED_CPUID only with nested=1;
    # GuestVm hands the supported CPUID to the vCPU unchanged.
    if not cpu.cpuid_has(kvm.supported_cpuid(), FEATURE_VMX):
        nested = (module_params("kvm_intel") or {}).get("nested")
        pytest.skip(f"KVM_GET_SUPPORTED_CPUID lacks VMX (leaf 1 ECX[5]), so L1 cannot VMXON; "
                    f"kvm_intel nested={nested}: load kvm_intel with nested=1")
    return kvm


def vmx_caps(vcpu) -> tuple[int, bool]:
    """(VMCS revision id, whether EPT with a 4-level WB walk is offered), from the vCPU's VMX MSRs.

    These are the values KVM will show L1 (host-initiated KVM_GET_MSRS reads the
    same nested VMX capability MSRs the guest's RDMSR does).
    """
    basic = vcpu.get_msrs([MSR_IA32_VMX_BASIC])[MSR_IA32_VMX_BASIC]
    procbased = MSR_IA32_VMX_TRUE_PROCBASED_CTLS if basic >> 55 & 1 else MSR_IA32_VMX_PROCBASED_CTLS
    ept = False
    if vcpu.get_msrs([procbased])[procbased] >> 32 & (1 << 31):         # activate secondary controls
        msrs = vcpu.get_msrs([MSR_IA32_VMX_PROCBASED_CTLS2, MSR_IA32_VMX_EPT_VPID_CAP])
        cap = msrs[MSR_IA32_VMX_EPT_VPID_CAP]
        ept = bool(msrs[MSR_IA32_VMX_PROCBASED_CTLS2] >> 32 & (1 << 1)) and bool(cap & 1 << 6 and cap & 1 << 14)
    return basic & 0x7FFFFFFF, ept


def test_l2_vmcall_ept_violation_hlt(nested_vmx):
    """VMLAUNCH/VMRESUME work and every VM exit L1 expects comes back to it, in order.

    vmx_probe.c: L2 VMCALLs (exit 18, arguments in L2's GPRs, length 3, L1's
    answer in RAX), GUEST_SYNCs straight to the host (L1 does not exit on I/O),
    with EPT writes into an EPT hole (exit 48 at exactly that GPA; L1 maps the
    page to another L1 page, INVEPTs, and L2's retried write lands there), HLTs
    (exit 12, length 1), and finishes with a second VMCALL.
    """
    with GuestVm("vmx_probe", kvm=nested_vmx) as g:
        revision, ept = vmx_caps(g.vcpus[0])
        r = g.run(timeout=300)
    # KVM offers nested EPT exactly when it uses EPT itself.
    kvm_ept = (module_params("kvm_intel") or {}).get("ept")
    assert ept == (kvm_ept in ("Y", "1")), f"nested EPT offered={ept} but kvm_intel ept={kvm_ept}"

    syncs = [(s[1], s[2]) for s in r.syncs]
    expected = [
        (0, (int(ept), revision)),                              # L1 saw the same EPT offer and revision
        (1, (EXIT_VMCALL, 0x1234, 0xABCDEF01, 0x42, 3)),        # rax, rdi, rsi (L2's arg), insn length
        (100, (0x42,)),                                         # from L2 itself
    ]
    if ept:
        qual = syncs[3][1][1] if len(syncs) > 3 and syncs[3][0] == 2 else None   # checked below
        expected.append((2, (EXIT_EPT_VIOLATION, qual, HOLE, HOLE)))   # GPA and linear address (identity)
    expected += [
        (3, (EXIT_HLT, 1, WRITE_MAGIC if ept else 0)),          # the retried write is in L1's page
        (4, (EXIT_VMCALL, 0x600D, 4 if ept else 3)),            # VM entries in all
    ]
    assert syncs == expected
    if ept:
        # A data write to a not-present EPT entry, caused by the final access of a
        # linear address (not a paging-structure read): no R/X, no permissions.
        mask = (EPT_READ | EPT_WRITE | EPT_FETCH | EPT_READABLE | EPT_WRITABLE | EPT_EXECUTABLE
                | EPT_GLA_VALID | EPT_GLA_TRANSLATED)
        assert qual & mask == EPT_WRITE | EPT_GLA_VALID | EPT_GLA_TRANSLATED, f"EPT violation qualification {qual:#x}"
