"""`kvmpy perf dirty-log`: options, the module-parameter guard, and small real runs (no timing asserted)."""
from __future__ import annotations

import json
import os
import signal

import pytest

from kvmpy.abi import lib
from kvmpy.cli import build_parser, main
from kvmpy.errors import KvmError, RequirementError
from kvmpy.guest.vm import GuestVm
from kvmpy.memory import PAGE_2M, PAGE_4K
from kvmpy.perf import dirty_log
from kvmpy.perf.cli import options_from, parse_size
from kvmpy.perf.memstress import TEST_GPA, Memstress, MemstressConfig
from kvmpy.perf.params import module_param
from kvmpy.x86.paging import walk

SMALL = MemstressConfig(vcpus=2, vcpu_bytes=128 * PAGE_4K, user_mode=True)


def test_sizes_and_options_as_the_c_test_reads_them():
    assert [parse_size(s) for s in ("4096", "64M", "64m", "3G", "1t", "2k")] == [
        4096, 64 << 20, 64 << 20, 3 << 30, 1 << 40, 2048]
    args = build_parser().parse_args(["perf", "dirty-log", "-v2", "-b64M", "-i3", "-w", "30", "-a", "-o",
                                      "-s", "anonymous_hugetlb_2mb", "-x2", "--clear-chunk", "128", "-r", "5"])
    opts = options_from(args)
    assert (opts.memstress.vcpus, opts.memstress.vcpu_bytes, opts.iterations, opts.write_percent) == (2, 64 << 20, 3, 30)
    assert opts.random_access and not opts.memstress.partition and opts.manual_protect
    assert opts.memstress.backing.page_size == PAGE_2M and opts.memstress.slots == 2 and opts.clear_chunk == 128
    assert opts.memstress.seed == 5
    opts.check()
    assert not options_from(build_parser().parse_args(["perf", "dirty-log", "-g"])).manual_protect
    for bad in (["-bfoo"], ["-s", "nonsense"], ["--eager-split", "maybe"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["perf", "dirty-log", *bad])


@pytest.mark.parametrize("change, message", [
    (dict(iterations=1), "at least two iterations"),
    (dict(write_percent=101), "write percentage"),
    (dict(clear_chunk=100), "multiple of 64"),
    (dict(dirty_ring=1000), "power of two"),
    (dict(memstress=MemstressConfig(vcpus=17)), "vCPUs"),
    (dict(memstress=MemstressConfig(vcpu_bytes=5000)), "multiple of 4 KiB"),
    (dict(memstress=MemstressConfig(vcpus=3, vcpu_bytes=PAGE_4K, slots=2)), "divided evenly"),
    (dict(memstress=MemstressConfig(nested=True, user_mode=True)), "ring 0"),
])
def test_bad_options_are_refused_before_anything_runs(change, message):
    with pytest.raises(KvmError, match=message):
        dirty_log.DirtyLogOptions(**change).check()


def test_module_param_is_set_for_the_block_and_restored(tmp_path):
    param = tmp_path / "kvm" / "parameters" / "eager_page_split"
    param.parent.mkdir(parents=True)
    param.write_text("Y\n")
    lines = []
    with module_param("kvm", "eager_page_split", False, lines.append, root=str(tmp_path)):
        assert param.read_text() == "N"
    assert param.read_text() == "Y" and len(lines) == 2
    with pytest.raises(ZeroDivisionError):
        with module_param("kvm", "eager_page_split", False, lines.append, root=str(tmp_path)):
            1 / 0
    assert param.read_text() == "Y"
    with module_param("kvm", "eager_page_split", True, lines.append, root=str(tmp_path)):   # already Y
        pass
    assert len(lines) == 4
    with pytest.raises(RequirementError, match="no such module parameter"):
        with module_param("kvm", "nope", True, lines.append, root=str(tmp_path)):
            pass


def test_module_param_is_restored_when_its_printout_fails_or_a_stop_comes(tmp_path):
    """The change was printed before the restore's try: a printout that failed (stdout a
    closed pipe) or a Ctrl-C while it printed left the parameter changed."""
    param = tmp_path / "kvm" / "parameters" / "eager_page_split"
    param.parent.mkdir(parents=True)
    param.write_text("Y\n")

    def broken_stdout(line: str) -> None:
        raise OSError(32, "Broken pipe")

    with pytest.raises(OSError, match="Broken pipe"):
        with module_param("kvm", "eager_page_split", False, broken_stdout, root=str(tmp_path)):
            raise AssertionError("the block ran although the printout failed")
    assert param.read_text() == "Y"

    def ctrl_c_while_printing(line: str) -> None:
        if "back to" not in line:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        with module_param("kvm", "eager_page_split", False, ctrl_c_while_printing, root=str(tmp_path)):
            raise AssertionError("the block ran although Ctrl-C came first")
    assert param.read_text() == "Y"


def test_dirty_bitmap_run_reports_every_written_page(kvm):
    lines = []
    rep = dirty_log.run(dirty_log.DirtyLogOptions(memstress=SMALL, iterations=3), out=lines.append)
    pages = SMALL.total_pages
    assert [it.dirty_pages for it in rep.iterations] == [pages] * 3
    assert lines[0] == "Test iterations: 3" and any(line.startswith("Populate memory time: ") for line in lines)
    assert sum(line.startswith("Iteration ") for line in lines) == 3 * (3 if "manual" in rep.mode else 2)
    assert rep.stats["populate"].get("pages_4k", 0) >= pages    # CPL3 guest: SPTEs for every page


def test_dirty_ring_run_harvests_every_written_page(kvm):
    opts = dirty_log.DirtyLogOptions(memstress=SMALL, iterations=2, dirty_ring=4096)
    try:
        rep = dirty_log.run(opts, out=lambda line: None)
    except RequirementError as e:
        pytest.skip(str(e))
    assert rep.mode.startswith("dirty ring")
    # A ring larger than a pass: no ring-full exit, one entry per written page per iteration.
    assert rep.ring_full_harvested == 0
    assert [it.dirty_pages for it in rep.iterations] == [SMALL.total_pages] * 2


def test_json_output(kvm, capsys):
    assert main(["perf", "dirty-log", "-v1", "-b256k", "-i2", "--user-mode", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["privilege"] == "CPL3" and len(out["iterations"]) == 2
    assert out["guest_memory"] == [TEST_GPA, TEST_GPA + (256 << 10)]
    assert set(out["phases"]) == {"populate", "enable", "disable"}


def test_4k_mappings_past_the_low_pool_use_a_page_table_memslot(kvm):
    """600 MiB of 4K mappings need more table pages than the runtime's low pool has: the tables
    go to a memslot of their own, which the guest walks like any other."""
    big = MemstressConfig(vcpu_bytes=600 << 20, user_mode=True)
    with Memstress(big, kvm=kvm) as ms:
        g = ms.g
        assert g.pt_slot is not None and g.pt.pages_used > 240
        last = TEST_GPA + (600 << 20) - PAGE_4K
        t = walk(g.vm, g.pt.cr3, last)
        assert t.gpa == last and g.pt_slot.contains(t.pte_gpa)
        # Touch only the last 16 pages, whose tables are in the page-table memslot.
        g.write_global("vcpu_gva", last - 15 * PAGE_4K)
        g.write_global("vcpu_pages", 16)
        ms.start(timeout=60)
        ms.run_pass(timeout=60)
        assert g.vm.read_u64(last) == 0x0123456789ABCDEF


def test_guest_vm_page_table_slot_is_identity_mapped(kvm):
    with GuestVm("hello", kvm=kvm) as g:
        g.add_memory(1, 1 << 32, 600 << 20)
        g.map(1 << 32, 1 << 32, 600 << 20)
        slot = g.pt_slot
        assert slot is not None and slot.slot == g.vm.check_extension(lib.KVM_CAP_NR_MEMSLOTS) - 1
        assert walk(g.vm, g.pt.cr3, slot.gpa + 5 * PAGE_4K).gpa == slot.gpa + 5 * PAGE_4K
