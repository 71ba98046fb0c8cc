"""kvmpy.child: a child started with die_with_parent(sig) gets ``sig`` when its parent dies."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import psutil
import pytest

# Writes "ready" to the file argv[1] once its SIGTERM handler is in place, "SIGTERM" when it gets one.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    def term(*_):
        open(sys.argv[1], "a").write(" SIGTERM")
        os._exit(7)
    signal.signal(signal.SIGTERM, term)
    open(sys.argv[1], "w").write("ready")
    time.sleep(120)
""")

# Starts CHILD tied to itself (signal argv[1]), prints its pid once it is ready, then dies uncleanly.
PARENT = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from kvmpy.child import die_with_parent
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[3]],
                             preexec_fn=die_with_parent(getattr(signal, sys.argv[1])))
    while not os.path.exists(sys.argv[3]) or open(sys.argv[3]).read() != "ready":
        time.sleep(0.05)
    print(child.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_the_child_dies_with_its_parent(tmp_path, sig):
    report = tmp_path / "report"
    p = subprocess.Popen([sys.executable, "-c", PARENT, sig, CHILD, str(report)], stdout=subprocess.PIPE, text=True)
    pid = int(p.stdout.readline())
    p.wait(30)
    p.stdout.close()
    try:
        psutil.Process(pid).wait(30)         # reparented: not ours to reap, but it must end
    except psutil.NoSuchProcess:
        pass
    assert report.read_text() == ("ready SIGTERM" if sig == "SIGTERM" else "ready")
