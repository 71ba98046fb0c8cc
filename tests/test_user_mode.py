"""User-mode (CPL3) guests and the MMU probe, offline: page-table bits, GuestVm arguments,
what a probe result means, and a probe that fails (an error, never "not observable")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy import hostinfo, mmu_probe
from kvmpy.errors import KvmError, RequirementError
from kvmpy.guest.ucall import MMIO, PORT_IO, UcallTransport
from kvmpy.guest.vm import GuestVm
from kvmpy.hostinfo import MmuProbe
from kvmpy.memory import PAGE_2M, PAGE_4K
from kvmpy.mmu_probe import LevelProbe, MmuProbeError
from kvmpy.stats_layout import StatsFormatError
from kvmpy.x86.paging import PTE_A, PTE_D, PTE_P, PTE_RW, PTE_US, PageTableBuilder
from kvmpy.x86.physmem import FlatMemory

ROOT = Path(__file__).resolve().parent.parent
POOL = 0x10000


def _entries(mem: FlatMemory, pt: PageTableBuilder, gva: int) -> list[int]:
    """The entries of every level on gva's walk, PML4 first."""
    out, table = [], pt.cr3
    for level in (4, 3, 2, 1):
        e = int.from_bytes(mem.read(table + 8 * ((gva >> (12 + 9 * (level - 1))) & 511), 8), "little")
        out.append(e)
        if level > 1 and e & (1 << 7):
            break
        table = e & 0x000F_FFFF_FFFF_F000
    return out


@pytest.mark.parametrize("preset_ad", [False, True])
def test_preset_accessed_dirty_bits(preset_ad):
    mem = FlatMemory(POOL + 64 * PAGE_4K)
    pt = PageTableBuilder(mem, POOL, 64 * PAGE_4K, phys_bits=46, preset_ad=preset_ad)
    pt.map_page(0x4000_0000, 0x20_0000, PAGE_2M, user=True)
    pt.map_page(0x7000_0000, 0x30_0000, PAGE_4K)
    for gva, user in ((0x4000_0000, True), (0x7000_0000, False)):
        *tables, leaf = _entries(mem, pt, gva)
        assert all(e & (PTE_P | PTE_RW | PTE_US) == PTE_P | PTE_RW | PTE_US for e in tables)
        assert all(bool(e & PTE_A) == preset_ad for e in tables)
        assert all(not e & PTE_D for e in tables)           # D is meaningless above the leaf
        assert bool(leaf & PTE_US) == user
        assert leaf & (PTE_A | PTE_D) == ((PTE_A | PTE_D) if preset_ad else 0)
        assert pt.translate(gva + 8).user == user


def test_user_mode_needs_the_mmio_transport():
    with pytest.raises(KvmError, match="user-mode .* by MMIO"):
        GuestVm("hello", user_mode=True, ucall=PORT_IO)


@pytest.mark.parametrize("mmio_gpa", [0x100_0000, 0xF000_0004])
def test_ucall_mmio_address_outside_memslot_0_and_aligned(mmio_gpa):
    with pytest.raises(KvmError, match="must be 8-byte aligned and above memslot 0"):
        GuestVm("hello", ucall=UcallTransport(port=None, mmio_gpa=mmio_gpa))


def test_mmio_transport_default_address_is_above_test_memory():
    # kvmpy's test memory: memslot 0 (64 MiB) and test slots from 1 GiB up to 3 GiB.
    assert MMIO.port is None and MMIO.mmio_gpa >= 3 << 30


def cpl3(sptes=None, emulated=1, pages=1024) -> LevelProbe:
    return LevelProbe(3, pages, sptes or {"pages_4k": 0, "pages_2m": 2, "pages_1g": 0}, emulated, 0, 1, "thp")


def ring0(spte_4k=0, emulated=49) -> LevelProbe:
    return LevelProbe(0, 16, {"pages_4k": spte_4k, "pages_2m": 0, "pages_1g": 0}, emulated, 49, 0, "anonymous")


def test_cpl3_probe_needs_sptes_for_every_page_and_no_emulation_but_the_report():
    assert cpl3().through_mmu
    assert "observable at CPL3" in cpl3().meaning("shadow MMU")
    assert cpl3({"pages_4k": 1024, "pages_2m": 0, "pages_1g": 0}).through_mmu   # no THP: 4K SPTEs
    emulated = cpl3(emulated=2)
    assert not emulated.through_mmu and "KVM emulated the guest's writes" in emulated.meaning()
    partial = cpl3({"pages_4k": 600, "pages_2m": 0, "pages_1g": 0})
    assert not partial.through_mmu and "only 600 of 1024 pages" in partial.meaning()


def test_cpl3_probe_rejects_native_writes_that_mapped_too_few_pages():
    cpl3().check_consistent()
    cpl3(emulated=2).check_consistent()        # emulated: simply not observable
    # Natively run writes fault in every page they touch: 2 pages mapped for 1024 written
    # means the stats are misread (pages_2m read as pages_4k), not that the MMU is hidden.
    for sptes in ({"pages_4k": 2, "pages_2m": 0, "pages_1g": 0}, {"pages_4k": 0, "pages_2m": 0, "pages_1g": 0}):
        with pytest.raises(MmuProbeError, match="ran natively .* the stats cannot be trusted"):
            cpl3(sptes).check_consistent()


def test_probe_levels_and_ring0_emulation():
    kvm_pvm = MmuProbe(ring0(), cpl3())
    assert kvm_pvm.levels == (3,) and kvm_pvm.emulates_ring0
    assert "instruction emulator" in kvm_pvm.ring0.meaning()
    native = MmuProbe(ring0(spte_4k=16, emulated=0), cpl3())
    assert native.levels == (0, 3) and not native.emulates_ring0
    nothing = MmuProbe(ring0(), cpl3(emulated=900))
    assert nothing.levels == ()


@pytest.fixture
def probe_result(monkeypatch):
    """Replace the cached probe by ``set(result or exception)``."""
    def set_(outcome):
        def fake():
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        monkeypatch.setattr(hostinfo, "probe_mmu", fake)
    return set_


def test_require_mmu_visible_by_level(probe_result):
    probe_result(MmuProbe(ring0(), cpl3()))
    assert hostinfo.require_mmu_visible(3).levels == (3,)
    with pytest.raises(RequirementError, match="not observable at CPL0 .*instruction emulator"):
        hostinfo.require_mmu_visible(0)


@pytest.mark.parametrize("failure", [StatsFormatError("stat 'pf_spurious': unknown unit 7"),
                                     RequirementError("raised by a fault hook"), OSError(5, "EIO")])
def test_a_probe_failure_is_never_a_requirement(probe_result, failure):
    probe_result(failure)
    # Caught by hand: a RequirementError escaping here would turn this test into a skip.
    with pytest.raises(Exception) as ei:
        hostinfo.require_mmu_visible(3)
    assert isinstance(ei.value, MmuProbeError) and not isinstance(ei.value, RequirementError), repr(ei.value)
    assert "MMU probe failed" in str(ei.value)


def test_probe_mmu_wraps_what_goes_wrong_inside(monkeypatch):
    def broken(kvm):
        raise StatsFormatError("stat 'pf_spurious': unknown unit 7")
    monkeypatch.setattr(mmu_probe, "probe_ring0", broken)
    hostinfo.probe_mmu.cache_clear()
    try:
        with pytest.raises(MmuProbeError, match="MMU probe failed"):
            hostinfo.probe_mmu()
    finally:
        hostinfo.probe_mmu.cache_clear()


def test_info_reports_a_failed_probe_and_exits_1(probe_result, capsys):
    from kvmpy import cli

    probe_result(StatsFormatError("stat 'pf_spurious': unknown unit 7"))
    rc = cli.main(["info"])
    out = capsys.readouterr().out
    assert "MMU probe     MMU probe failed" in out and "unknown unit 7" in out
    assert rc == 1


# A plugin for the selftest run below: the probe fails (as issue 12 saw a stats parse error do)
# or, with S15_PROBE=blind, runs and sees no SPTEs at any level.
PLUGIN = '''
import os
from kvmpy import hostinfo
from kvmpy.stats_layout import StatsFormatError
from kvmpy.mmu_probe import LevelProbe

def _probe():
    if os.environ["S15_PROBE"] == "fails":
        raise StatsFormatError("stat 'pf_spurious': unknown unit 7")
    none = {"pages_4k": 0, "pages_2m": 0, "pages_1g": 0}
    return hostinfo.MmuProbe(LevelProbe(0, 16, none, 49, 49, 0, "anonymous"),
                             LevelProbe(3, 1024, none, 1, 0, 1, "thp"))

hostinfo.probe_mmu = _probe
if os.environ.get("S15_IN_BED") == "1":  # as the bed's marks would say (kvmpy.bed_mark)
    from kvmpy import bed_mark
    bed_mark.in_bed = lambda root="/": True
'''


def _selftest(tmp_path: Path, keyword: str, **env: str) -> tuple[int, dict]:
    (tmp_path / "s15_probe.py").write_text(PLUGIN)
    full = dict(os.environ, PYTHONPATH=f"{ROOT}:{tmp_path}", **env)
    p = subprocess.run([sys.executable, "-m", "kvmpy.cli", "selftest", "--json", "-k", keyword, "--",
                        "-p", "s15_probe"], capture_output=True, text=True, timeout=300, env=full, cwd=str(ROOT))
    data = json.loads(p.stdout)
    return p.returncode, {t["nodeid"].split("::")[-1]: t for r in data["runs"] for t in r["tests"]}


needs_kvm = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="the selftest run needs a usable /dev/kvm")


@needs_kvm
def test_selftests_error_when_the_probe_fails(tmp_path):
    rc, tests = _selftest(tmp_path, "(unsync or lazy_split) and not nested", S15_PROBE="fails")
    assert rc == 1
    assert tests and all(t["outcome"] == "error" for t in tests.values()), tests
    assert all("unknown unit 7" in t["reason"] for t in tests.values())


@needs_kvm
def test_not_observable_inside_the_bed_is_a_failure(tmp_path):
    # Only test_unsync: it changes nothing on the host even where it believes it is in the bed.
    rc, tests = _selftest(tmp_path, "unsync and not nested", S15_PROBE="blind", S15_IN_BED="1")
    assert rc == 1
    (t,) = tests.values()
    assert t["outcome"] == "error" and "inside the bed KVM's MMU must be observable" in t["reason"]


@needs_kvm
def test_not_observable_outside_the_bed_is_a_skip(tmp_path):
    rc, tests = _selftest(tmp_path, "unsync and not nested", S15_PROBE="blind")
    assert rc == 2          # its one test skipped: nothing was tested (kvmpy.selftest.report)
    (t,) = tests.values()
    assert t["outcome"] == "skipped" and "SPTE stats not observable at CPL0" in t["reason"]


class _Stats:
    def __init__(self, values):
        self.values = list(values)

    def read(self, name):
        assert name == "insn_emulation"
        return self.values.pop(0)


class _Vcpu:
    def __init__(self, *values):
        self.stats = _Stats(values)


@pytest.fixture
def native_steps(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from selftests.privilege import NativeSteps
    return NativeSteps


@pytest.mark.parametrize("emulated_ring0", [True, False])
def test_a_step_kvm_emulated_is_a_skip_only_where_ring0_is_emulated(native_steps, probe_result, monkeypatch,
                                                                     emulated_ring0):
    probe_result(MmuProbe(ring0() if emulated_ring0 else ring0(spte_4k=16, emulated=0), cpl3()))
    monkeypatch.setattr(hostinfo, "loaded_vendor_module", lambda: "kvm_pvm" if emulated_ring0 else "kvm_amd")
    steps = native_steps(_Vcpu(10, 11, 11, 40), 3)
    steps.check("a write pass")            # +1: the report
    steps.check("a read pass")             # +0: an OUT the CPU skipped itself
    with pytest.raises(Exception) as ei:  # by hand: an escaping RequirementError would be a skip
        steps.check("a write pass")        # +29: guest code emulated
    assert isinstance(ei.value, RequirementError if emulated_ring0 else AssertionError), repr(ei.value)
    text = str(ei.value)
    assert "a write pass: insn_emulation +29 at CPL3" in text
    assert text.startswith("kvm_pvm emulated this step") == emulated_ring0
    assert steps.checked == 3


def test_a_step_without_native_work_is_not_checked(native_steps, probe_result):
    probe_result(MmuProbe(ring0(), cpl3()))
    steps = native_steps(_Vcpu(0, 60, 61), 3)
    steps.mark()                           # kernel calls: ~60 emulated instructions, not checked
    steps.check("writing PTEs")            # +1
    assert steps.checked == 1


@pytest.mark.parametrize("emulated_ring0", [True, False])
def test_a_step_whose_emulation_is_the_defect_fails_even_where_ring0_is_emulated(native_steps, probe_result,
                                                                                  monkeypatch, emulated_ring0):
    """test_unsync's PTE writes at CPL3 on kvm_pvm: emulated, they are what the test looks for."""
    probe_result(MmuProbe(ring0() if emulated_ring0 else ring0(spte_4k=16, emulated=0), cpl3()))
    monkeypatch.setattr(hostinfo, "loaded_vendor_module", lambda: "kvm_pvm" if emulated_ring0 else "kvm_amd")
    steps = native_steps(_Vcpu(10, 11, 40, 41), 3)
    steps.check("writing PTEs", "PTE writes emulated instead of unsynced")        # +1: the report
    with pytest.raises(Exception) as ei:
        steps.check("writing PTEs", "PTE writes emulated instead of unsynced")    # +29
    assert type(ei.value) is AssertionError, repr(ei.value)
    assert str(ei.value).startswith("PTE writes emulated instead of unsynced (writing PTEs: insn_emulation +29 at CPL3")
    steps.check("writing PTEs", "PTE writes emulated instead of unsynced")        # +1 again: fine
    assert steps.checked == 3


def test_only_a_probe_that_saw_emulation_makes_a_level_a_skip(probe_result):
    """No SPTEs at a level is "not observable" (a skip) only where the probe saw KVM emulate the
    guest there; no SPTEs from accesses KVM did not emulate means broken stats: an error."""
    assert ring0().emulated and not ring0(emulated=3).emulated and not ring0(spte_4k=16, emulated=0).emulated
    assert cpl3(emulated=2).emulated and not cpl3(emulated=1).emulated
    blind = MmuProbe(ring0(emulated=3), cpl3())    # ring 0 ran natively (3 of 49 emulated), no SPTEs
    assert "the SPTE stats are broken" in blind.ring0.meaning()
    probe_result(blind)
    assert hostinfo.require_mmu_visible(3).levels == (3,)
    with pytest.raises(Exception) as ei:           # by hand: an escaping RequirementError would be a skip
        hostinfo.require_mmu_visible(0)
    assert type(ei.value) is MmuProbeError, repr(ei.value)
    assert "SPTE stats broken at CPL0" in str(ei.value) and "ran natively" in str(ei.value)
    probe_result(MmuProbe(ring0(spte_4k=16, emulated=0), cpl3(emulated=5)))   # CPL3 emulated: a skip
    with pytest.raises(RequirementError, match="not observable at CPL3 .*KVM emulated the guest's writes"):
        hostinfo.require_mmu_visible(3)
