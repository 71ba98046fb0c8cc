"""Stats fds on this KVM: lookups, lazy snapshots and layouts shared between fds of one kind."""
from __future__ import annotations

import os

import pytest

from kvmpy.abi import ioctl_int
from kvmpy.errors import KvmError
from kvmpy.guest.vm import GuestVm
from kvmpy.stats import Snapshot, Stats
from kvmpy.stats_layout import StatsLayout


def _open(obj) -> Stats:
    return Stats(ioctl_int(obj.fd, "KVM_GET_STATS_FD", 0, obj.name), obj.name)


def test_reads_snapshots_and_the_full_parse_agree(kvm):
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        for stats in (vm.stats, vcpu.stats):
            snap = stats.snapshot()
            full = StatsLayout.parse(stats.layout._buf).decode(os.pread(stats.fd, stats.layout.data_size,
                                                                        stats.layout.data_offset))
            assert dict(snap) == full and len(snap) == len(stats.names) == len(full)
            for name in stats.names:
                assert snap[name] == full[name]
                d = stats.desc(name)
                value = stats.read(name)
                assert isinstance(value, tuple) == (d.is_histogram or d.size > 1)
            assert snap - snap == {k: (tuple(0 for _ in v) if isinstance(v, tuple) else 0) for k, v in full.items()}
            with pytest.raises(KeyError, match="has no stat 'nope'"):
                stats.read("nope")
            assert "nope" not in snap and not stats.has("nope")


def test_a_snapshot_is_decoded_only_from_its_own_read(kvm):
    with GuestVm("hello", kvm=kvm) as g:
        stats = g.vcpus[0].stats
        before = stats.snapshot()
        exits0 = before["exits"]
        g.run()
        after = stats.snapshot()
        assert before["exits"] == exits0 and dict(before)["exits"] == exits0   # its own bytes
        assert isinstance(after, Snapshot) and after["exits"] > exits0
        assert (after - before)["exits"] == after["exits"] - exits0


def test_fds_of_one_kind_share_the_parsed_layout_not_their_id(kvm):
    with kvm.create_vm() as vm1, kvm.create_vm() as vm2:
        a, b = _open(vm1), _open(vm2)
        try:
            assert a.layout is b.layout
            for st in (a, b):       # each its own id, from its own bytes
                off, size = st.layout.id_offset, st.layout.name_size
                assert st.id == os.pread(st.fd, size, off).split(b"\0")[0].decode() and st.id.startswith("kvm-")
            assert a.read("pages_4k") == b.read("pages_4k") == 0
            vcpu_stats = _open(vm1.create_vcpu(0))
            assert vcpu_stats.layout is not a.layout       # another header and descriptors
            vcpu_stats.close()
        finally:
            a.close()
            b.close()
        with pytest.raises(KvmError, match="after close"):
            a.read("pages_4k")
        with pytest.raises(KvmError, match="after close"):
            a.snapshot()
