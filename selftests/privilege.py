"""The privilege level an MMU selftest's guest runs at, and the evidence that each step ran natively.

A guest's accesses create SPTEs only when the CPU runs it natively; an access KVM
emulates goes around the MMU. The MMU probe (``hostinfo.probe_mmu``) says at which
levels a guest goes through KVM's MMU: on most hosts at CPL0 and CPL3, on kvm_pvm
only at CPL3 -- ring 0 is run by the instruction emulator, and CPL3 code runs
natively by a heuristic of kvm_pvm's, step by step. The ``cpl`` fixture runs an MMU
test once per level the probe allows (``levels()``).

Each step of such a test (guest work ending in one report, a GUEST_SYNC) is
checked with :class:`NativeSteps`: KVM may emulate the report itself (an MMIO
store, or an OUT skipped by the emulator where the CPU gives no next RIP) and
nothing else, so ``insn_emulation`` may rise by at most one. More means KVM
emulated guest code: where the host emulates guest code by design (the probe
saw ring 0 emulated: kvm_pvm), that is a skip naming the step; anywhere else it
is a failure.
"""
from __future__ import annotations

from kvmpy import hostinfo
from kvmpy.errors import RequirementError
from kvmpy.vcpu import Vcpu

CPL_IDS = {0: "cpl0", 3: "cpl3"}


def levels() -> tuple[int, ...]:
    """The levels to run MMU tests at: those the probe shows observable, else CPL0 (whose
    ``mmu`` fixture then skips with the probe's reason, or errors if the probe failed)."""
    try:
        return hostinfo.probe_mmu().levels or (0,)
    except Exception:  # noqa: BLE001 - the fixture raises it again, as the test's error
        return (0,)


def insn_emulation(vcpu: Vcpu) -> int:
    return int(vcpu.stats.read("insn_emulation"))


class NativeSteps:
    """``insn_emulation`` of ``vcpu`` across the steps of a guest, each ending in one report."""

    REPORT_EMULATIONS = 1   # what one report may cost: KVM emulates the MMIO store (or skips the OUT)

    def __init__(self, vcpu: Vcpu, cpl: int) -> None:
        self.vcpu = vcpu
        self.cpl = cpl
        self.checked = 0
        self.last = insn_emulation(vcpu)

    def mark(self) -> None:
        """A step whose native execution does not matter ended here (e.g. kernel calls only)."""
        self.last = insn_emulation(self.vcpu)

    def check(self, step: str) -> None:
        """The step that just ended in a report ran natively: a skip (kvm_pvm) or failure if not."""
        now = insn_emulation(self.vcpu)
        delta, self.last = now - self.last, now
        self.checked += 1
        if delta <= self.REPORT_EMULATIONS:
            return
        what = (f"{step}: insn_emulation +{delta} at CPL{self.cpl}, where only the step's report "
                f"(<= {self.REPORT_EMULATIONS}) may be emulated")
        probe = hostinfo.probe_mmu()
        if probe.emulates_ring0:
            raise RequirementError(f"{hostinfo.loaded_vendor_module()} emulated this step ({what}): "
                                   f"its accesses did not go through the MMU")
        raise AssertionError(f"KVM emulated guest code of a step that must run natively ({what})")
