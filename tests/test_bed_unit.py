"""Unit tests of the test bed that need no QEMU: modules, init, cpio, matrix."""

import dataclasses
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.bed import backend as bk
from kvmpy.bed import debian, initramfs, job, kernel, matrix, qemu
from kvmpy.bed import request as rq
from kvmpy.bed.options import BedOptions
from kvmpy.bed.protocol import INSIDE_RESULTS, BedError
from kvmpy.bed.request import BedRequest, BedResult, Job
from kvmpy.bed.testbed import Bed

from bed_fakes import BUILTIN, MODULES_DEP, busybox_sh, bzimage, fake_kernel, module_tree, printed, run_init_load

# --- module closure -------------------------------------------------------

def test_closure_puts_dependencies_first_once():
    order = kernel.module_closure(MODULES_DEP, ["9p", "kvm_amd", "kvm-intel"])
    names = [kernel.module_name(p) for p in order]
    assert sorted(names) == sorted(["9pnet", "netfs", "9p", "irqbypass", "kvm", "ccp",
                                    "kvm_amd", "kvm_intel"])
    for before, after in [("9pnet", "9p"), ("netfs", "9p"), ("irqbypass", "kvm"),
                          ("kvm", "kvm_amd"), ("ccp", "kvm_amd"), ("kvm", "kvm_intel")]:
        assert names.index(before) < names.index(after)


def test_closure_skips_builtin_and_names_missing_modules():
    assert kernel.module_closure(MODULES_DEP, ["virtio_pci"], BUILTIN.split()) == []
    with pytest.raises(BedError, match="module virtio_pci is neither in modules.dep"):
        kernel.module_closure(MODULES_DEP, ["virtio_pci"])


def test_module_name_normalizes_suffix_and_dashes():
    assert kernel.module_name("kernel/arch/x86/kvm/kvm-amd.ko.xz") == "kvm_amd"
    assert kernel.module_name("extra/foo.ko") == "foo"


def test_image_release_reads_bzimage_header(tmp_path):
    path = bzimage(tmp_path / "bzImage", "6.13.0-rc1-mypatch")
    assert kernel.image_release(path) == "6.13.0-rc1-mypatch"


def test_user_kernel_accepts_install_mod_path_root(tmp_path):
    mods = module_tree(tmp_path / "inst" / "lib" / "modules" / "6.13.0", "6.13.0")
    bzimage(tmp_path / "bzImage")  # a header without a version string: release from the tree
    k = kernel.user_kernel(tmp_path / "bzImage", tmp_path / "inst", cache=tmp_path / "cache")
    assert k.release == "6.13.0" and k.modules_dir == mods.resolve()
    with pytest.raises(BedError, match="--modules"):
        kernel.user_kernel(tmp_path / "bzImage", tmp_path / "nope", cache=tmp_path / "cache")


def test_closure_from_modinfo_when_tree_has_no_modules_dep(tmp_path):
    mods = tmp_path / "6.99"
    for rel, depends in [("kernel/kvm.ko.xz", "irqbypass"), ("kernel/kvm-amd.ko.xz", "kvm,ccp"),
                         ("kernel/irqbypass.ko.xz", ""), ("kernel/ccp.ko.xz", ""),
                         ("kernel/unrelated.ko.xz", "kvm")]:
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        modinfo = f"license=GPL\0depends={depends}\0vermagic=6.99 SMP\0".encode()
        (mods / rel).write_bytes(lzma.compress(b"\x7fELF...." + modinfo))
    k = kernel.Kernel("6.99", tmp_path / "vmlinuz", mods, "test", tmp_path / "cache")
    names = [kernel.module_name(p) for p in k.closure(["kvm-amd"])]
    assert names.index("irqbypass") < names.index("kvm") < names.index("kvm_amd")
    assert sorted(names) == ["ccp", "irqbypass", "kvm", "kvm_amd"]


def test_plain_module_is_redone_when_the_module_is_rebuilt(tmp_path):
    k = fake_kernel(tmp_path)
    rel = "kernel/arch/x86/kvm/kvm.ko.xz"
    assert k.plain_module(rel).read_bytes() == f"ELF {rel}".encode()
    src = k.modules_dir / rel
    src.write_bytes(lzma.compress(b"rebuilt"))
    os.utime(src, ns=(src.stat().st_mtime_ns + 10**9,) * 2)
    assert k.plain_module(rel).read_bytes() == b"rebuilt"


def test_fetch_debian_falls_back_to_cache_without_apt(tmp_path, monkeypatch):
    root = tmp_path / "kernels" / "linux-image-6.12.5+deb12-amd64-unsigned"
    (root / "root/lib/modules/6.12.5+deb12-amd64").mkdir(parents=True)
    (root / "root/boot").mkdir()
    (root / "root/boot/vmlinuz-6.12.5+deb12-amd64").write_bytes(b"k")
    (root / ".complete").write_text("x")

    def no_apt(line):
        raise debian.AptError("apt-cache: no lists")

    refreshes = []
    monkeypatch.setattr(debian, "debian_package", no_apt)
    monkeypatch.setattr(debian, "refresh_apt_lists", lambda log, why: refreshes.append(why) and False)
    notes = []
    k = debian.fetch_debian("6.12", cache=tmp_path, log=notes.append)
    assert k.release == "6.12.5+deb12-amd64"
    assert refreshes == ["apt-cache: no lists"]     # the lists were offered a refresh first
    assert "using the cached linux-image-6.12.5+deb12-amd64-unsigned" in notes[0]
    with pytest.raises(BedError, match="no lists"):
        debian.fetch_debian("6.1", cache=tmp_path)


def test_fetch_debian_refreshes_stale_apt_lists_and_asks_again(tmp_path, monkeypatch):
    # A machine image's lists know no 6.12 kernel; after apt-get update they do.
    lists = {"fresh": False}
    fetched = []

    def package(line):
        if not lists["fresh"]:
            raise debian.AptError("no linux-image-6.12.N+debNN-amd64-unsigned package is known to apt")
        return "linux-image-6.12.9+deb12-amd64-unsigned"

    def refresh(log, why):
        lists["fresh"] = True
        return True

    monkeypatch.setattr(debian, "debian_package", package)
    monkeypatch.setattr(debian, "refresh_apt_lists", refresh)
    monkeypatch.setattr(debian, "_fetch_package", lambda p, cache, log: fetched.append(p) or p)
    assert debian.fetch_debian("6.12", cache=tmp_path) == "linux-image-6.12.9+deb12-amd64-unsigned"
    assert fetched == ["linux-image-6.12.9+deb12-amd64-unsigned"]
    # What fresh lists cannot mend (here: unpacking) refreshes nothing.
    lists["fresh"] = False
    monkeypatch.setattr(debian, "debian_package", lambda line: "linux-image-6.12.9+deb12-amd64-unsigned")

    def unpack_fails(p, cache, log):
        raise BedError("dpkg-deb -x failed (2): corrupt archive")

    monkeypatch.setattr(debian, "_fetch_package", unpack_fails)
    with pytest.raises(BedError, match="corrupt archive"):
        debian.fetch_debian("6.12", cache=tmp_path)
    assert not lists["fresh"]


def test_refresh_apt_lists_needs_root_or_sudo(monkeypatch):
    ran, notes = [], []
    monkeypatch.setattr(debian, "_run", lambda cmd, **kw: ran.append(cmd) or "")
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(debian.shutil, "which", lambda tool: None)
    assert not debian.refresh_apt_lists(notes.append, why="unknown package")
    assert ran == [] and "run apt-get update" in notes[-1]
    monkeypatch.setattr(debian.shutil, "which", lambda tool: "/usr/bin/sudo")
    assert debian.refresh_apt_lists(notes.append, why="unknown package")
    assert ran == [["sudo", "-n", "apt-get", "update", "-qq"]]

    def refused(cmd, **kw):
        raise BedError("sudo: a password is required")

    monkeypatch.setattr(debian, "_run", refused)
    assert not debian.refresh_apt_lists(notes.append, why="unknown package")
    assert "a password is required" in notes[-1]


# --- the init script ----------------------------------------------------------

MODS = ["kernel/virt/lib/irqbypass.ko", "kernel/arch/x86/kvm/kvm.ko",
        "kernel/arch/x86/kvm/kvm-amd.ko", "kernel/arch/x86/kvm/kvm-intel.ko"]


def test_init_routes_cmdline_params_to_their_modules(tmp_path):
    calls = run_init_load(
        tmp_path,
        "console=ttyS0 panic=-1 quiet kvm.tdp_mmu=N kvm-amd.npt=0 kvm_amd.nested=1 "
        "kvm_intel.ept=0 kvmfoo.x=1 root=/dev/x.y",
        "svm npt", MODS)
    assert calls == [
        "/m/kernel/virt/lib/irqbypass.ko",
        "/m/kernel/arch/x86/kvm/kvm.ko tdp_mmu=N",
        "/m/kernel/arch/x86/kvm/kvm-amd.ko npt=0 nested=1",
    ]  # kvm_intel is not loaded on a CPU without vmx


def test_init_loads_kvm_intel_on_vmx(tmp_path):
    calls = run_init_load(tmp_path, "kvm_intel.ept=0 kvm.eager_page_split=N", "vmx ept", MODS)
    assert calls[-2:] == ["/m/kernel/arch/x86/kvm/kvm.ko eager_page_split=N",
                          "/m/kernel/arch/x86/kvm/kvm-intel.ko ept=0"]


def test_params_cmdline_validates():
    assert rq.params_cmdline({"kvm-amd.npt": "0", "kvm.tdp_mmu": "N"}) == ["kvm_amd.npt=0", "kvm.tdp_mmu=N"]
    # A value with spaces is quoted as the kernel's parser expects.
    assert rq.params_cmdline({"kvm.x": "a b*"}) == ['kvm.x="a b*"']
    for bad in ({"tdp_mmu": "N"}, {"kvm.tdp_mmu": ""}, {".x": "1"}, {"kvm.x": 'a"b'}, {"kvm.x": "a  b"},
                {"kvm.x": " a"}, {"kvm.x": "a\tb"}, {"kvm.x": "a\nb"}, {"kvm x.y": "1"}):
        with pytest.raises(BedError):
            rq.params_cmdline(bad)
    assert rq.parse_param("kvm-amd.npt=0") == ("kvm_amd.npt", "0")
    with pytest.raises(BedError, match="MODULE.PARAM=VALUE"):
        rq.parse_param("kvm.tdp_mmu")


def test_hugepages_at_boot():
    assert rq.hugepages_cmdline({"1G": 1, "2M": 256}) == \
        ["hugepagesz=1G", "hugepages=1", "hugepagesz=2M", "hugepages=256"]
    assert rq.parse_hugepages("1G:2") == ("1G", 2)
    for bad in ("4K:1", "1G", "1G:x", "2M:-1"):
        with pytest.raises(BedError):
            rq.parse_hugepages(bad)


def test_parse_console_markers():
    console = ("[ 1.0] booting\nKVMPY-BED: param kvm.tdp_mmu=N\r\n"
               "garbage KVMPY-BED: param kvm_amd.npt=N\nKVMPY-BED: ready\nhello\nKVMPY-BED: exit 7\n")
    r = rq.parse_console(console)
    # Markers start a line: one after other output on its line is the command's text.
    assert r.status == 7 and r.params == {"kvm.tdp_mmu": "N"}
    assert rq.parse_console("KVMPY-BED: ready\n").status is None


# --- cpio ---------------------------------------------------------------------

def test_cpio_archive_is_readable_by_cpio(tmp_path):
    sh = busybox_sh()
    out = tmp_path / "a.cpio"
    with open(out, "wb") as f:
        w = initramfs.CpioWriter(f)
        w.file("etc/kvmpy/x.txt", b"hello\n")
        w.file("init", b"#!/bin/sh\n", 0o755)
        w.chardev("dev/console", 5, 1)
        w.symlink("bin/sh", "busybox")
        w.close()
    listing = subprocess.run([sh[0], "cpio", "-t", "-v"], input=out.read_bytes(),
                             capture_output=True, check=True).stdout.decode()
    assert "etc/kvmpy/x.txt" in listing and "dev/console" in listing
    console_line = next(l for l in listing.splitlines() if l.endswith("dev/console"))
    assert console_line.startswith("c")
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run([sh[0], "cpio", "-i", "-d", "etc/kvmpy/x.txt", "init"], input=out.read_bytes(),
                   cwd=dest, check=True, capture_output=True)
    assert (dest / "etc/kvmpy/x.txt").read_bytes() == b"hello\n"
    assert os.stat(dest / "init").st_mode & 0o777 == 0o755


def test_build_initramfs_holds_decompressed_closure(tmp_path):
    sh = busybox_sh()
    k = fake_kernel(tmp_path)
    out = initramfs.build_initramfs(k, tmp_path / "initrd", "status=0\n",
                                    ["virtio_pci", "9p", "kvm_amd"], files={"extra/f": (b"x", 0o755)})
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run([sh[0], "cpio", "-i", "-d"], input=out.read_bytes(), cwd=dest,
                   check=True, capture_output=True)
    order = (dest / "etc/kvmpy/modules").read_text().split()
    assert order[-1] == "kernel/arch/x86/kvm/kvm-amd.ko"
    assert order.index("kernel/arch/x86/kvm/kvm.ko") < order.index("kernel/arch/x86/kvm/kvm-amd.ko")
    assert (dest / "lib/modules/kernel/arch/x86/kvm/kvm.ko").read_bytes() == \
        b"ELF kernel/arch/x86/kvm/kvm.ko.xz"
    assert (dest / "init").read_text() == initramfs.INIT_SCRIPT
    assert (dest / "etc/kvmpy/payload.sh").read_text() == "status=0\n"
    assert (dest / "extra/f").read_bytes() == b"x"


# --- QEMU command and job -------------------------------------------------------

def test_job_script_quotes_and_exports(tmp_path):
    req = BedRequest(command=["python3", "-c", "print('a b')"], cwd="/work/x y",
                     env={"FOO": "1 2"})
    script = job.job_script(req, inherit_env={"PATH": "/usr/bin"})
    assert "cd '/work/x y' || {" in script
    assert "exec python3 -c 'print('\"'\"'a b'\"'\"')'" in script
    assert "export FOO='1 2'" in script
    assert f"--junitxml={INSIDE_RESULTS}/junit.xml" in script
    assert f"export PATH={os.path.dirname(sys.executable)}:/usr/bin" in script
    out = subprocess.run(["sh", "-n", "-c", script], capture_output=True)
    assert out.returncode == 0, out.stderr
    with pytest.raises(BedError, match="its own /run"):
        job.job_script(dataclasses.replace(req, cwd="/run/foo"), inherit_env={})


def test_the_scale_and_known_issues_the_user_set_reach_the_suite_inside_the_bed(tmp_path, monkeypatch):
    """The bed inherits no environment: KVMPY_SCALE and KVMPY_KNOWN_ISSUES must be passed on
    (silently dropped, a bed run tested another size, or judged with other known issues, than
    asked), and the known-issues file carried in for a backend that cannot share the host's /."""
    import argparse

    from kvmpy.bed import bochs
    from kvmpy.bed.carry import Stage
    from kvmpy.bed.job import job_script
    from kvmpy.bed.testbed import Bed
    from kvmpy.selftest import bed_runner

    args = argparse.Namespace(backend="qemu", accel="tcg", kernel_version=None, kernel=None, modules=None,
                              timeout=None, param=[], keyword=None, pytest_args=[])
    bed = Bed(bed_runner.bed_options(args))
    monkeypatch.delenv("KVMPY_SCALE", raising=False)
    monkeypatch.delenv("KVMPY_KNOWN_ISSUES", raising=False)
    request = bed.request(bed_runner.suite_job(args))
    assert "KVMPY_SCALE" not in request.env and "KVMPY_KNOWN_ISSUES" not in request.env and not request.carry
    issues = tmp_path / "mine.toml"
    issues.write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVMPY_SCALE", " 3")
    monkeypatch.setenv("KVMPY_KNOWN_ISSUES", "mine.toml")
    request = bed.request(bed_runner.suite_job(args))
    script = job_script(request, inherit_env={})
    assert "export KVMPY_SCALE=3\n" in script and f"export KVMPY_KNOWN_ISSUES={issues}\n" in script
    assert request.carry == (str(issues),)
    stage = Stage(tmp_path / "stage")
    bochs.carry_file(stage, issues)
    assert stage.inside(issues).read_text() == ""
    for bad in (tmp_path, Path("mine.toml"), tmp_path / "gone.toml"):
        with pytest.raises(BedError, match="cannot carry"):
            bochs.carry_file(stage, bad)


def test_qemu_command_line(tmp_path):
    k = kernel.Kernel("6.99", Path("/k/vmlinuz"), Path("/k/mods"), "test", tmp_path)
    be = qemu.QemuBackend(k)
    argv = be.command_line(Path("/x/initrd"), Path("/x/share"),
                           BedRequest(command=["true"], params={"kvm.tdp_mmu": "N"}, mem="4G",
                                      hugepages={"1G": 1}))
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    assert argv[argv.index("-m") + 1] == "4G"
    append = argv[argv.index("-append") + 1].split()
    assert "kvm.tdp_mmu=N" in append and "console=ttyS0" in append and "panic=-1" in append
    assert append[append.index("hugepagesz=1G") + 1] == "hugepages=1"
    assert any("path=/," in a and "readonly=on" in a for a in argv)
    with pytest.raises(BedError, match="--mem"):
        be.command_line(Path("/i"), Path("/s"), BedRequest(command=["true"], mem="lots"))
    with pytest.raises(BedError, match="--accel"):
        qemu.QemuBackend(k, accel="hvf")


def test_console_printer_shows_only_command_output():
    n = "0123456789abcdef0123456789abcdef"
    assert printed(["[ 0.1] Linux", f"KVMPY-BED: {n} nonce", f"KVMPY-BED: {n} param kvm.tdp_mmu=Y",
                    f"KVMPY-BED: {n} ready", "hello", f"KVMPY-BED: {n} exit 0", "[ 5.0] reboot: Power down"]) == "hello\n"


# --- matrix ---------------------------------------------------------------------

JUNIT = b"""<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="selftests.test_a" name="test_ok"/>
<testcase classname="selftests.test_a" name="test_skip"><skipped message="no"/></testcase>
<testcase classname="selftests.test_a" name="test_bad"><failure message="boom"/></testcase>
<testcase classname="selftests.test_a" name="test_ok2"/>
</testsuite></testsuites>"""


def test_param_mismatches():
    eff = {"kvm.tdp_mmu": "Y", "kvm.eager_page_split": "N", "kvm_amd.npt": "N"}
    assert matrix.param_mismatches({"kvm.tdp_mmu": "Y", "kvm_amd.npt": "0"}, eff) == []
    assert matrix.param_mismatches({"kvm.tdp_mmu": "N"}, eff) == \
        ["kvm.tdp_mmu=N did not take effect (reads Y)"]
    assert matrix.param_mismatches({"kvm.tpd_mmu": "N"}, eff) == ["kvm.tpd_mmu: no such parameter"]
    # kvm_intel was not loaded (AMD bed): nothing to check.
    assert matrix.param_mismatches({"kvm_intel.ept": "0"}, eff) == []


def AMD():
    """The facts of a bed whose kvm_amd loaded (one without a vendor module is an error)."""
    from kvmpy.bed.request import BedFacts
    return BedFacts(vendor_module="kvm_amd")


def test_evaluate_and_table():
    cfgs = matrix.AMD_MATRIX
    ok = BedResult(0, "", files={"junit.xml": JUNIT.replace(b'<failure message="boom"/>', b"")},
                   params={"kvm.tdp_mmu": "Y", "kvm.eager_page_split": "Y"}, seconds=12, facts=AMD())
    bad = BedResult(1, "", files={"junit.xml": JUNIT},
                    params={"kvm.tdp_mmu": "Y", "kvm.eager_page_split": "N"}, seconds=13, facts=AMD())
    splat = BedResult(0, "", params={"kvm.tdp_mmu": "N"}, seconds=9, facts=AMD(),
                      kernel_log="[ 3.1] WARNING: CPU: 0 PID: 9 at arch/x86/kvm/mmu/mmu.c:1 f\n")
    ignored = BedResult(0, "", params={"kvm_amd.npt": "Y"}, seconds=8, facts=AMD())
    rows = [matrix.evaluate(c, r) for c, r in zip(cfgs, [ok, bad, splat, ignored])]
    assert [r.verdict for r in rows] == ["PASS", "FAIL", "FAIL", "ERROR"]
    assert rows[1].junit.failed == ["selftests.test_a::test_bad"]
    assert (rows[1].junit.passed, rows[1].junit.skipped) == (2, 1)
    assert rows[2].detail.startswith("kernel splat: WARNING: CPU: 0")
    assert rows[3].detail == "kvm_amd.npt=0 did not take effect (reads Y)"
    table = matrix.format_table(rows, "T")
    lines = table.splitlines()
    assert lines[0] == "T" and lines[1].split()[:3] == ["config", "parameters", "result"]
    assert lines[4].split()[:4] == ["tdp-split", "kvm.tdp_mmu=Y", "kvm.eager_page_split=N", "FAIL"]
    assert "selftests.test_a::test_bad" in lines[4]
    assert matrix.exit_status(rows) == 2
    assert matrix.exit_status(rows[:3]) == 1
    assert matrix.exit_status(rows[:1]) == 0


def test_crashed_bed_reports_the_oops_from_the_console():
    console = ("KVMPY-BED: ready\n[  280.1] BUG: unable to handle page fault for address: 0000000000001000\n"
               "[  280.2] Oops: 0000 [#1] PREEMPT SMP NOPTI\n"
               "[  288.3] Kernel panic - not syncing: Fatal exception in interrupt\n")
    crashed = BedResult(None, console, error="[  288.3] Kernel panic - not syncing: Fatal exception")
    row = matrix.evaluate(matrix.AMD_MATRIX[0], crashed)
    assert row.verdict == "ERROR"
    assert row.detail == "bed kernel crashed: BUG: unable to handle page fault for address: 0000000000001000"
    # A bed that finished is judged by its kernel log only, not by console text.
    done = BedResult(0, "WARNING: printed by the command\n", params={"kvm.tdp_mmu": "Y",
                                                                       "kvm.eager_page_split": "Y"},
                     facts=AMD())
    assert matrix.evaluate(matrix.AMD_MATRIX[0], done).verdict == "PASS"


class FakeBackend(bk.Backend):
    """A machine that boots nothing: the module parameters it was asked for read back as set."""

    name, vendor = "fake", "amd"

    def __init__(self, kernel, seen):
        super().__init__(kernel)
        self.seen = seen

    def check(self):
        pass

    def run(self, request):
        self.seen.append(dict(request.params))
        return BedResult(0, "", params={k: matrix.normalize(v) for k, v in request.params.items()},
                         facts=AMD())


def test_run_matrix_merges_params_per_config(tmp_path):
    seen = []
    fake = FakeBackend(fake_kernel(tmp_path), seen)
    bed = Bed(BedOptions(params={"kvm.x": "1"}), backend=fake)
    rows = matrix.run_matrix([(bed, c) for c in matrix.AMD_MATRIX], Job(["true"]))
    assert [r.verdict for r in rows] == ["PASS"] * 4
    assert seen[3] == {"kvm.x": "1", "kvm_amd.npt": "0"}
    assert seen[0] == {"kvm.x": "1", "kvm.tdp_mmu": "Y", "kvm.eager_page_split": "Y"}


def test_matrices_cover_the_issue_configurations():
    amd = [dict(c.params) for c in matrix.matrix_for("amd")]
    assert {"kvm.tdp_mmu": "N"} in amd and {"kvm_amd.npt": "0"} in amd
    assert {"kvm.tdp_mmu": "Y", "kvm.eager_page_split": "N"} in amd
    assert {"kvm_intel.ept": "0"} in [dict(c.params) for c in matrix.matrix_for("intel")]


def test_boot_splats_are_told_apart_from_kvm_ones():
    from kvmpy.bed.protocol import BOOT_DONE
    from kvmpy.bed.request import kernel_splats

    boot = "[    0.1] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/cpu/topology_common.c:57 parse_legacy+0x10e/0x130\n"
    kvm = "[    9.0] WARNING: CPU: 1 PID: 77 at arch/x86/kvm/mmu/mmu.c:123 kvm_mmu_split+0x1/0x2\n"
    r = BedResult(status=0, console="", kernel_log=boot + f"[    3.0] {BOOT_DONE}\n" + kvm)
    before, after = kernel_splats(r)
    assert len(before) == 1 and "topology_common" in before[0]
    assert len(after) == 1 and "kvm/mmu/mmu.c" in after[0]
    # Without the marker (a kernel log cut short), everything counts.
    r = BedResult(status=0, console="", kernel_log=boot + kvm)
    assert kernel_splats(r) == ([], kernel_splats(r)[1]) and len(kernel_splats(r)[1]) == 2
