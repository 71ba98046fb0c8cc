"""GuestVm and SteppedGuest misuse: a clear KvmError, and the object stays usable (needs /dev/kvm)."""
from __future__ import annotations

import os

import pytest

from kvmpy.errors import KvmError
from kvmpy.guest import programs
from kvmpy.guest.stepper import SteppedGuest
from kvmpy.guest.vm import GuestVm
from kvmpy.memory import PAGE_2M, PAGE_4K
from kvmpy.x86 import cpu
from kvmpy.x86.paging import PagingError

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")

GiB = 1 << 30


@pytest.fixture(scope="module", autouse=True)
def _guests_built():
    try:
        programs.find("hello")
    except programs.GuestProgramError as e:
        pytest.skip(f"cannot build guest programs: {e}")


def test_a_memslot_over_the_ucall_mmio_address_is_refused():
    with GuestVm("hello", user_mode=True) as g:
        with pytest.raises(KvmError, match=r"memslot 1 at 0xc0000000\+0x40000000 would cover the ucall MMIO "
                                           r"address 0xf0000000"):
            g.add_memory(slot=1, gpa=0xC000_0000, size=GiB)
        assert 1 not in g.vm.memslots
        g.add_memory(slot=1, gpa=0x1_0000_0000, size=PAGE_2M)    # elsewhere is fine
        g.run(timeout=10)                                         # ucalls still reach the host


def test_the_page_table_slot_does_not_replace_a_mapping_of_the_test():
    with GuestVm("hello") as g:
        slot_gpa = min(1 << cpu.phys_bits(g.cpuid), 1 << 47) - GiB - (64 << 20)
        g.map(slot_gpa, 0x400000, PAGE_2M, PAGE_2M)          # the test's own mapping there
        with pytest.raises(KvmError, match=rf"page-table memslot \({slot_gpa:#x}\+0x4000000.*cannot be "
                                           rf"identity mapped: GVA {slot_gpa:#x} is already mapped"):
            g.map(0x100 * GiB, 0, 500 << 20)                  # needs the page-table memslot
        assert g.pt.translate(slot_gpa).gpa == 0x400000
        assert g.pt_slot is None and len(g.vm.memslots) == 1
        g.run(timeout=10)


def test_guest_maps_work_after_the_page_table_slot_is_full():
    with GuestVm("hello") as g:
        g.map(0x100 * GiB, 0, 500 << 20)                      # adds the page-table memslot
        with pytest.raises(PagingError, match="exhausted"):
            g.map(0x200 * GiB, 0, 40 * GiB)                   # more than the slot holds
        g.map(0x100 * GiB, 0x1000, PAGE_4K)                   # needs no new table
        assert g.pt.translate(0x100 * GiB).gpa == 0x1000
        assert g.pt.pages_free == 0
        g.run(timeout=10)


@pytest.mark.parametrize("call,error,match", [
    (lambda g: g.map(0x4000_0000, 0x4000_0000, 0x3000, page_size=0x3000), PagingError,
     "page size 0x3000 is not 4K, 2M or 1G"),
    (lambda g: g.map(0x4000_0000, 0x4000_0000, 0x4000 / 2), PagingError, "size 8192.0 is not an int"),
    (lambda g: g.map(0x4000_0000, 1 << 52, 1 << 40), PagingError, "beyond the"),   # before a slot for it
    (lambda g: g.write_global("in_value", 1, offset=16), KvmError, r"offset 16 is outside 'in_value'"),
    (lambda g: g.write_global("out_text", "abc"), KvmError, "must be an int or bytes"),
    (lambda g: g.where(5), KvmError, "no vCPU 5: this GuestVm has 1"),
    (lambda g: g.run(timeout=float("nan")), KvmError, "run timeout must be a number of seconds, not nan"),
])
def test_bad_arguments_are_kvm_errors_and_lose_nothing(call, error, match):
    with GuestVm("globals") as g:
        with pytest.raises(error, match=match):
            call(g)
        assert g.pt_slot is None and g.threads is None
        g.write_global("in_value", 5)
        g.run(timeout=10)
        assert g.read_global("out_value") != 0


def test_results_read_after_close_are_a_clear_error():
    with GuestVm("globals") as g:
        g.write_global("in_value", 5)
        g.run(timeout=10)
    for call in (lambda: g.read_global("out_value"), lambda: g.read_global_bytes("out_value"),
                 lambda: g.write_global("in_value", 1), lambda: g.global_view("out_value"),
                 lambda: g.map(0x4000_0000, 0, PAGE_4K), lambda: g.add_memory(1, GiB, PAGE_4K)):
        with pytest.raises(KvmError, match=r"GuestVm\(globals.elf\) is closed"):
            call()


def test_stepper_calls_before_start_say_so():
    g = GuestVm("hello")
    s = SteppedGuest(g, stop={})
    for name, call in (("wait_parked", lambda: s.wait_parked(1)), ("step", lambda: s.step({}, 1)),
                       ("release", lambda: s.release({})), ("park_by_kick", s.park_by_kick),
                       ("kick_all", s.kick_all)):
        with pytest.raises(KvmError, match=rf"hello: {name}\(\) before start\(\)"):
            call()
    s.close()
    assert g.vm is None


@pytest.mark.parametrize("call, name", [(lambda g: g.close(), r"GuestVm\(hello.elf\).close\(\)"),
                                        (lambda g: g.threads.stop(), r"stop\(\)")])
def test_closing_from_a_hook_ends_the_run_with_a_clear_error(call, name):
    g = GuestVm("hello")
    with pytest.raises(KvmError, match=name + r" called on a vCPU thread \(kvmpy-vcpu0, from a hook\): it would wait"):
        g.run(timeout=10, on_sync=lambda i, stage, args: call(g))
    assert g.vm is not None          # the hook's close did nothing
    g.close()
    assert g.vm is None
