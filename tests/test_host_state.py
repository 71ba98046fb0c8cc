"""selftests/host_state.py against a fake /proc and /sys: who may write, and that every
write is undone whatever fails (issue 13 item 7). Also the bed's mark, from the real
init's mark_bed to kvmpy.bed_mark.in_bed."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from bed_fakes import busybox_sh
from kvmpy.bed import initramfs
from kvmpy.bed_mark import CMDLINE_WORD, in_bed
from kvmpy.errors import KvmError, RequirementError
from kvmpy.memory import PAGE_1G, PAGE_2M
from kvmpy.selftests import host_state as hs

BOOT = "6e1c9a0e-3d5b-4c57-9a53-0f3b2b1c7d11"
POOL_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
POOL_1G = "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"


class FakeHost(hs.HostFs):
    """A tree of files that acts, for the files host_state writes, like the kernel.

    A pool grows to what is asked, but only to ``limit[size]`` pages until memory was
    compacted (if ``compaction_helps``). ``fail`` maps a path to the write numbers (1-based) that fail with EIO;
    ``on_write(path, value)`` runs before each write (to send a signal, say).
    """

    def __init__(self, root, bed=True, limit=None, compaction_helps=True):
        super().__init__(str(root))
        self.compaction_helps = compaction_helps
        self.writes: list[tuple[str, str]] = []
        self.fail: dict[str, set[int]] = {}
        self.on_write = None
        self.limit = limit or {}
        self.compacted = False
        files = {
            "/proc/cmdline": f"console=ttyS0 quiet {CMDLINE_WORD if bed else ''} kvm.tdp_mmu=Y",
            "/proc/sys/kernel/random/boot_id": BOOT,
            "/run/kvmpy-bed/boot_id": BOOT if bed else "",
            "/proc/meminfo": "MemTotal:        4025924 kB\nMemFree: 1 kB",
            hs.DROP_CACHES: "0", hs.COMPACT_MEMORY: "0",
            hs.EAGER_PARAM: "Y",
            hs.NX_PARAM: "N", hs.NX_RATIO_PARAM: "60", hs.NX_PERIOD_PARAM: "0",
        }
        for kb in (2048, 1048576):
            d = f"/sys/kernel/mm/hugepages/hugepages-{kb}kB/"
            files.update({d + "nr_hugepages": "0", d + "free_hugepages": "0", d + "resv_hugepages": "0"})
        for path, text in files.items():
            os.makedirs(os.path.dirname(self.path(path)), exist_ok=True)
            with open(self.path(path), "w") as f:
                f.write(text + "\n")

    def write(self, path, value):
        if self.on_write:
            self.on_write(path, value)
        self.writes.append((path, value))
        if sum(p == path for p, _ in self.writes) in self.fail.get(path, ()):
            raise KvmError(f"cannot write {value!r} to {path}: Input/output error")
        if path.endswith("/nr_hugepages"):
            size = int(path.split("hugepages-")[1].split("kB")[0]) * 1024
            asked = int(value)
            got = asked if self.compacted else min(asked, self.limit.get(size, asked))
            super().write(path, str(got))
            super().write(path.replace("nr_hugepages", "free_hugepages"), str(got))
            return
        if path == hs.COMPACT_MEMORY:
            self.compacted = self.compaction_helps
        super().write(path, value)

    def value(self, path):
        return self.read(path)


@pytest.fixture
def host(tmp_path):
    return FakeHost(tmp_path)


def test_the_bed_mark_decides_not_an_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPY_BED", "1")
    real_host = FakeHost(tmp_path / "host", bed=False)
    assert not real_host.in_bed()
    with pytest.raises(RequirementError, match="only inside `kvmpy bed`"):
        with hs.hugetlb_pages(PAGE_2M, 4, fs=real_host):
            pass
    with pytest.raises(RequirementError, match="changes it only inside `kvmpy bed`"):
        with hs.eager_page_split(False, fs=real_host):
            pass
    with hs.reserved_in_bed((PAGE_2M, 4), fs=real_host):
        pass
    with pytest.raises(KvmError, match="not inside `kvmpy bed`"):
        hs.HostChanges(real_host).set(POOL_2M, "4")
    assert real_host.writes == []
    # This machine is no bed either, whatever its environment says.
    assert not in_bed()


@pytest.mark.parametrize("break_it", ["no word", "stale mark", "no mark", "empty mark"])
def test_in_bed_wants_both_marks(tmp_path, break_it):
    host = FakeHost(tmp_path)
    assert host.in_bed()
    if break_it == "no word":
        hs.HostFs.write(host, "/proc/cmdline", "console=ttyS0 kvmpy.bed=0 kvm.tdp_mmu=Y")
    elif break_it == "stale mark":
        hs.HostFs.write(host, "/run/kvmpy-bed/boot_id", "0b7b5c0e-0000-4000-8000-000000000000")
    elif break_it == "no mark":
        os.unlink(host.path("/run/kvmpy-bed/boot_id"))
    else:
        hs.HostFs.write(host, "/run/kvmpy-bed/boot_id", "")
    assert not host.in_bed()


def test_the_inits_mark_is_what_in_bed_looks_for(tmp_path):
    """The real init's mark_bed, with mount replaced by a logger, on a fake root."""
    root = tmp_path / "root"
    host = FakeHost(root)
    os.unlink(host.path("/run/kvmpy-bed/boot_id"))
    assert not host.in_bed()
    (tmp_path / "init").write_text(initramfs.INIT_SCRIPT)
    fake_mount = tmp_path / "mount"
    fake_mount.write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path / 'mounts'}\n")
    fake_mount.chmod(0o755)
    env = dict(os.environ, KVMPY_INIT_TEST="1", KVMPY_MOUNT=str(fake_mount),
               KVMPY_BOOT_ID=host.path("/proc/sys/kernel/random/boot_id"))
    subprocess.run([*busybox_sh(), "-c", f". {tmp_path / 'init'}; mark_bed {root}"], env=env, check=True, timeout=30)
    assert host.in_bed()
    assert (tmp_path / "mounts").read_text().splitlines() == [
        f"-t tmpfs -o size=4k,mode=0755 kvmpy-bed {root}/run/kvmpy-bed", f"-o remount,ro {root}/run/kvmpy-bed"]


def test_pool_grown_for_the_test_and_restored(host):
    with hs.hugetlb_pages(PAGE_2M, 4, fs=host):
        assert host.value(POOL_2M) == "4" and host.available(PAGE_2M) == 4
    assert host.value(POOL_2M) == "0"
    assert host.writes == [(POOL_2M, "4"), (POOL_2M, "0")]


def test_fragmented_memory_is_compacted_then_restored(tmp_path):
    host = FakeHost(tmp_path, limit={PAGE_2M: 1})
    with hs.hugetlb_pages(PAGE_2M, 4, fs=host):
        assert host.available(PAGE_2M) == 4
    assert host.writes == [(POOL_2M, "4"), (hs.DROP_CACHES, "3"), (hs.COMPACT_MEMORY, "1"), (POOL_2M, "4"),
                           (POOL_2M, "0")]


@pytest.mark.parametrize("path, nth", [(POOL_2M, 1), (hs.DROP_CACHES, 1), (hs.COMPACT_MEMORY, 1), (POOL_2M, 2)],
                         ids=["pool write", "drop_caches", "compact_memory", "second pool write"])
def test_a_failed_write_in_the_step_restores_the_pool(tmp_path, path, nth):
    host = FakeHost(tmp_path, limit={PAGE_2M: 1})
    host.fail[path] = {nth}
    with pytest.raises(KvmError, match=f"cannot write .* to {path}: Input/output error"):
        with hs.hugetlb_pages(PAGE_2M, 4, fs=host):
            pytest.fail("the test must not run")
    assert host.value(POOL_2M) == "0"
    assert host.writes[-1] == (POOL_2M, "0")


def test_a_shortfall_skips_and_restores(tmp_path):
    host = FakeHost(tmp_path, limit={PAGE_1G: 0}, compaction_helps=False)
    with pytest.raises(RequirementError, match=r"needed 1 free 1048576kB huge pages.*could provide only 0.*4025924 kB"):
        with hs.hugetlb_pages(PAGE_1G, 1, fs=host):
            pass
    assert host.value(POOL_1G) == "0"


@pytest.mark.parametrize("stop", [RuntimeError("test failed"), KeyboardInterrupt()], ids=["exception", "Ctrl-C"])
def test_the_test_failing_or_interrupted_restores(host, stop):
    with pytest.raises(type(stop)):
        with hs.hugetlb_pages(PAGE_2M, 4, fs=host), hs.eager_page_split(False, fs=host):
            assert host.value(hs.EAGER_PARAM) == "N" and host.value(POOL_2M) == "4"
            raise stop
    assert host.value(hs.EAGER_PARAM) == "Y" and host.value(POOL_2M) == "0"


def test_sigint_in_the_test_restores(host):
    with pytest.raises(KeyboardInterrupt):
        with hs.reserved_in_bed((PAGE_1G, 1), (PAGE_2M, 8), fs=host):
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("SIGINT did not interrupt")
    assert host.value(POOL_1G) == "0" and host.value(POOL_2M) == "0"


def test_sigint_during_the_restore_waits_for_it(host):
    def interrupt_first_restore(path, value):
        if value == "0" and not sent:
            sent.append(path)
            os.kill(os.getpid(), signal.SIGINT)
    sent: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with hs.reserved_in_bed((PAGE_1G, 1), (PAGE_2M, 8), fs=host):
            host.on_write = interrupt_first_restore
    assert sent == [POOL_2M]
    # Both pools restored, newest first, before the KeyboardInterrupt.
    assert host.writes[-2:] == [(POOL_2M, "0"), (POOL_1G, "0")]


def test_a_failed_restore_still_restores_the_rest_and_says_so(host):
    host.fail[POOL_1G] = {2}
    with pytest.raises(KvmError, match=r"host state not restored: cannot write '0' to .*1048576kB/nr_hugepages"):
        with hs.reserved_in_bed((PAGE_1G, 1), (PAGE_2M, 8), fs=host):
            pass
    assert host.value(POOL_2M) == "0"


def test_a_second_pool_failing_restores_the_first(host):
    host.fail[POOL_2M] = {1}
    with pytest.raises(KvmError, match="Input/output error"):
        with hs.reserved_in_bed((PAGE_1G, 1), (PAGE_2M, 8), fs=host):
            pytest.fail("the module must not run")
    assert host.value(POOL_1G) == "0" and host.value(POOL_2M) == "0"


def test_eager_page_split_set_and_restored(host):
    with hs.eager_page_split(False, fs=host):
        assert host.value(hs.EAGER_PARAM) == "N"
    assert host.writes == [(hs.EAGER_PARAM, "N"), (hs.EAGER_PARAM, "Y")]
    host.writes.clear()
    with hs.eager_page_split(True, fs=host):   # already Y: nothing written
        pass
    assert host.writes == []


def test_eager_page_split_write_failing_restores(host):
    host.fail[hs.EAGER_PARAM] = {1}
    with pytest.raises(KvmError, match="eager_page_split: Input/output error"):
        with hs.eager_page_split(False, fs=host):
            pytest.fail("the test must not run")
    assert host.writes[-1] == (hs.EAGER_PARAM, "Y") and host.value(hs.EAGER_PARAM) == "Y"


def test_a_value_that_cannot_be_read_is_not_written(host):
    os.unlink(host.path(hs.EAGER_PARAM))
    with pytest.raises(RequirementError, match="eager_page_split is missing") as ei:
        with hs.eager_page_split(False, fs=host):
            pass
    # The parameter came with the TDP MMU's eager splitting in v5.18: the message names that commit.
    assert "older than v5.18, which added it with a3fe5dbda0a4" in str(ei.value)
    changes = hs.HostChanges(host)
    with pytest.raises(KvmError, match="cannot read .*: not writing a value it could not restore"):
        changes.set(hs.EAGER_PARAM, "N")
    assert host.writes == []


NX_DEFAULTS = [(hs.NX_PARAM, "N"), (hs.NX_RATIO_PARAM, "60"), (hs.NX_PERIOD_PARAM, "0")]


def test_nx_huge_pages_on_with_recovery_stopped_then_started_and_all_restored(host):
    with hs.nx_huge_pages(fs=host) as start_recovery:
        assert host.writes == [(hs.NX_RATIO_PARAM, "0"), (hs.NX_PARAM, "Y")]   # no recovery before it is on
        start_recovery(100)
        assert host.writes[2:] == [(hs.NX_PERIOD_PARAM, "100"), (hs.NX_RATIO_PARAM, "1")]
    assert [(p, host.value(p)) for p, _ in NX_DEFAULTS] == NX_DEFAULTS
    # Newest first: the period, then kvm.nx_huge_pages, then the ratio (recovery off until the end).
    assert host.writes[4:] == [(hs.NX_PERIOD_PARAM, "0"), (hs.NX_PARAM, "N"), (hs.NX_RATIO_PARAM, "60")]


@pytest.mark.parametrize("stop", [AssertionError, KeyboardInterrupt])
def test_nx_huge_pages_restored_when_the_test_fails(host, stop):
    with pytest.raises(stop):
        with hs.nx_huge_pages(fs=host) as start_recovery:
            start_recovery(100)
            raise stop()
    assert [(p, host.value(p)) for p, _ in NX_DEFAULTS] == NX_DEFAULTS


def test_nx_huge_pages_only_in_a_bed_boot_that_leaves_them_to_the_test(tmp_path, monkeypatch):
    real_host = FakeHost(tmp_path / "host", bed=False)
    with pytest.raises(RequirementError, match=r"kvmpy changes them only inside `kvmpy bed`: run `kvmpy selftest --bed`"):
        with hs.nx_huge_pages(fs=real_host):
            pass
    bed = FakeHost(tmp_path / "bed")
    import kvmpy.bed_mark
    monkeypatch.setattr(kvmpy.bed_mark, "in_bed", lambda root="/": True)   # what the skip reason says
    monkeypatch.setenv("KVMPY_BED_BACKEND", "qemu")
    monkeypatch.setenv("KVMPY_BED_PARAMS", "kvm.nx_huge_pages=Y")
    with pytest.raises(RequirementError, match=r"changes kvm.nx_huge_pages, kvm.nx_huge_pages_recovery_ratio, "
                                               r"kvm.nx_huge_pages_recovery_period_ms as it runs, which this qemu "
                                               r"bed boot \(--param kvm.nx_huge_pages=Y\) fixes: one default boot"):
        with hs.nx_huge_pages(fs=bed):
            pass
    os.unlink(bed.path(hs.NX_PERIOD_PARAM))
    with pytest.raises(RequirementError, match="nx_huge_pages_recovery_period_ms is missing"):
        with hs.nx_huge_pages(fs=bed):
            pass
    assert real_host.writes == bed.writes == []
