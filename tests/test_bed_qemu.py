"""Integration tests that boot the QEMU bed (select with ``pytest -m bed``).

They fetch the Debian 6.12 kernel on first use (about 100 MB, cached under
~/.cache/kvmpy/bed; ``kvmpy bed setup`` does it ahead of time) and boot it
under TCG, about 10 s per boot on an idle 2-core machine.
"""

import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmpy.bed.debian import fetch_debian
from kvmpy.bed.initramfs import busybox
from kvmpy.bed.request import BedRequest
from kvmpy.bed.qemu import QEMU, QemuBackend
from kvmpy.selftest.progress import PROGRESS_SUFFIX, read_progress

pytestmark = pytest.mark.bed
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bed(request):
    if "bed" not in (request.config.getoption("-m") or ""):
        pytest.skip("boots QEMU (about a minute): select with pytest -m bed")
    if not shutil.which(QEMU):
        pytest.skip(f"{QEMU} not installed: apt-get install --no-install-recommends qemu-system-x86")
    busybox()  # a clear BedError naming busybox-static if missing
    return QemuBackend(fetch_debian(os.environ.get("KVMPY_BED_KERNEL", "6.12")))


def req(command, **kw):
    kw.setdefault("timeout", 300)
    kw.setdefault("cwd", str(REPO))
    kw.setdefault("env", {"PYTHONPATH": str(REPO)})
    return BedRequest(command=command, **kw)


FACTS = r"""
import fcntl, os, sys
flags = open('/proc/cpuinfo').read()
print('fact svm', ' svm ' in flags or ' svm\n' in flags)
print('fact nested', open('/sys/module/kvm_amd/parameters/nested').read().strip())
fd = os.open('/dev/kvm', os.O_RDWR)
print('fact api', fcntl.ioctl(fd, 0xAE00))
open(os.path.join(os.environ['KVMPY_BED_RESULTS'], 'facts.txt'), 'w').write('from inside\n')
sys.exit('inside failure: deliberate')
"""


def test_inside_facts_params_and_failing_status(bed):
    r = bed.run(req(["python3", "-c", FACTS], params={"kvm.eager_page_split": "N"}))
    assert r.error is None and not r.timed_out
    assert r.status == 1
    assert "fact svm True" in r.console
    assert "fact nested 1" in r.console
    assert "fact api 12" in r.console
    assert "inside failure: deliberate" in r.console
    assert r.files == {"facts.txt": b"from inside\n"}
    assert r.params["kvm.eager_page_split"] == "N"
    assert r.params["kvm_amd.npt"] == "Y"
    assert r.boot_seconds is not None and r.boot_seconds < r.seconds
    assert "Linux version" in r.kernel_log


INNER_TESTS = r'''
import fcntl, os

def test_creates_vm():
    fd = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(fd, 0xAE01, 0)  # KVM_CREATE_VM
    assert vm > 0
    os.close(vm)
    os.close(fd)

def test_fails_inside():
    assert 2 + 2 == 5, "inside-assert-marker"
'''


def test_pytest_inside_brings_junit_back(bed, tmp_path):
    # tmp_path is under the host's /tmp: the bed sees it (overlay of the host's /).
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    r = bed.run(req(["python3", "-m", "pytest", "-p", "kvmpy.selftest.splat", str(tmp_path)],
                    params={"kvm.tdp_mmu": "N"}))
    assert r.status == 1, r.console[-2000:]
    assert "kernel splat watch: /dev/kmsg" in r.console
    assert r.params["kvm.tdp_mmu"] == "N"
    suite = ET.fromstring(r.files["junit.xml"]).find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    failure = suite.find("testcase[@name='test_fails_inside']/failure")
    assert "inside-assert-marker" in failure.get("message")


KILLED = r'''
import os, signal

def test_before():
    pass

def test_killed():
    os.kill(os.getpid(), signal.SIGKILL)    # as the bed's `timeout -s KILL` ends a test that hangs
'''


def test_a_killed_pytest_leaves_what_finished_and_the_test_it_died_in(bed, tmp_path):
    # No results file (SIGKILL: no unwinding); the progress file written over 9p as the tests
    # went still comes back and names the test. (Killed by itself rather than by the bed's
    # timeout: the same signal, a minute less of waiting.)
    (tmp_path / "test_killed.py").write_text(KILLED)
    cmd = f'python3 -m pytest -p kvmpy.selftest.results --kvmpy-results="$KVMPY_BED_RESULTS/results.json" {tmp_path}'
    r = bed.run(req(["sh", "-c", cmd]))
    assert r.status == 128 + 9 and not r.timed_out, r.console[-2000:]
    assert "results.json" not in r.files
    tests, running = read_progress(r.files["results.json" + PROGRESS_SUFFIX].decode())
    assert [(t["nodeid"].split("::")[-1], t["outcome"]) for t in tests] == [("test_before", "passed")]
    assert running.endswith("::test_killed")


def test_timeout_kills_machine_and_cleans_up(bed, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # An init that never reaches the command: only the outer timeout can end it.
    r = bed.run(req(["true"], timeout=15, append=["rdinit=/bin/busybox", "--", "sleep", "1000"]))
    assert r.timed_out and r.status is None
    assert r.error == "timed out after 15s"
    assert 15 <= r.seconds < 45
    assert not os.path.exists(f"/proc/{r.pid}")
    assert list(tmp_path.iterdir()) == []


def test_cli_run_prints_command_output_and_propagates_status(bed, capsys):
    from kvmpy.bed import cli

    code = cli.main(["run", "--timeout", "300", "--param", "kvm.tdp_mmu=N", "--",
                     "sh", "-c", "echo out-$(cat /sys/module/kvm/parameters/tdp_mmu); exit 5"])
    out, err = capsys.readouterr()
    assert code == 5
    assert out.strip() == "out-N"  # only the command's output, not the boot log
    assert "kvmpy bed: exit 5 (boot" in err


def _start_harness(tmp_path):
    """`kvmpy bed run -- sleep 300` in a child, and its QEMU once started."""
    import subprocess
    import sys
    import time

    import psutil

    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(REPO))
    harness = subprocess.Popen([sys.executable, "-m", "kvmpy.bed.cli", "run", "--timeout", "300",
                                "--", "sleep", "300"], env=env, cwd=str(REPO),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        machines = [p for p in psutil.Process(harness.pid).children() if "qemu" in p.name()]
        if machines:
            return harness, machines[0]
        assert harness.poll() is None, "the harness exited before starting QEMU"
        time.sleep(0.2)
    harness.kill()
    pytest.fail("QEMU did not start within 120 s")


def test_sigterm_to_harness_kills_machine_and_removes_temp_dir(bed, tmp_path):
    import signal

    import psutil

    harness, machine = _start_harness(tmp_path)
    assert any(p.name.startswith("kvmpy-bed-") for p in tmp_path.iterdir())
    harness.send_signal(signal.SIGTERM)
    assert harness.wait(timeout=60) == 128 + signal.SIGTERM
    psutil.wait_procs([machine], timeout=10)
    assert not machine.is_running()
    assert list(tmp_path.iterdir()) == []


def test_sigkill_to_harness_still_kills_machine(bed, tmp_path):
    import psutil

    harness, machine = _start_harness(tmp_path)
    harness.kill()
    harness.wait(timeout=60)
    gone, alive = psutil.wait_procs([machine], timeout=10)
    assert not alive, "QEMU outlived a SIGKILLed harness"
