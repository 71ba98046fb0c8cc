"""`kvmpy selftest` and its pytest child: stop signals, parent death, --junit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

from kvmpy.selftest.guard import kvm_unusable

ROOT = Path(__file__).resolve().parent.parent

# Selected with -k next to the real suite: one quick test, then one that waits to be stopped.
PROBE = '''
import os
import time

def test_lifetime_probe_quick():
    pass

def test_lifetime_probe_waits():
    with open(os.path.join(os.environ["PROBE_DIR"], "pid"), "w") as f:
        f.write(str(os.getpid()))
    try:
        time.sleep(120)
    finally:
        open(os.path.join(os.environ["PROBE_DIR"], "cleaned-up"), "w").close()
'''

pytestmark = pytest.mark.skipif(bool(kvm_unusable()), reason=f"needs a usable /dev/kvm: {kvm_unusable()}")


def _start(tmp_path: Path, *args: str, sigint_ignored: bool = False) -> tuple[subprocess.Popen, int]:
    """`kvmpy selftest` on the probe, run from ``tmp_path``; returns it and the pid of its pytest child.

    ``sigint_ignored``: started as a shell starts a background job (`kvmpy selftest &` in a script).
    """
    probe = tmp_path / "test_lifetime_probe.py"
    probe.write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PROBE_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy.cli", "selftest", "-k", "lifetime_probe", *args,
                             "--", str(probe)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
    pid_file = tmp_path / "pid"
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the probe test did not start:\n{proc.communicate()[0]}")
        time.sleep(0.1)
    return proc, int(pid_file.read_text())


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("signo, status, sigint_ignored", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, False),
                                                          (signal.SIGINT, 130, True)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-background-job"])
def test_stop_signal_unwinds_and_keeps_partial_results(tmp_path, signo, status, sigint_ignored):
    (tmp_path / "out").mkdir()
    proc, child = _start(tmp_path, "--junit", "out/junit.xml", sigint_ignored=sigint_ignored)
    proc.send_signal(signo)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == status, out
    # The child unwound: its finally ran; it is gone.
    assert (tmp_path / "cleaned-up").exists()
    assert not _alive(child)
    # The partial table: what ran, what was stopped, and why.
    lines = out.splitlines()
    assert any("test_lifetime_probe_quick" in line and " PASS" in line for line in lines), out
    assert any("test_lifetime_probe_waits" in line and "INTERRUPTED" in line for line in lines), out
    assert f"stopped by {signal.Signals(signo).name} after 1 of 2 tests" in out
    # --junit is relative to where the user ran the command, and written although the run was stopped.
    cases = ET.parse(tmp_path / "out" / "junit.xml").getroot().iter("testcase")
    assert "test_lifetime_probe_quick" in [c.get("name") for c in cases]


def test_sigkill_of_kvmpy_takes_its_pytest_child_along(tmp_path):
    proc, child = _start(tmp_path)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    deadline = time.monotonic() + 3
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the pytest child outlived `kvmpy selftest`"
    # It died unwinding (SIGTERM from the kernel), not killed mid-test.
    assert (tmp_path / "cleaned-up").exists()


def test_a_pytest_killed_mid_test_still_shows_what_it_had_done(tmp_path):
    # Its results never come (SIGKILL: no unwinding); its progress lines, through their own
    # pipe, name the test it died in next to the one that had passed.
    proc, child = _start(tmp_path)
    os.kill(child, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    lines = out.splitlines()
    assert any("test_lifetime_probe_quick" in line and " PASS" in line for line in lines), out
    assert any("test_lifetime_probe_waits" in line and "did not finish: pytest was killed by SIGKILL" in line
               for line in lines), out
    flowed = " ".join(out.split())      # the table wraps its reason column
    assert "1 test(s) had finished, ::test_lifetime_probe_waits was running" in flowed, out
    assert not list(tmp_path.glob("*.progress")), "the host run leaves no file behind"


class _Unkillable:
    """A pytest child that no signal ends (its threads stuck in the kernel): signals are only
    counted, and ``pid`` is a real process (a ``sleep``) for /proc to show."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode, self.signals = pid, None, []

    def wait(self, timeout=None):
        time.sleep(timeout or 0)
        raise subprocess.TimeoutExpired("pytest", timeout)

    def send_signal(self, signo):
        self.signals.append(signo)

    def kill(self):
        self.signals.append(signal.SIGKILL)


def test_a_pytest_that_sigkill_cannot_end_is_left_behind_saying_where_it_waits(monkeypatch):
    # Stuck in uninterruptible sleep (a KVM deadlock), SIGKILL stays pending: `kvmpy selftest`
    # gives up after a while instead of hanging too, and says where its threads wait.
    from kvmpy.selftest import runner

    monkeypatch.setattr(runner, "GRACE_SECONDS", 0.3)
    monkeypatch.setattr(runner, "KILL_WAIT_SECONDS", 0.5)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        child = _Unkillable(sleeper.pid)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        signo, problem = runner._wait(child)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert signo == signal.SIGINT and child.signals == [signal.SIGINT, signal.SIGKILL]
    assert time.monotonic() - t0 < 5
    assert problem.startswith("pytest did not stop within 0 s of SIGINT: killed; it did not die within 0 s of SIGKILL")
    assert f"pid {sleeper.pid} is stuck in the kernel and left behind (thread {sleeper.pid} S in " in problem
