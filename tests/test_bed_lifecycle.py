"""The bed's lifecycle on every exit path: a row that fails keeps the others, deadlines leave the
inner timeout room to bring results back, Bochs dies with its ``script``, no temp files left."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmpy.bed import backend, bochs, media, parallel, qemu
from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import BedRequest
from kvmpy.selftest import bed_runner

from bed_fakes import bed_args


# --- 1. one row's failure keeps the others ------------------------------------------------

@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("error", [BedError("xorriso failed: No space left on device"),
                                   OSError(28, "No space left on device")])
def test_a_row_that_raises_is_its_own_result_and_keeps_the_others(beds, tmp_path, jobs, error):
    seen, opts = beds

    def hook(bed, request):
        if len(seen) == 3:
            raise error
    opts["hook"] = hook
    runs = bed_runner.run(bed_args(tmp_path, jobs=jobs), quiet=True)
    assert len(runs) == 8, [r.harness_error for r in runs]
    failed = [r for r in runs if r.harness_error]
    assert len(failed) == 1 and "No space left on device" in failed[0].harness_error
    assert sum(1 for r in runs if not r.harness_error and r.tests) == 7
    # every row's JUnit file is written, the failed one's saying its error
    junits = sorted(tmp_path.glob("j-*.xml"))
    assert len(junits) == 8
    assert sum(b"No space left on device" in p.read_bytes() for p in junits) == 1


def test_a_junit_write_that_fails_is_a_harness_error_not_a_traceback(beds, tmp_path, monkeypatch):
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.endswith("legacy-tdp.xml") and "6.12" in self.name:
            raise OSError(28, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    runs = bed_runner.run(bed_args(tmp_path), quiet=True)
    assert len(runs) == 8
    assert [r.harness_error for r in runs if r.harness_error] == [
        f"JUnit file {tmp_path / 'j-6.12-legacy-tdp.xml'} not written: [Errno 28] No space left on device"]


def test_a_worker_exception_still_commits_the_finished_results():
    committed = []
    gate = threading.Event()

    def work(i):
        if i == 1:
            gate.wait(10)
            raise RuntimeError("boom")
        if i == 2:
            gate.set()
        return i

    with pytest.raises(RuntimeError):
        parallel.run_in_order(3, work, 3, lambda i, r: committed.append(i))
    assert committed == [0, 2]


def test_work_finishing_between_the_stops_looks_is_kept(monkeypatch):
    """On a stop, work that ends while run_in_order looks at what finished is committed or
    reported as running, never lost (neither)."""
    release = threading.Event()
    entered = threading.Event()

    def work(i):
        if i == 1:
            entered.set()
            release.wait(10)
        return i * 10

    real = parallel._returned
    futures = {}

    def returned(f):
        # The first look at the running work 1 says 'not finished', then lets it finish.
        if f not in futures and f.running():
            futures[f] = True
            answer = real(f)
            release.set()
            f.exception(10)     # wait for it to be done
            return answer
        return real(f)
    monkeypatch.setattr(parallel, "_returned", returned)
    committed = []
    raised = [False]

    def commit(i, r):
        committed.append(i)
        if not raised[0]:
            raised[0] = True
            assert entered.wait(10)
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt) as e:
        parallel.run_in_order(2, work, 2, commit)
    assert 1 in committed or 1 in e.value.running, (committed, e.value.running)
    if 1 in e.value.running:
        assert e.value.cut == {1: 10}


# --- 2. the deadline counts from the emulator's start; the inner timeout leaves room ----------

def test_the_inner_timeout_leaves_each_backend_room_to_boot_and_bring_results_back():
    # Bochs boots in 60-100 s and then drains its files block over the serial line.
    assert bochs.BochsBackend.headroom >= 180
    assert qemu.QemuBackend.headroom >= 60
    for cls in (bochs.BochsBackend, qemu.QemuBackend):
        be = cls.__new__(cls)
        assert be.inner_timeout(1500) == int(1500 - cls.headroom)
        assert be.inner_timeout(600) <= 600 - cls.headroom
        assert be.inner_timeout(20) == 10 and be.inner_timeout(1) == 1


def test_bochs_deadline_starts_when_the_emulator_starts(tmp_path):
    """Staging and xorriso (before the emulator) do not eat the boot's timeout."""
    serial = tmp_path / "serial.out"
    serial.touch()
    request = BedRequest(command=["true"], timeout=1.5)
    t0 = time.monotonic()
    _, _, _, timed_out, _, _ = bochs._run_machine(["sleep", "30"], serial, request, t0 - 100, tmp_path)
    assert timed_out and time.monotonic() - t0 >= 1.4


def test_qemu_deadline_starts_when_the_emulator_starts():
    request = BedRequest(command=["true"], timeout=1.5)
    t0 = time.monotonic()
    _, _, timed_out, _ = qemu._run_machine(["sleep", "30"], request, t0 - 100)
    assert timed_out and time.monotonic() - t0 >= 1.4


# --- 3. Bochs under `script` dies with it --------------------------------------------------

def _marked(marker: str):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        st = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
                        if st[0] != "Z":
                            out.append(int(name))
            except OSError:
                pass
    return out


@pytest.mark.skipif(not os.path.exists("/usr/bin/script"), reason="no script(1)")
def test_a_bochs_that_ignores_sighup_dies_with_its_script(tmp_path):
    """script setsid()s its command: killing script's group alone leaves it running."""
    rc = tmp_path / "bochsrc"
    rc.write_text("")
    serial = tmp_path / "serial.out"
    serial.touch()
    stand_in = f"{sys.executable} -c 'import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); time.sleep(300)' {rc}"
    argv = ["script", "-q", "-e", "-c", stand_in, "/dev/null"]
    request = BedRequest(command=["true"], timeout=3)
    try:
        bochs._run_machine(argv, serial, request, time.monotonic(), tmp_path)
        assert _marked(f"{tmp_path}/") == []
    finally:
        for pid in _marked(f"{tmp_path}/"):
            os.kill(pid, signal.SIGKILL)


SLEEP = [sys.executable, "-c", "import time; time.sleep(30)"]


def test_bochs_sessions_are_the_ones_its_processes_lead(tmp_path):
    """A process naming the boot's directory and leading its session: the session is killed;
    one in our own session is left alone."""
    other = subprocess.Popen([*SLEEP, f"{tmp_path}/x"], start_new_session=True)
    time.sleep(0.3)
    try:
        found = backend.wrapped_sessions(-1, tmp_path)
        assert ("session", other.pid) in found
        inner = subprocess.Popen([*SLEEP, f"{tmp_path}/y"])   # in our session: left alone
        try:
            time.sleep(0.3)
            assert all(pid != inner.pid for _, pid in backend.wrapped_sessions(-1, tmp_path))
        finally:
            inner.kill(); inner.wait()
        backend.kill_sessions(found)
        assert other.wait(5) == -signal.SIGKILL
    finally:
        other.kill(); other.wait()


# --- 4. no temp files left -------------------------------------------------------------------

@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_cpio_write_that_fails_leaves_no_part_archive(tmp_path, monkeypatch, error):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(1 << 16))
    cache = tmp_path / "cache"
    cache.mkdir()

    def copyfileobj(src, dst, n):
        dst.write(src.read(100))
        raise error
    monkeypatch.setattr(media.shutil, "copyfileobj", copyfileobj)
    with pytest.raises(type(error)):
        media.write_cpio(cache / "py.cpio.gz", tree)
    assert list(cache.iterdir()) == []


def test_a_second_stop_signal_during_a_boots_cleanup_still_removes_its_directory(tmp_path, monkeypatch):
    """`kvmpy bed run` stopped (the first Ctrl-C) and stopped again while cleaning up: the
    boot's directory is removed all the same, and the second stop is acted on after."""
    monkeypatch.setattr(backend.tempfile, "tempdir", str(tmp_path))
    be = qemu.QemuBackend.__new__(qemu.QemuBackend)
    monkeypatch.setattr(be, "check", lambda: None, raising=False)
    monkeypatch.setattr(qemu, "build_initramfs", lambda kernel, out, *a: out)
    monkeypatch.setattr(be, "command_line", lambda *a: ["true"], raising=False)
    be.kernel = None

    def stopped(*a):
        raise KeyboardInterrupt         # the first Ctrl-C, while the machine runs
    monkeypatch.setattr(qemu, "_run_machine", stopped)
    real = backend.shutil.rmtree

    def rmtree(path, **kw):
        signal.raise_signal(signal.SIGINT)  # the second, as the cleanup begins
        return real(path, **kw)
    monkeypatch.setattr(backend.shutil, "rmtree", rmtree)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            be.run(BedRequest(command=["true"]))
    finally:
        signal.signal(signal.SIGINT, old)
    assert list(tmp_path.iterdir()) == []
