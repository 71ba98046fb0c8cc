"""The privilege level an MMU selftest's guest runs at, and the evidence that each step ran natively.

A guest's accesses create SPTEs only when the CPU runs it natively; an access KVM
emulates goes around the MMU. The MMU probe (``hostinfo.probe_mmu``) says at which
levels a guest goes through KVM's MMU: on most hosts at CPL0 and CPL3, on kvm_pvm
only at CPL3 -- ring 0 is run by the instruction emulator, and CPL3 code runs
natively by a heuristic of kvm_pvm's, step by step. The ``cpl`` fixture runs an MMU
test once per level the probe allows (``levels()``).

Dirty logging sees every write, native or emulated, but by different paths in KVM:
a native write faults on a write-protected SPTE (or sets a dirty bit) and the MMU
logs it; an emulated one is logged by KVM's own write to guest memory. The
dirty-log writer runs at ``writer_level()``, the lowest level that runs natively
(CPL3 on kvm_pvm); the 1 GiB dirty-ring test runs at every ``write_levels()`` level,
so that kvm_pvm's emulated path is covered too, and proves each path with
:class:`WritePath`.

Each step of such a test (guest work ending in one report, a GUEST_SYNC) is
checked with :class:`NativeSteps`: KVM may emulate the report itself (an MMIO
store, or an OUT skipped by the emulator where the CPU gives no next RIP) and
nothing else, so ``insn_emulation`` may rise by at most one. More means KVM
emulated guest code: where the host emulates guest code by design (the probe
saw ring 0 emulated: kvm_pvm), that is a skip naming the step; anywhere else it
is a failure. A step whose emulation is itself the defect a test looks for (the
unsync test's PTE writes: KVM emulates them when it write-protects instead of
unsyncing) is checked with ``defect=``: a failure everywhere.
"""
from __future__ import annotations

from kvmpy import hostinfo
from kvmpy.errors import RequirementError
from kvmpy.mmu_probe import MmuProbeError
from kvmpy.vcpu import Vcpu

CPL_IDS = {0: "cpl0", 3: "cpl3"}


def levels() -> tuple[int, ...]:
    """The levels to run MMU tests at: those the probe shows observable, else CPL0 (whose
    ``mmu`` fixture then skips with the probe's reason, or errors if the probe failed)."""
    try:
        return hostinfo.probe_mmu().levels or (0,)
    except Exception:  # noqa: BLE001 - the fixture raises it again, as the test's error
        return (0,)


def writer_level() -> int:
    """The level the dirty-log writer runs at: the lowest whose writes go through KVM's MMU
    (CPL0 where the probe saw none, or failed: dirty logging covers emulated writes too)."""
    return levels()[0]


def write_levels() -> tuple[int, ...]:
    """The levels whose writes reach the dirty log by different paths: the writer's, and CPL0
    too where KVM emulates ring 0 (its emulator logs the writes it makes for the guest)."""
    try:
        emulated = hostinfo.probe_mmu().emulates_ring0
    except Exception:  # noqa: BLE001 - as in levels(): the writer's level alone
        emulated = False
    return tuple(sorted({0, writer_level()} if emulated else {writer_level()}))


class WritePath:
    """The ``insn_emulation`` of a writer's vCPUs around its writes: on a host that emulates
    ring 0, the evidence that they reached the dirty log by the path their level stands for
    (kvm_pvm, measured: ~30 emulations per write at CPL0, 1-3 in all for 7k-280k at CPL3)."""

    def __init__(self, vcpus: list[Vcpu], cpl: int) -> None:
        self.vcpus = vcpus
        self.cpl = cpl
        self.start = self._emulated()

    def _emulated(self) -> int:
        return sum(insn_emulation(v) for v in self.vcpus)

    def check(self, writes: int) -> str:
        """Assert the path (where ring 0 is emulated) and describe it."""
        emulated = self._emulated() - self.start
        seen = f"{emulated} instructions emulated for {writes} writes at CPL{self.cpl}"
        try:
            emulates_ring0 = hostinfo.probe_mmu().emulates_ring0
        except MmuProbeError as e:    # the dirty log was checked all the same; the path is unknown
            return f"{seen} (write path unknown: {e})"
        if not emulates_ring0:
            return seen
        if self.cpl == 0:
            assert emulated >= writes, f"{seen}: KVM emulates ring 0 here, yet not every write was emulated"
            return f"{seen}: emulated writes"
        assert emulated * 100 < writes, f"{seen}: the CPL3 writer did not run natively"
        return f"{seen}: native writes"


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

    def check(self, step: str, defect: str | None = None) -> None:
        """The step that just ended in a report ran natively: a skip (kvm_pvm) or failure if not.

        ``defect``: what KVM emulating this step means for the test, where that emulation is the
        very behaviour the test checks for (e.g. KVM emulating writes to a shadowed guest page
        table instead of unsyncing it): then it is a failure saying so on every host, never a
        skip -- the test runs only at levels the probe showed native."""
        now = insn_emulation(self.vcpu)
        delta, self.last = now - self.last, now
        self.checked += 1
        if delta <= self.REPORT_EMULATIONS:
            return
        what = (f"{step}: insn_emulation +{delta} at CPL{self.cpl}, where only the step's report "
                f"(<= {self.REPORT_EMULATIONS}) may be emulated")
        if defect is not None:
            raise AssertionError(f"{defect} ({what})")
        probe = hostinfo.probe_mmu()
        if probe.emulates_ring0:
            raise RequirementError(f"{hostinfo.loaded_vendor_module()} emulated this step ({what}): "
                                   f"its accesses did not go through the MMU")
        raise AssertionError(f"KVM emulated guest code of a step that must run natively ({what})")
