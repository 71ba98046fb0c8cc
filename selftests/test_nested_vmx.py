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

from kvmpy.guest import stages
from kvmpy.guest.vm import GuestVm
from kvmpy.hostinfo import module_params, param_on

# Basic exit reasons (SDM vol. 3D appendix C) and EPT-violation qualification bits (vol. 3C table 28-7).
EXIT_HLT = 12
EXIT_VMCALL = 18
EXIT_EPT_VIOLATION = 48
EPT_READ, EPT_WRITE, EPT_FETCH = 1 << 0, 1 << 1, 1 << 2
EPT_READABLE, EPT_WRITABLE, EPT_EXECUTABLE = 1 << 3, 1 << 4, 1 << 5
EPT_GLA_VALID, EPT_GLA_TRANSLATED = 1 << 7, 1 << 8

MSR_IA32_VMX_BASIC = 0x480
MSR_IA32_VMX_PROCBASED_CTLS = 0x482
MSR_IA32_VMX_PROCBASED_CTLS2 = 0x48B
MSR_IA32_VMX_EPT_VPID_CAP = 0x48C
MSR_IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E


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
    assert ept == param_on(kvm_ept), f"nested EPT offered={ept} but kvm_intel ept={kvm_ept}"

    syncs = [(s[1], s[2]) for s in r.syncs]
    hole = stages.NESTED_SMOKE_HOLE_GPA + 8
    expected = [
        (stages.NESTED_SMOKE_SETUP, (int(ept), revision)),     # L1 saw the same EPT offer and revision
        # rax, rdi, rsi (L2's arg), insn length
        (stages.NESTED_SMOKE_CALL, (EXIT_VMCALL, stages.NESTED_SMOKE_CALL_MAGIC, stages.NESTED_SMOKE_ARG_MAGIC,
                                    stages.NESTED_SMOKE_L2_ARG, 3)),
        (stages.NESTED_SMOKE_FROM_L2, (stages.NESTED_SMOKE_L2_ARG,)),
    ]
    if ept:
        fault = syncs[3] if len(syncs) > 3 and syncs[3][0] == stages.NESTED_SMOKE_FAULT else None
        qual = fault[1][1] if fault else None   # checked below
        # GPA and linear address (identity mapped)
        expected.append((stages.NESTED_SMOKE_FAULT, (EXIT_EPT_VIOLATION, qual, hole, hole)))
    expected += [
        # The retried write is in L1's page.
        (stages.NESTED_SMOKE_HLT, (EXIT_HLT, 1, stages.NESTED_SMOKE_WRITE_MAGIC if ept else 0)),
        # The second VMCALL, and the VM entries in all.
        (stages.NESTED_SMOKE_DONE, (EXIT_VMCALL, stages.NESTED_SMOKE_DONE_MAGIC, 4 if ept else 3)),
    ]
    assert syncs == expected
    if ept:
        # A data write to a not-present EPT entry, caused by the final access of a
        # linear address (not a paging-structure read): no R/X, no permissions.
        mask = (EPT_READ | EPT_WRITE | EPT_FETCH | EPT_READABLE | EPT_WRITABLE | EPT_EXECUTABLE
                | EPT_GLA_VALID | EPT_GLA_TRANSLATED)
        assert qual & mask == EPT_WRITE | EPT_GLA_VALID | EPT_GLA_TRANSLATED, f"EPT violation qualification {qual:#x}"
