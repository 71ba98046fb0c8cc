"""The guests behind :func:`kvmpy.hostinfo.probe_mmu`: one small run per privilege level.

Each run writes to a few pages and reads, from the VM and vCPU stats, what KVM did:
the SPTEs the writes created (``pages_4k/2m/1g``) and how many instructions KVM
emulated (``insn_emulation``). A guest that goes through KVM's MMU creates SPTEs;
one run by the instruction emulator creates none (KVM reads and writes guest memory
for it). On kvm_pvm ring 0 is emulated while CPL3 code runs natively -- decided by
a heuristic, so the CPL3 run also checks that KVM emulated nothing but its report.

Any failure to run a probe raises: a probe that cannot tell is a harness error,
never "not observable".
"""
from __future__ import annotations

from dataclasses import dataclass

from kvmpy.errors import KvmError
from kvmpy.exits import HltExit
from kvmpy.guest import stages
from kvmpy.guest.vm import GuestVm
from kvmpy.kvm import Kvm
from kvmpy.hostmem import thp_mode
from kvmpy.memory import PAGE_2M, PAGE_4K, Anonymous, Thp
from kvmpy.vcpu import Vcpu
from kvmpy.vm import Vm

SPTE_SIZES = ("pages_4k", "pages_2m", "pages_1g")
PAGES_PER = {"pages_4k": 1, "pages_2m": PAGE_2M // PAGE_4K, "pages_1g": 512 * PAGE_2M // PAGE_4K}
CPL3_REGION_GPA = 1 << 30
CPL3_REGION_SIZE = 2 * PAGE_2M


class MmuProbeError(KvmError):
    """The MMU probe could not run: whether SPTEs are observable is unknown (a harness error)."""


@dataclass
class LevelProbe:
    """What a guest writing ``pages`` pages at privilege level ``cpl`` did to the stats."""

    cpl: int
    pages: int               # pages the guest wrote
    sptes: dict[str, int]    # pages_4k/2m/1g the writes added
    insn_emulation: int      # instructions KVM emulated meanwhile
    guest_insns: int         # instructions the guest executed (ring 0), or 0
    reports: int             # ucalls in the measured part: one emulated MMIO store each (CPL3)
    backing: str = ""        # what backs the written region

    @property
    def pages_mapped(self) -> int:
        """Guest pages the new SPTEs map."""
        return sum(self.sptes[k] * PAGES_PER[k] for k in SPTE_SIZES)

    @property
    def through_mmu(self) -> bool:
        """The writes went through KVM's MMU (SPTEs appeared), and at CPL3 nothing but the
        reports was emulated (so the SPTEs are the guest's own doing, not a lucky prefetch)."""
        if self.cpl == 0:
            return self.pages_mapped > 0
        return self.pages_mapped >= self.pages and self.insn_emulation <= self.reports

    @property
    def instruction_emulated(self) -> bool:
        """No SPTEs at all, and KVM emulated at least as many instructions as the guest ran."""
        return self.pages_mapped == 0 and self.insn_emulation >= max(self.guest_insns, self.pages)

    @property
    def emulated(self) -> bool:
        """The probe saw KVM emulate the guest's accesses (so no SPTEs are expected of them):
        at ring 0 every instruction (:attr:`instruction_emulated`), at CPL3 more than the
        reports. Not through KVM's MMU and not emulated either means the SPTE stats are broken."""
        return self.instruction_emulated if self.cpl == 0 else self.insn_emulation > self.reports

    def check_consistent(self) -> None:
        """MmuProbeError when CPL3 writes ran natively yet the new SPTEs map fewer pages than
        were written: native writes fault in every page they touch, so such stats are misread
        (e.g. descriptors mismatched) and the probe cannot tell."""
        if self.cpl == 3 and self.insn_emulation <= self.reports and self.pages_mapped < self.pages:
            raise MmuProbeError(f"CPL3 probe: the guest's {self.pages} writes ran natively (insn_emulation "
                                f"+{self.insn_emulation} for {self.reports} report) but the stats say the new "
                                f"SPTEs map {self.pages_mapped} pages ({self.sptes}): the stats cannot be trusted")

    def meaning(self, mmu: str = "KVM's MMU") -> str:
        spte = ", ".join(f"{v} {k[6:].upper()}" for k, v in self.sptes.items() if v) or "no"
        if self.cpl == 0:
            if self.through_mmu:
                return (f"ring 0: guest accesses go through {mmu} ({spte} SPTEs after touching {self.pages} pages)")
            if self.instruction_emulated:
                return (f"ring 0: the guest is run by KVM's instruction emulator (insn_emulation={self.insn_emulation} "
                        f"for {self.guest_insns} guest instructions, no SPTEs after touching {self.pages} pages)")
            return (f"ring 0: no SPTEs after touching {self.pages} pages, but only {self.insn_emulation} of "
                    f"{self.guest_insns} instructions emulated: the guest ran natively, the SPTE stats are broken")
        what = (f"{spte} SPTEs after one write per 4K over {self.pages * PAGE_4K >> 20} MiB of {self.backing}, "
                f"insn_emulation +{self.insn_emulation} for {self.reports} report")
        if self.through_mmu:
            return f"{mmu} observable at CPL3 ({what})"
        if self.insn_emulation > self.reports:
            return f"CPL3: KVM emulated the guest's writes ({what}): SPTE stats are not observable"
        return f"CPL3: the writes created SPTEs for only {self.pages_mapped} of {self.pages} pages ({what})"


def _sptes(vm: Vm) -> dict[str, int]:
    snap = vm.stats.snapshot()
    return {k: int(snap.get(k, 0)) for k in SPTE_SIZES}


def _emulated(vcpu: Vcpu) -> int:
    return int(vcpu.stats.read("insn_emulation")) if vcpu.stats.has("insn_emulation") else 0


def probe_ring0(kvm: Kvm, pages: int = 16) -> LevelProbe:
    """A real-mode guest writes one byte in each of ``pages`` pages, then HLTs."""
    base = 0x10000
    # mov ax, seg; mov es, ax; mov byte [es:0], 1  -- per page, then hlt
    code = bytearray()
    for p in range(pages):
        seg = (base + p * PAGE_4K) >> 4
        code += bytes([0xB8, seg & 0xFF, seg >> 8, 0x8E, 0xC0, 0x26, 0xC6, 0x06, 0, 0, 1])
    code += b"\xF4"
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0, 1 << 20)
        vm.write(0x1000, bytes(code))
        vcpu = vm.create_vcpu(0)
        s = vcpu.get_sregs()
        s.cs.base = 0
        s.cs.selector = 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip = 0x1000
        r.rflags = 2
        vcpu.set_regs(r)
        for _ in range(8):
            ex = vcpu.run()
            if isinstance(ex, HltExit):
                break
        else:
            raise MmuProbeError(f"the ring-0 probe guest did not reach HLT (last exit {ex.name})")
        return LevelProbe(0, pages, _sptes(vm), _emulated(vcpu), 3 * pages + 1, 0, "anonymous memory")


def probe_cpl3(kvm: Kvm) -> LevelProbe:
    """guests/mmu_touch.c in user mode writes one u64 per 4K over 2x2M (THP where the host has
    it), mapped with 2M guest pages; measured from its first park to its second (one report)."""
    backing = Thp() if thp_mode() in ("always", "madvise") else Anonymous()
    marks: list[tuple[dict[str, int], int]] = []
    with GuestVm("mmu_touch", kvm=kvm, user_mode=True) as g:
        g.add_memory(1, CPL3_REGION_GPA, CPL3_REGION_SIZE, backing)
        g.map(CPL3_REGION_GPA, CPL3_REGION_GPA, CPL3_REGION_SIZE, PAGE_2M)
        for name, value in (("test_gva", CPL3_REGION_GPA), ("test_size", CPL3_REGION_SIZE)):
            g.write_global(name, value)

        def on_sync(vcpu_id: int, stage: int, args: tuple) -> None:
            # The only vCPU is parked in its report: the stats are stable.
            marks.append((_sptes(g.vm), _emulated(g.vcpus[0])))
            cmd = ({"op": stages.MMU_TOUCH_OP_WRITE, "start": 0, "length": CPL3_REGION_SIZE, "stride": PAGE_4K,
                    "stamp": 1} if len(marks) == 1 else {"op": stages.MMU_TOUCH_OP_QUIT})
            for name, value in cmd.items():
                g.write_global(name, value)

        g.run(timeout=60, on_sync=on_sync)
    if len(marks) != 2:
        raise MmuProbeError(f"the CPL3 probe guest parked {len(marks)} times, expected 2")
    (before, emul0), (after, emul1) = marks
    probe = LevelProbe(3, CPL3_REGION_SIZE // PAGE_4K, {k: after[k] - before[k] for k in SPTE_SIZES},
                       emul1 - emul0, 0, 1, backing.name)
    probe.check_consistent()
    return probe
