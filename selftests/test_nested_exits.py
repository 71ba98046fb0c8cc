"""Nested virtualization works: an L1 guest runs an L2 and gets back every exit it expects.

SVM: L1 (guests/svm_l2_smoke.c, on guests/lib/svm.c) enables SVM, builds NPT
tables and a VMCB and VMRUNs a 64-bit L2.  VMX: L1 (guests/vmx_probe.c, on
guests/lib/vmx.c) locks IA32_FEATURE_CONTROL, applies the VMX CR0/CR4 fixed
bits, VMXONs, builds a VMCS for a 64-bit L2 that shares its page tables and
descriptor tables, and VMLAUNCHes/VMRESUMEs it.  KVM (L0) emulates all of that
from its vmcb12/vmcs12; with NPT/EPT L2's memory goes through KVM's nested MMU.
The exit sequences differ by vendor, so these two tests are vendor specific.

Each needs a host whose KVM offers its extension to guests (kvm_amd nested=1
npt=1 / kvm_intel nested=1); elsewhere it skips saying so.  `kvmpy selftest
--bed -k nested_exits` runs the SVM one on a 6.12 kernel under QEMU,
`--backend bochs` the VMX one under Bochs (an emulated Skylake-X).
"""
from __future__ import annotations

from kvmpy.guest import stages
from kvmpy.guest.vm import GuestVm
from kvmpy.hostinfo import module_params
from kvmpy.mmu_params import param_on

# SVM exit codes and NPF EXITINFO1 bits (AMD APM vol. 2, appendix C and 15.25.6).
SVM_EXIT_HLT = 0x78
SVM_EXIT_VMMCALL = 0x81
SVM_EXIT_NPF = 0x400
NPF_WRITE, NPF_USER, NPF_FINAL_GPA = 1 << 1, 1 << 2, 1 << 32

# VMX basic exit reasons (SDM vol. 3D appendix C) and EPT-violation qualification bits (vol. 3C table 28-7).
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


def test_svm_l2_vmmcall_npf_hlt(nested_svm):
    """VMRUN with NPT works and every kind of #VMEXIT L1 expects comes back to it.

    svm_l2_smoke.c: L2 VMMCALLs (exit 0x81, arguments in L2's registers, L1's
    answer in RAX), GUEST_SYNCs straight to the host (L1 does not intercept
    I/O), writes into an NPT hole (NPF 0x400 at exactly that L2 GPA; L1 maps
    the page to another L1 page and L2's write retries and lands there), HLTs
    (0x78), and finishes with a VMMCALL.  L1 checks each exit itself and
    reports it with GUEST_SYNC(stage, exit code, ...).
    """
    hole = stages.NESTED_SMOKE_HOLE_GPA + 8
    with GuestVm("svm_l2_smoke", kvm=nested_svm) as g:
        r = g.run(timeout=120)
    assert [(s[1], s[2]) for s in r.syncs] == [
        # rax, rdi, rsi (L2's arg) as L1 saw them
        (stages.NESTED_SMOKE_CALL, (SVM_EXIT_VMMCALL, stages.NESTED_SMOKE_CALL_MAGIC,
                                    stages.NESTED_SMOKE_ARG_MAGIC, stages.NESTED_SMOKE_L2_ARG)),
        (stages.NESTED_SMOKE_FROM_L2, (stages.NESTED_SMOKE_L2_ARG,)),
        # EXITINFO1 of the NPF: a write (W), NPT walks are user accesses (U), not
        # present (P=0), faulted on the final GPA rather than an L2 page-table read.
        (stages.NESTED_SMOKE_FAULT, (SVM_EXIT_NPF, NPF_FINAL_GPA | NPF_USER | NPF_WRITE, hole)),
        # The retried write is in L1's page.
        (stages.NESTED_SMOKE_HLT, (SVM_EXIT_HLT, stages.NESTED_SMOKE_WRITE_MAGIC)),
        (stages.NESTED_SMOKE_DONE, (SVM_EXIT_VMMCALL, 4)),   # 4 VMRUNs in all
    ]


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


def test_vmx_l2_vmcall_ept_violation_hlt(nested_vmx):
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
