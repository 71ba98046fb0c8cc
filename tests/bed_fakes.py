"""Fakes shared by the bed's unit tests: module trees, bzImage headers, a kernel, busybox sh, beds that boot nothing."""

import argparse
import contextlib
import dataclasses
import json
import lzma
import os
import shutil
import signal
import subprocess
import threading

import pytest

from kvmpy.bed import initramfs, kernel, matrix
from kvmpy.bed.backend import Backend
from kvmpy.bed.options import BedOptions
from kvmpy.bed.request import BedFacts, BedResult
from kvmpy.bed.testbed import Bed

MODULES_DEP = """\
kernel/arch/x86/kvm/kvm.ko.xz: kernel/virt/lib/irqbypass.ko.xz
kernel/arch/x86/kvm/kvm-amd.ko.xz: kernel/arch/x86/kvm/kvm.ko.xz kernel/drivers/crypto/ccp/ccp.ko.xz kernel/virt/lib/irqbypass.ko.xz
kernel/arch/x86/kvm/kvm-intel.ko.xz: kernel/arch/x86/kvm/kvm.ko.xz kernel/virt/lib/irqbypass.ko.xz
kernel/virt/lib/irqbypass.ko.xz:
kernel/drivers/crypto/ccp/ccp.ko.xz:
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz
kernel/fs/netfs/netfs.ko.xz:
"""
BUILTIN = "kernel/drivers/virtio/virtio_pci.ko\n"


def bzimage(path, release=None):
    """A file with an x86 boot header ("HdrS") naming ``release`` (or none)."""
    image = bytearray(0x4000)
    image[0x202:0x206] = b"HdrS"
    if release:
        image[0x20E:0x210] = (0x1000).to_bytes(2, "little")
        image[0x1200:0x1200 + 60] = f"{release} (me@box) #1 SMP\0".encode().ljust(60, b"\0")
    path.write_bytes(bytes(image))
    return path


def module_tree(mods, vermagic, modules_dep=MODULES_DEP, builtin=""):
    """A lib/modules/<release> tree whose modules were built for ``vermagic``."""
    mods.mkdir(parents=True, exist_ok=True)
    for rel in kernel.parse_modules_dep(modules_dep):
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(lzma.compress(f"\x7fELF\0vermagic={vermagic} SMP mod_unload\0".encode()))
    (mods / "modules.dep").write_text(modules_dep)
    (mods / "modules.builtin").write_text(builtin)
    return mods


def busybox_sh():
    for candidate in ("/bin/busybox", shutil.which("busybox") or ""):
        if candidate and os.path.exists(candidate):
            return [candidate, "sh"]
    pytest.skip("busybox not installed (apt-get install busybox-static)")


def fake_kernel(tmp_path) -> kernel.Kernel:
    mods = tmp_path / "lib" / "modules" / "6.99"
    for rel in kernel.parse_modules_dep(MODULES_DEP):
        path = mods / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(f"ELF {rel}".encode()))
    (mods / "modules.dep").write_text(MODULES_DEP)
    (mods / "modules.builtin").write_text(BUILTIN)
    return kernel.Kernel("6.99", tmp_path / "vmlinuz", mods, "test", tmp_path / "cache")


def run_init_load(tmp_path, cmdline, cpu_flags, modules, each_arg=False):
    """Source the real init and call load_modules (in ``tmp_path``) with insmod replaced by a logger.

    Returns a line per insmod: its arguments joined by spaces, or with ``each_arg``
    each one in brackets (to see where one ends).
    """
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "cpuinfo").write_text(f"flags\t\t: fpu {cpu_flags} sse\n")
    (tmp_path / "modules").write_text("".join(m + "\n" for m in modules))
    log = tmp_path / "insmod.log"
    fake = tmp_path / "insmod"
    logger = 'for a; do printf "[%s]" "$a"; done; echo' if each_arg else 'echo "$*"'
    fake.write_text(f"#!/bin/sh\n{{ {logger}; }} >> {log}\n")
    fake.chmod(0o755)
    run_init_function(tmp_path, "load_modules", KVMPY_CMDLINE=str(tmp_path / "cmdline"),
                      KVMPY_CPUINFO=str(tmp_path / "cpuinfo"), KVMPY_MODLIST=str(tmp_path / "modules"),
                      KVMPY_MODDIR="/m", KVMPY_INSMOD=str(fake))
    return log.read_text().splitlines() if log.exists() else []


def run_init_function(tmp_path, calls: str, **env) -> str:
    """Source the real init (written to ``tmp_path``) and run ``calls`` with ``env`` added; its stdout."""
    (tmp_path / "init").write_text(initramfs.INIT_SCRIPT)
    return subprocess.run([*busybox_sh(), "-c", f". {tmp_path / 'init'}; {calls}"],
                          env=dict(os.environ, KVMPY_INIT_TEST="1", **env), cwd=tmp_path,
                          capture_output=True, text=True, check=True, timeout=30).stdout


# --- `kvmpy selftest --bed` without booting -------------------------------------------

RESULTS = {"exitstatus": 0, "seconds": 1.0, "collected": 1,
           "tests": [{"nodeid": "selftests/test_a.py::test_ok", "outcome": "passed", "reason": "", "stats": {}}]}
JUNIT = b'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="1"><testcase classname="a" ' \
        b'name="test_ok"/></testsuite></testsuites>'
KERNELS = (("6.12", "6.12.117+deb12-amd64"), ("6.1", "6.1.0-57-amd64"))


class FakeBed(Backend):
    """Boots nothing: each request's parameters read back as set (``same``: as the first ones);
    ``stop_at``: that boot is a machine (a real process, added to ``procs``) that sends SIGTERM to
    the main thread and runs until the stop kills it (run it inside :func:`sigterm_stops`);
    ``hook(request)``, if given, runs first (a boot's own timing, or a real process as its
    machine) and may return the BedResult."""

    name, vendor = "fake", "amd"

    def __init__(self, kernel, seen, same=False, stop_at=None, hook=None, procs=None):
        super().__init__(kernel)
        self.seen, self.same, self.stop_at, self.hook, self.procs = seen, same, stop_at, hook, procs

    def check(self):
        pass

    def run(self, request):
        self.seen.append(request)
        if self.stop_at == len(self.seen):
            return machine_until_stopped(self.procs, lambda started: True)
        early = self.hook(self, request) if self.hook else None
        if early is not None:
            return early
        params = {k: matrix.normalize(v) for k, v in (self.seen[0] if self.same else request).params.items()}
        facts = BedFacts(backend="fake", cpu="max", kernel=self.kernel.release, vendor_module="kvm_amd",
                         params=params, hugepages={"2M": 32})
        results = dict(RESULTS, tests=[dict(RESULTS["tests"][0], stats={"row": request.env.get("KVMPY_BED_CONFIG")})])
        return BedResult(0, "", files={"results.json": json.dumps(results).encode(), "junit.xml": JUNIT},
                         params=params, facts=facts, seconds=1)


def bed_args(tmp_path, **over):
    """`kvmpy selftest --bed --matrix` arguments (``over`` changes some)."""
    args = dict(matrix=True, keyword=None, pytest_args=[], junit=str(tmp_path / "j.xml"), param=[], backend=None,
                kernel_version=None, kernel=None, modules=None, accel="tcg", timeout=None, jobs=1, shard=None)
    return argparse.Namespace(**{**args, **over})


def install_fake_beds(tmp_path, monkeypatch, opts):
    """Two fake kernels (6.12 and 6.1) in place of the Debian ones, FakeBed(**opts) each; returns the
    requests they see."""
    from kvmpy.selftest import bed_runner

    seen = []

    def beds(args, log):
        out = []
        for line, release in KERNELS:
            kernel = dataclasses.replace(fake_kernel(tmp_path / line), release=release)
            out.append(Bed(BedOptions(kernel_line=line), backend=FakeBed(kernel, seen, **opts)))
        return out if args.matrix else out[:1]

    monkeypatch.setattr(bed_runner, "_beds", beds)
    monkeypatch.setattr(bed_runner, "_prepare", lambda beds, log: None)
    return seen


_PROCS_LOCK = threading.Lock()


def machine_until_stopped(procs: list, stop_now) -> BedResult:
    """A boot that is a real process standing for its emulator, running until a stop kills it;
    once ``stop_now(procs)`` (called with this boot's process added), SIGTERM goes to the main
    thread, as a user's would."""
    from kvmpy.bed import machine

    proc = machine.start_machine(["sleep", "60"])
    with _PROCS_LOCK:
        procs.append(proc)
        go = stop_now(procs)
    if go:
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    proc.wait()
    machine.kill_machine(proc)
    return BedResult(None, "", error="killed")


@contextlib.contextmanager
def sigterm_stops(procs: list):
    """Inside, SIGTERM stops the run as `kvmpy` has it do; afterwards every machine in ``procs``
    must be gone, and machines may start again."""
    from kvmpy import cli
    from kvmpy.bed import machine

    old = signal.signal(signal.SIGTERM, cli._terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        machine.kill_machine(machine.start_machine(["true"]))   # lift the stop for the next run
    assert procs and all(p.poll() is not None for p in procs), "a machine was left running"
    for p in procs:
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)


def run_until_stopped(args, procs: list) -> list:
    """``bed_runner.run(args)`` with `kvmpy`'s SIGTERM handling (see :func:`sigterm_stops`)."""
    from kvmpy.selftest import bed_runner

    with sigterm_stops(procs):
        return bed_runner.run(args, quiet=True)



def printed(console_lines) -> str:
    """What a ConsolePrinter (no --console) shows of ``console_lines``."""
    from kvmpy.bed.machine import ConsolePrinter

    out: list[str] = []

    class Out:
        def write(self, s):
            out.append(s)

        def flush(self):
            pass

    p = ConsolePrinter(False, Out())
    for line in console_lines:
        p(line)
    return "".join(out)
