"""`kvmpy perf dirty-log` inputs: options that would not apply, values KVM or the host would refuse,
faults, and an output that cannot be written -- each a clear error before the VM is built.

Most tests replace the memstress VM with one that fails the test if it is built.
"""
from __future__ import annotations

import json
import math

import pytest

from kvmpy import faults
from kvmpy.abi import lib
from kvmpy.cli import main
from kvmpy.errors import KvmError, RequirementError
from kvmpy.memory import PAGE_4K
from kvmpy.perf import dirty_log
from kvmpy.dirty_ring import min_entries
from kvmpy.perf.dirty_log import DirtyLogOptions, OptionConflict
from kvmpy.perf.memstress import MAX_SLOT_PAGES, MemstressConfig

SMALL = MemstressConfig(vcpus=2, vcpu_bytes=128 * PAGE_4K, user_mode=True)


@pytest.fixture
def no_vm(monkeypatch):
    """Building the memstress VM fails the test."""
    def built(*a, **kw):
        raise AssertionError("the VM was built")

    monkeypatch.setattr(dirty_log, "Memstress", built)


class FakeKvm:
    def __init__(self, **caps) -> None:
        self.caps = {getattr(lib, k): v for k, v in caps.items()}

    def check_extension(self, cap: int) -> int:
        return self.caps.get(cap, 0)


RING_KVM = dict(KVM_CAP_DIRTY_LOG_RING=1 << 20, KVM_CAP_DIRTY_LOG_RING_ACQ_REL=1 << 20,
                KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2=3)


# --- 1: options of which one would do nothing --------------------------------------------

@pytest.mark.parametrize("argv, flags", [
    (["-g", "--clear-chunk", "64"], ("-g", "--clear-chunk")),
    (["--dirty-ring", "256", "--clear-chunk", "64"], ("--dirty-ring", "--clear-chunk")),
    (["--dirty-ring", "256", "-g"], ("--dirty-ring", "-g")),
    (["--dirty-ring", "256", "-g", "--clear-chunk", "64"], ("--dirty-ring", "--clear-chunk")),
    (["-o"], ("-o", "-v 1")),
    (["-r", "7"], ("-r", "-w 100", "-a")),
    (["-r", "7", "-w", "0"], ("-r", "-w 0", "-a")),
])
def test_options_that_would_not_apply_are_a_usage_error(no_vm, capsys, argv, flags):
    assert main(["perf", "dirty-log", "-b4K", *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    for flag in flags:
        assert flag in err


@pytest.mark.parametrize("argv", [["-r", "7", "-a"], ["-r", "7", "-w", "50"], ["-o", "-v", "2"],
                                  ["--clear-chunk", "64"], ["-g"], ["--dirty-ring", "256"]])
def test_options_that_apply_pass_the_checks(argv):
    from kvmpy.cli import build_parser
    from kvmpy.perf.cli import check_args, options_from

    args = build_parser().parse_args(["perf", "dirty-log", "-b64K", *argv])
    check_args(args)
    opts = options_from(args)
    opts.check()
    opts.check_host(FakeKvm(**RING_KVM))


def test_conflicts_are_refused_by_the_library_too():
    for change in (dict(manual_protect=False, clear_chunk=64), dict(dirty_ring=256, clear_chunk=64),
                   dict(dirty_ring=256, manual_protect=False)):
        with pytest.raises(OptionConflict):
            DirtyLogOptions(memstress=SMALL, **change).check()


def test_clear_chunk_without_manual_protect_in_kvm_is_refused():
    opts = DirtyLogOptions(memstress=SMALL, clear_chunk=64)
    with pytest.raises(RequirementError, match="--clear-chunk.*MANUAL_DIRTY_LOG_PROTECT2"):
        opts.check_host(FakeKvm(KVM_CAP_DIRTY_LOG_RING=1 << 20))
    opts.check_host(FakeKvm(**RING_KVM))


# --- 2: faults ---------------------------------------------------------------------------

def test_unknown_fault_is_a_usage_error_before_the_vm(no_vm, monkeypatch, capsys):
    monkeypatch.setenv(faults.ENV, "bogus")
    monkeypatch.setattr(faults, "_enabled", None)
    assert main(["perf", "dirty-log", "-b4K"]) == 2
    out = capsys.readouterr()
    assert "unknown fault(s) bogus" in out.err and "Traceback" not in out.err and out.out == ""


def test_a_run_with_faults_says_so_in_the_printout_and_the_json(kvm, capsys):
    lines = []
    with faults.injected("logging-never-disabled"):
        rep = dirty_log.run(DirtyLogOptions(memstress=SMALL), out=lines.append)
        assert main(["perf", "dirty-log", "-v1", "-b16K", "--user-mode", "--json"]) == 0
    assert lines[0].startswith("FAULTS INJECTED") and lines[-1] == lines[0]
    assert "logging-never-disabled" in lines[0] and "not a measurement" in lines[0]
    assert rep.to_dict()["faults"] == ["logging-never-disabled"]
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["faults"] == ["logging-never-disabled"] and "FAULTS INJECTED" in doc["warning"]
    assert "FAULTS INJECTED" in out.err
    # Without faults: the C test's first line, and an empty list.
    lines = []
    rep = dirty_log.run(DirtyLogOptions(memstress=SMALL), out=lines.append)
    assert lines[0].startswith("Test iterations") and rep.to_dict()["faults"] == []


# --- 3: the dirty ring's size ------------------------------------------------------------

@pytest.mark.parametrize("entries", [64, 128])
def test_ring_smaller_than_a_page_is_refused_before_the_vm(entries):
    with pytest.raises(KvmError, match=f"--dirty-ring {entries}: KVM needs a ring of at least 256 entries"):
        DirtyLogOptions(memstress=SMALL, dirty_ring=entries).check_host(FakeKvm(**RING_KVM))


def test_ring_limits_from_kvm_and_pml(tmp_path):
    with pytest.raises(KvmError, match="maximum is 65536 entries"):
        DirtyLogOptions(memstress=SMALL, dirty_ring=1 << 17).check_host(FakeKvm(**RING_KVM))
    with pytest.raises(RequirementError, match="no dirty ring"):
        DirtyLogOptions(memstress=SMALL, dirty_ring=256).check_host(FakeKvm())
    assert min_entries(str(tmp_path))[0] == 256
    pml = tmp_path / "kvm_intel" / "parameters" / "pml"
    pml.parent.mkdir(parents=True)
    pml.write_text("Y\n")
    low, why = min_entries(str(tmp_path))
    assert low == 1024 and "kvm_intel.pml" in why     # 64 + 512 reserved entries


def test_small_ring_via_the_command_line_builds_no_vm(no_vm, kvm, capsys):
    if not (kvm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING) or kvm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)):
        pytest.skip("KVM offers no dirty ring")
    assert main(["perf", "dirty-log", "-b4K", "--dirty-ring", "64"]) == 2
    assert "at least 256 entries" in capsys.readouterr().err


# --- 4: timeout and size -----------------------------------------------------------------

@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf])
def test_timeout_must_be_finite_and_positive(timeout):
    with pytest.raises(KvmError, match="timeout"):
        DirtyLogOptions(memstress=SMALL, timeout=timeout).check()


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf"])
def test_timeout_on_the_command_line(no_vm, capsys, text):
    assert main(["perf", "dirty-log", "-b4K", "--timeout", text]) == 2
    assert "timeout" in capsys.readouterr().err


def test_sizes_that_do_not_fit_are_refused(no_vm, capsys):
    with pytest.raises(KvmError, match="does not fit"):
        MemstressConfig(vcpu_bytes=99999999 << 40).check()
    assert main(["perf", "dirty-log", "-b", "99999999T"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "Traceback" not in err and "ssize_t" not in err
    big = MemstressConfig(vcpu_bytes=(MAX_SLOT_PAGES + 1) * PAGE_4K)
    with pytest.raises(KvmError, match="per memslot; split the memory with -x"):
        big.check()
    MemstressConfig(vcpu_bytes=(MAX_SLOT_PAGES + 1) * PAGE_4K * 2, slots=4).check()


def test_memory_beyond_mem_available_is_refused(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   22000000 kB\n")
    with pytest.raises(RequirementError, match="MemAvailable"):
        MemstressConfig(vcpu_bytes=1 << 40).check_host(str(meminfo))
    MemstressConfig(vcpu_bytes=8 << 30, vcpus=2).check_host(str(meminfo))     # 16 GiB fits
    with pytest.raises(RequirementError, match="MemAvailable"):
        MemstressConfig(vcpu_bytes=11 << 30, vcpus=2).check_host(str(meminfo))


# --- 7: an output that cannot be written -------------------------------------------------

class Report:
    def to_dict(self) -> dict:
        return {"x": "y" * 100_000}


@pytest.mark.parametrize("json_out", [True, False])
def test_full_stdout_is_a_clear_error(monkeypatch, capsys, json_out):
    def run(opts, out):
        out("Test iterations: 2")
        return Report()

    monkeypatch.setattr(dirty_log, "run", run)
    with open("/dev/full", "w") as full:
        monkeypatch.setattr("sys.stdout", full)
        code = main(["perf", "dirty-log", "-b4K", *(["--json"] if json_out else [])])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot write to standard output: No space left on device" in err and "Traceback" not in err


def test_sizes_are_checked_against_the_guests_maxphyaddr(kvm, monkeypatch):
    """A CPU with fewer physical address bits has less room for test memory: the bound is the
    guest's own MAXPHYADDR (GuestVm.gpa_limit), checked before any test memory is added."""
    from kvmpy.guest import vm as guest_vm
    from kvmpy.perf.memstress import Memstress, RESERVED_TOP

    config = MemstressConfig(vcpu_bytes=62 << 30)      # 4 GiB + 62 GiB: fits 47 bits, not 36
    config.check()
    monkeypatch.setattr(guest_vm.cpu, "phys_bits", lambda cpuid: 36)
    with pytest.raises(KvmError, match=r"must end by 0xf80000000 \(at most 58 GiB in all, in a "
                                       r"36-bit guest physical address space\)"):
        Memstress(config, kvm=kvm)
    assert (1 << 36) - RESERVED_TOP == 0xF80000000
