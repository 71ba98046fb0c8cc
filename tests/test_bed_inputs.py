"""What reaches the bed from outside: options and kernels checked before anything is fetched
or boots, module parameters passed intact, and result files confined to the results directory.

No machine boots here: the backends' ``run`` and the Debian download are replaced by
functions that fail the test if they are reached.
"""

import argparse
import base64
import io
import lzma
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from kvmpy.bed import cli, debian, initramfs, qemu, testbed
from kvmpy.bed.bochs import BochsBackend
from kvmpy.bed.console_files import RESULTS_BEGIN, RESULTS_END, extract_files
from kvmpy.bed.options import BedOptions
from kvmpy.bed.protocol import BedError
from kvmpy.bed.qemu import QemuBackend
from kvmpy.bed.request import BedFacts, BedRequest, BedResult, params_cmdline, parse_console
from kvmpy.bed.results import files_from_dir, files_from_tar, read_log, save_result
from kvmpy.bed.testbed import Bed

from bed_fakes import MODULES_DEP, busybox_sh, bzimage, fake_kernel, module_tree, run_init_load

AMD_MISSING = "\n".join(l for l in MODULES_DEP.splitlines() if "kvm-amd" not in l) + "\n"
INTEL_MISSING = "\n".join(l for l in MODULES_DEP.splitlines() if "kvm-intel" not in l) + "\n"


@pytest.fixture
def guarded(monkeypatch):
    def boot(self, request):
        raise AssertionError("the bed booted")

    def download(*a, **kw):
        raise AssertionError("a kernel was fetched")

    monkeypatch.setattr(QemuBackend, "run", boot)
    monkeypatch.setattr(BochsBackend, "run", boot)
    monkeypatch.setattr(testbed, "fetch_debian", download)
    monkeypatch.setattr(debian, "fetch_debian", download)


def user_build(tmp_path, modules_dep=MODULES_DEP, release="6.13.0", built_for=None, builtin=""):
    """(bzImage, modules root) of a kernel "the user built"."""
    root = tmp_path / "inst"
    module_tree(root / "lib" / "modules" / release, built_for or release, modules_dep, builtin)
    return bzimage(tmp_path / "bzImage", release), root


# --- issue 11.3: a kernel without the vendor module --------------------------------

def test_kernel_without_kvm_amd_is_refused_before_booting(guarded, tmp_path):
    image, mods = user_build(tmp_path, AMD_MISSING)
    with pytest.raises(BedError, match=r"no kvm-amd\.ko .*modules\.builtin.*CONFIG_KVM_AMD=m"):
        Bed(BedOptions(kernel=image, modules=mods))
    # Built in is as good as a module; Bochs needs kvm-intel instead, which is there.
    image, mods = user_build(tmp_path / "b", AMD_MISSING, builtin="kernel/arch/x86/kvm/kvm-amd.ko\n")
    assert Bed(BedOptions(kernel=image, modules=mods)).kernel.release == "6.13.0"
    assert Bed(BedOptions(backend="bochs", kernel=image, modules=mods)).vendor == "intel"


def test_kernel_without_kvm_intel_is_refused_for_bochs(guarded, tmp_path):
    image, mods = user_build(tmp_path, INTEL_MISSING)
    with pytest.raises(BedError, match=r"no kvm-intel\.ko .*CONFIG_KVM_INTEL"):
        Bed(BedOptions(backend="bochs", kernel=image, modules=mods))
    assert Bed(BedOptions(kernel=image, modules=mods)).vendor == "amd"


def test_selftest_bed_without_vendor_module_is_a_harness_error_not_a_skip(guarded, tmp_path):
    from kvmpy.selftest import bed_runner

    image, mods = user_build(tmp_path, AMD_MISSING)
    args = argparse.Namespace(backend=None, accel="tcg", kernel_version=None, kernel=str(image),
                              modules=str(mods), timeout=None, param=[], matrix=False, keyword=None,
                              pytest_args=[], junit=str(tmp_path / "j.xml"))
    [run] = bed_runner.run(args, quiet=True)
    assert "CONFIG_KVM_AMD" in run.harness_error and not run.tests
    # --junit holds the error (a CI system finds it, not a missing file).
    assert "CONFIG_KVM_AMD" in (tmp_path / "j.xml").read_text()


def test_bed_run_without_vendor_module_exits_2_naming_it(guarded, tmp_path, capsys):
    image, mods = user_build(tmp_path, AMD_MISSING)
    assert cli.main(["run", "--kernel", str(image), "--modules", str(mods), "--", "true"]) == 2
    assert "kvm-amd.ko" in capsys.readouterr().err


# --- issue 11.11: bad kernel inputs, named before any download or boot -----------------

def test_elf_vmlinux_and_other_files_are_not_bzimages(guarded, tmp_path):
    _, mods = user_build(tmp_path)
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 4000)
    with pytest.raises(BedError, match="ELF vmlinux.*use arch/x86/boot/bzImage"):
        Bed(BedOptions(kernel=vmlinux, modules=mods))
    other = tmp_path / "System.map"
    other.write_text("ffffffff81000000 T _text\n" * 100)
    with pytest.raises(BedError, match="not a bzImage.*use arch/x86/boot/bzImage"):
        Bed(BedOptions(kernel=other, modules=mods))


def test_modules_of_another_release_are_refused(guarded, tmp_path):
    image, mods = user_build(tmp_path, release="6.13.0", built_for="6.12.0-other")
    with pytest.raises(BedError, match="release 6.13.0.*built for 6.12.0-other"):
        Bed(BedOptions(kernel=image, modules=mods))
    # KVM built in: the other modules the bed loads (9p, overlay) must match too.
    no_kvm = "".join(l + "\n" for l in MODULES_DEP.splitlines() if "/kvm/" not in l)
    image, mods = user_build(tmp_path / "b", no_kvm, release="6.13.0", built_for="6.12.0-other",
                             builtin="kernel/arch/x86/kvm/kvm.ko\nkernel/arch/x86/kvm/kvm-amd.ko\n")
    with pytest.raises(BedError, match="built for 6.12.0-other"):
        Bed(BedOptions(kernel=image, modules=mods))


@pytest.mark.parametrize("argv, message", [
    (["--param", "kvm.tdp_mmu"], "MODULE.PARAM=VALUE"),
    (["--param", "tdp_mmu=N"], "MODULE.PARAM"),
    (["--param", 'kvm.x=a"b'], "quote"),
    (["--hugepages", "1G"], "SIZE:COUNT"),
    (["--hugepages", "4K:1"], "2M and 1G"),
    (["--mem", "lots"], "--mem"),
    (["--smp", "0"], "--smp"),
    (["--timeout", "0"], "--timeout"),
    (["--kernel-version", "6.12", "--kernel", "/k"], "go together|does not go"),
    (["--backend", "bochs", "--accel", "kvm"], "QEMU only"),
    (["--follow", "../log.txt"], "cannot follow '../log.txt': a results file to follow is a plain file name"),
])
def test_bad_options_are_named_before_anything_is_fetched(guarded, argv, message, capsys):
    assert cli.main(["run", *argv, "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "fetched" not in err and "booted" not in err
    assert re.search(message, err), err


# --- issue 13.9: module parameter values reach insmod intact -------------------------

def test_init_passes_values_with_glob_characters_and_spaces_as_one_argument(tmp_path):
    """The kernel command line from params_cmdline, parsed by the real init, a fake insmod."""
    words = params_cmdline({"kvm.name": "a b*", "kvm.glob": "*", "kvm_amd.npt": "0"})
    (tmp_path / "glob=expanded").write_text("")  # what an unquoted glob=* would turn into
    calls = run_init_load(tmp_path, " ".join(["console=ttyS0", *words, "quiet"]), "svm",
                          ["kvm.ko", "kvm-amd.ko"], each_arg=True)
    # insmod joins its arguments into the string the kernel parses: the quotes keep the spaces.
    assert calls == ['[/m/kvm.ko][name="a b*"][glob=*]', "[/m/kvm-amd.ko][npt=0]"]


# --- issue 13.8: result files confined to the results directory -----------------------

def _member(tar, name, data=b"", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _console_with(members) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for args in members:
            _member(tar, *args)
    block = base64.encodebytes(buf.getvalue()).decode()
    return f"boot\n{RESULTS_BEGIN}\n{block}{RESULTS_END}\nKVMPY-BED: exit 0\n"


def _host_files(root: Path, outdir: Path):
    return sorted(p for p in root.rglob("*") if not p.is_dir() and outdir not in p.parents)


def test_crafted_results_tarball_writes_nothing_outside_the_results_dir(tmp_path):
    outdir = tmp_path / "a" / "b" / "results"
    console = _console_with([
        ("./results/junit.xml", b"<testsuite/>"),
        ("results/../../escaped", b"x"),
        ("../../../escaped-too", b"x"),
        (f"{tmp_path}/absolute", b"x"),
        ("results/link", b"", tarfile.SYMTYPE, "/etc/passwd"),
        ("results/hard", b"", tarfile.LNKTYPE, "results/junit.xml"),
        ("results/dev", b"", tarfile.CHRTYPE),
        ("results/fifo", b"", tarfile.FIFOTYPE),
        ("./dmesg.txt", b"[ 1.0] hello\n"),
    ])
    files, log, dropped = extract_files(console)
    assert files == {"junit.xml": b"<testsuite/>"}
    assert log == "[ 1.0] hello\n"
    assert len(dropped) == 7 and any("escaped" in d and "leaves" in d for d in dropped)
    assert any(d.startswith("results/link: not a regular file") for d in dropped)
    before = _host_files(tmp_path, outdir)
    save_result(BedResult(0, console, files=files, kernel_log=log), outdir)
    assert _host_files(tmp_path, outdir) == before
    assert sorted(p.name for p in outdir.iterdir()) == ["console.log", "junit.xml", "kernel.log"]


def test_results_tarball_sizes_are_bounded():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _member(tar, "results/small", b"s" * 10)
        _member(tar, "results/big", b"b" * 100)
        _member(tar, "results/after", b"a" * 60)
        _member(tar, "results/last", b"l")
    files, dropped = files_from_tar(buf.getvalue(), limit=64, total=200)
    assert files == {"results/small": b"s" * 10, "results/after": b"a" * 60, "results/last": b"l"}
    assert dropped == ["results/big: 100 bytes, over the 64-byte bound"]
    # What is skipped is still decompressed: it counts against the total too.
    files, dropped = files_from_tar(buf.getvalue(), limit=64, total=150)
    assert list(files) == ["results/small"]
    assert dropped[-1] == "results/after and what follows: over the 150-byte total bound"


def test_share_results_keep_regular_files_only_and_bounded(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    share = tmp_path / "share"
    (share / "results" / "sub").mkdir(parents=True)
    (share / "results" / "sub" / "ok.txt").write_text("ok")
    os.symlink(secret, share / "results" / "link")
    os.symlink(tmp_path, share / "results" / "dirlink")
    os.mkfifo(share / "results" / "fifo")
    with open(share / "results" / "huge", "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used
    files, dropped = files_from_dir(share / "results", limit=1 << 20)
    assert files == {"sub/ok.txt": b"ok"}
    assert sorted(d.split(":")[0] for d in dropped) == ["dirlink", "fifo", "huge", "link"]
    # The bed's dmesg is brought back the same way: a link to a host file is not followed.
    os.symlink(secret, share / "dmesg.txt")
    dropped = []
    assert read_log(share / "dmesg.txt", dropped) == "" and dropped == ["dmesg.txt: a symbolic link"]


def test_qemu_brings_back_no_host_file_the_bed_links_to(tmp_path, monkeypatch):
    """QemuBackend.run end to end, its machine replaced by one that plants links in the share."""
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")

    def machine(argv, request, start):
        share = Path(next(a for a in argv if "mount_tag=kvmpyshare" in a).split("path=")[1].split(",")[0])
        (share / "results" / "junit.xml").write_text("<testsuite/>")
        os.symlink(secret, share / "results" / "stolen")
        os.symlink(secret, share / "dmesg.txt")
        return "KVMPY-BED: module kvm_amd\nKVMPY-BED: ready\nKVMPY-BED: exit 0\n", 1.0, False, 1

    monkeypatch.setattr(qemu, "_run_machine", machine)
    monkeypatch.setattr(QemuBackend, "check", lambda self: None)
    backend = QemuBackend(fake_kernel(tmp_path))
    result = backend.run(BedRequest(command=["true"], cwd=str(tmp_path)))
    assert result.status == 0 and result.files == {"junit.xml": b"<testsuite/>"}
    assert result.kernel_log == "" and "host secret" not in repr(result)
    assert sorted(result.dropped) == ["dmesg.txt: a symbolic link", "stolen: a symbolic link"]
    assert (result.facts.backend, result.facts.vendor_module, result.facts.cpu) == ("qemu", "kvm_amd",
                                                                                   qemu.TCG_CPU)


def test_save_refuses_names_and_links_leading_outside(tmp_path):
    outdir = tmp_path / "a" / "out"
    for name in ("../escaped", f"{tmp_path}/absolute", "x/../../escaped"):
        with pytest.raises(BedError, match="outside"):
            save_result(BedResult(0, "", files={name: b"x"}), outdir)
    os.symlink(tmp_path, outdir / "up")
    with pytest.raises(BedError, match="leads outside"):
        save_result(BedResult(0, "", files={"up/escaped": b"x"}), outdir)
    assert not list(tmp_path.rglob("escaped")) and not (tmp_path / "absolute").exists()


# --- the facts a result carries --------------------------------------------------------

def test_console_facts_and_machine_facts():
    console = ("KVMPY-BED: kernel 6.12.9-amd64\nKVMPY-BED: cpu AMD EPYC (QEMU TCG)\n"
               "KVMPY-BED: module kvm_amd\nKVMPY-BED: hugepages 2048kB=32\n"
               "KVMPY-BED: hugepages 1048576kB=1\nKVMPY-BED: param kvm_amd.nested=1\n"
               "KVMPY-BED: param kvm.tdp_mmu=Y\nKVMPY-BED: exit 0\n")
    result = parse_console(console)
    result.facts.complete(BedFacts(backend="qemu", accel="tcg", cpu="max,la57=off", kernel="x",
                                   kernel_origin="debian:linux-image-6.12"))
    f = result.facts
    assert (f.kernel, f.cpu_model, f.vendor_module) == ("6.12.9-amd64", "AMD EPYC (QEMU TCG)", "kvm_amd")
    assert f.hugepages == {"2M": 32, "1G": 1} and f.params == result.params
    assert f.summary() == ("qemu/tcg (max,la57=off: AMD EPYC (QEMU TCG)), kernel 6.12.9-amd64, kvm_amd kvm_amd.nested=1 "
                           "kvm.tdp_mmu=Y, hugepages 1G:1 2M:32")
    assert f.to_dict()["kernel_origin"] == "debian:linux-image-6.12"


@pytest.mark.parametrize("params,mmu", [
    ({"kvm_amd.npt": "Y", "kvm.tdp_mmu": "Y"}, "TDP MMU"),
    ({"kvm_amd.npt": "Y", "kvm.tdp_mmu": "N"}, "shadow MMU over TDP"),
    # 6.1's shadow row: kvm.tdp_mmu still reads Y, but without NPT there is no TDP MMU.
    ({"kvm_amd.npt": "0", "kvm.tdp_mmu": "Y"}, "shadow MMU with shadow paging (TDP off)"),
])
def test_facts_name_the_mmu_the_parameters_give(params, mmu):
    facts = BedFacts(backend="qemu", kernel="6.1.0-amd64", vendor_module="kvm_amd", params=params)
    assert facts.mmu() == mmu
    assert facts.summary().endswith(f", MMU: {mmu}")


def test_facts_without_the_tdp_parameter_name_no_mmu():
    assert BedFacts(vendor_module="kvm_amd", params={"kvm.tdp_mmu": "Y"}).mmu() == ""
    assert BedFacts(params={"kvm.tdp_mmu": "Y"}).mmu() == ""


def test_init_reports_cpu_model_and_vendor_module(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Fake CPU: v2\nflags\t\t: svm\n")
    (tmp_path / "init").write_text(initramfs.INIT_SCRIPT)
    env = dict(os.environ, KVMPY_INIT_TEST="1", KVMPY_CPUINFO=str(tmp_path / "cpuinfo"))
    out = subprocess.run([*busybox_sh(), "-c", f". {tmp_path / 'init'}; report_facts"], env=env,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    facts = parse_console(out).facts
    assert facts.cpu_model == "Fake CPU: v2"
    assert facts.kernel == os.uname().release


def test_user_kernel_tree_without_modules_dep_is_checked_through_modinfo(guarded, tmp_path):
    mods = tmp_path / "inst" / "lib" / "modules" / "6.13.0"
    for rel, depends in [("kernel/kvm.ko.xz", ""), ("kernel/kvm-intel.ko.xz", "kvm")]:
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(lzma.compress(f"\0depends={depends}\0vermagic=6.13.0 SMP\0".encode()))
    image = bzimage(tmp_path / "bzImage", "6.13.0")
    assert Bed(BedOptions(backend="bochs", kernel=image, modules=tmp_path / "inst")).kernel.release == "6.13.0"
    with pytest.raises(BedError, match="CONFIG_KVM_AMD"):
        Bed(BedOptions(kernel=image, modules=tmp_path / "inst"))


# --- the results directory and contradictory options, before anything boots -------------

@pytest.mark.parametrize("where", ["file", "proc", "proc-dir"])
def test_results_directory_is_checked_before_booting(guarded, tmp_path, capsys, where):
    results = {"file": tmp_path / "afile", "proc": Path("/proc/x/y"), "proc-dir": Path("/proc")}[where]
    (tmp_path / "afile").write_text("not a directory\n")
    for command in (["run", "--results", str(results), "--", "true"], ["matrix", "--results", str(results)]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert f"--results {results}" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "not a directory\n"


def test_results_directory_is_made_before_booting(guarded, tmp_path):
    from kvmpy.bed.results import prepare_results_dir

    assert prepare_results_dir(tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []


def test_save_files_that_cannot_be_written_raise_bed_error(tmp_path):
    from kvmpy.bed.results import save_files

    (tmp_path / "afile").write_text("x")
    for outdir in (tmp_path / "afile", Path("/proc/x/y"), tmp_path / "afile" / "sub"):
        with pytest.raises(BedError, match="results directory|cannot write"):
            save_files({"a.txt": b"x"}, outdir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("x")      # a file where a directory of a result must go
    with pytest.raises(BedError, match="cannot write"):
        save_files({"sub/a.txt": b"x"}, tmp_path / "out")


class _FakeBed:
    vendor = "amd"
    options = BedOptions()

    def describe(self) -> str:
        return "fake bed"

    def run(self, job, params=None):
        return BedResult(0, "console text\n", files={"junit.xml": b"<testsuite/>"})


def test_results_that_cannot_be_saved_after_a_run_are_kept_elsewhere(tmp_path, monkeypatch, capsys):
    """The directory became unusable during the boot: the results go to a temporary directory,
    said so, and the run is an error (exit 2)."""
    monkeypatch.setattr(cli, "_prepared_bed", lambda args: _FakeBed())
    import kvmpy.bed.results as results
    monkeypatch.setattr(results.tempfile, "mkdtemp",
                        lambda prefix="": (tmp_path / "kept").mkdir() or str(tmp_path / "kept"))
    (tmp_path / "afile").write_text("x")
    assert cli.main(["run", "--results", str(tmp_path / "afile"), "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "results not saved" in err and f"results saved in {tmp_path / 'kept'} instead" in err
    assert (tmp_path / "kept" / "junit.xml").read_bytes() == b"<testsuite/>"


def test_matrix_goes_on_when_a_row_cannot_be_saved(tmp_path, monkeypatch, capsys):
    from kvmpy.bed import matrix

    class Row:
        def __init__(self, name):
            self.config = type("Config", (), {"name": name})()
            self.result = BedResult(0, f"{name} console\n")
            self.splats = []

        def progress_line(self, i, n):
            return f"row {i}/{n} {self.config.name}"

    def run_matrix(pairs, job, progress):
        rows = [Row(config.name) for _, config in pairs]
        for i, row in enumerate(rows, 1):
            progress(i, len(rows), row)
        return rows

    monkeypatch.setattr(cli, "_prepared_bed", lambda args: _FakeBed())
    import kvmpy.bed.results as results
    monkeypatch.setattr(results.tempfile, "mkdtemp",      # the fallback: not a real /tmp directory
                        lambda prefix="": (tmp_path / "kept").mkdir() or str(tmp_path / "kept"))
    monkeypatch.setattr(matrix, "run_matrix", run_matrix)
    monkeypatch.setattr(matrix, "format_table", lambda rows, title: "TABLE " + " ".join(r.config.name for r in rows))
    monkeypatch.setattr(matrix, "exit_status", lambda rows: 0)
    configs = matrix.select_configs("amd", [])
    assert len(configs) >= 2
    out = tmp_path / "res"
    out.mkdir()
    (out / configs[0].name).write_text("a file where the first row's directory goes")
    assert cli.main(["matrix", "--results", str(out), "--", "true"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("TABLE ") and all(c.name in captured.out for c in configs)
    assert f"results not saved in {out / configs[0].name}" in captured.err
    assert (out / configs[1].name / "console.log").read_text() == f"{configs[1].name} console\n"


@pytest.mark.parametrize("vendor, backend", [("intel", "qemu"), ("amd", "bochs")])
def test_contradictory_vendor_and_backend_are_refused(guarded, capsys, vendor, backend):
    assert cli.main(["run", "--vendor", vendor, "--backend", backend, "--", "true"]) == 2
    err = capsys.readouterr().err
    assert f"--vendor {vendor} and --backend {backend}" in err and "Traceback" not in err
    args = argparse.Namespace(vendor=vendor, backend=backend, kernel_version=None, kernel=None, modules=None,
                              accel="tcg", mem="2G", smp=2, timeout=600.0, param=[], hugepages=[])
    with pytest.raises(BedError, match="contradict"):
        cli.bed_options(args)
    args.backend = {"intel": "bochs", "amd": "qemu"}[vendor]
    assert cli.bed_options(args).backend == args.backend
