"""kvmpy.faults: the registry, KVMPY_FAULTS, and one hook per fault at the place it names."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import kvmpy
from kvmpy import faults
from kvmpy.bitmap import DirtyBitmap
from kvmpy.dirtylog.collectors import ClearDirtyLogCollector
from kvmpy.memory import PAGE_4K

PKG = Path(kvmpy.__file__).resolve().parent
ROOT = PKG.parent


def hooks() -> dict[str, list[str]]:
    """fault name -> the modules whose source marks a hook for it (``# FAULT: name``)."""
    out: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "faults.py":
            continue
        module = ".".join(("kvmpy",) + path.relative_to(PKG).with_suffix("").parts)
        for name in re.findall(r"# FAULT: ([\w-]+)", path.read_text()):
            out.setdefault(name, []).append(module)
    return out


def test_every_fault_has_one_hook_where_the_registry_says():
    found = hooks()
    assert sorted(found) == sorted(faults.FAULTS), "a hook without a registry entry, or an entry without a hook"
    for name, modules in found.items():
        assert len(modules) == 1, f"{name}: hooks in {modules} (one place only)"
        assert faults.FAULTS[name].hook.startswith(modules[0] + "."), f"{name}: hook in {modules[0]}"


def test_every_fault_names_runs_that_must_fail():
    for f in faults.FAULTS.values():
        assert f.host or f.bed or f.unit, f"{f.name}: no run is required to catch it"
        for path in f.unit:
            assert (ROOT / path).is_file(), f"{f.name}: no unit-test file {path}"


def test_parse_and_unknown_names():
    assert faults.parse("") == frozenset()
    assert faults.parse("probe-fails, ring-never-reset") == {"probe-fails", "ring-never-reset"}
    with pytest.raises(faults.FaultError, match="unknown fault.*no-such-fault.*known: collector-drops-page"):
        faults.parse("probe-fails,no-such-fault")
    with pytest.raises(faults.FaultError, match="no fault named"):
        faults.active("typo")


def test_injected_switches_on_for_the_block_only():
    assert not faults.active("probe-fails") and faults.env() == {}
    with faults.injected("probe-fails", "ring-never-reset"):
        assert faults.active("probe-fails")
        assert faults.env() == {faults.ENV: "probe-fails,ring-never-reset"}
        with pytest.raises(faults.FaultError, match="injected fault probe-fails"):
            faults.check("probe-fails")
    assert not faults.active("probe-fails")
    faults.check("probe-fails")


class FakeVm:
    """Answers GET with a bitmap of every page and records the bits each CLEAR was given."""

    def __init__(self) -> None:
        self.cleared: set[int] = set()

    def get_dirty_log(self, slot):
        return DirtyBitmap.full(130)

    def clear_dirty_log(self, slot, bitmap, first, num):
        self.cleared |= {p for p in bitmap.pages() if first <= p < first + num}


class FakeSlot:
    slot, npages, size = 1, 130, 130 * PAGE_4K


@pytest.mark.parametrize("chunk", [None, 64])
def test_clear_misses_last_word_keeps_the_last_partial_word_dirty(chunk):
    c, vm = ClearDirtyLogCollector(chunk=chunk), FakeVm()
    assert c.collect(vm, [FakeSlot()]) == {1: list(range(130))}
    assert vm.cleared == set(range(130))
    vm = FakeVm()
    with faults.injected("clear-misses-last-word"):
        assert c.collect(vm, [FakeSlot()]) == {1: list(range(130))}   # reported as usual...
    assert vm.cleared == set(range(128))                                # ...but pages 128, 129 never cleared


def test_faults_reach_the_suite_inside_the_bed():
    """The bed passes on only the environment its job names: KVMPY_FAULTS must be in it."""
    import argparse

    from kvmpy.bed.job import job_script
    from kvmpy.bed.testbed import Bed
    from kvmpy.selftest import bed_runner

    args = argparse.Namespace(backend="qemu", accel="tcg", kernel_version=None, kernel=None, modules=None,
                              timeout=None, param=[], keyword="splitting", pytest_args=[])
    bed = Bed(bed_runner.bed_options(args))
    assert faults.ENV not in job_script(bed.request(bed_runner.suite_job(args)), inherit_env={})
    with faults.injected("stats-names-swapped"):
        script = job_script(bed.request(bed_runner.suite_job(args)), inherit_env={})
    assert f"export {faults.ENV}=stats-names-swapped\n" in script


def test_unknown_fault_is_reported_by_kvmpy_info_as_a_usage_error(monkeypatch):
    """Not as "MMU probe failed" (a KVM problem): KVM is not even asked."""
    from kvmpy import hostinfo

    def no_kvm(*a, **kw):
        raise AssertionError("/dev/kvm was opened")

    monkeypatch.setenv(faults.ENV, "bogus")
    monkeypatch.setattr(faults, "_enabled", None)
    monkeypatch.setattr(hostinfo, "Kvm", no_kvm)
    facts = hostinfo.gather(probe=True)
    assert "unknown fault(s) bogus" in facts.usage_error and facts.error == facts.usage_error
    assert facts.mmu_probe_error == "" and facts.mmu_probe is None
    text = hostinfo.format_facts(facts)
    assert "usage error   KVMPY_FAULTS: unknown fault(s) bogus" in text
    assert "MMU probe" not in text and "/dev/kvm" not in text


def test_kvmpy_info_exits_2_for_an_unknown_fault(monkeypatch, capsys):
    from kvmpy import cli

    monkeypatch.setenv(faults.ENV, "bogus")
    monkeypatch.setattr(faults, "_enabled", None)
    assert cli.main(["info", "--no-probe"]) == 2
    assert "unknown fault(s) bogus" in capsys.readouterr().out
