"""The Bochs backend of the bed: configuration, media, payload, results.

The unit tests need no Bochs.  The integration test boots Bochs (several
minutes of emulation): select it with ``pytest -m bed``.
"""

import base64
import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kvmpy.bed import carry
from kvmpy.bed.bochs import BOCHS, CPU_MODEL, BochsBackend, bochsrc, isolinux_cfg, kernel_append
from kvmpy.bed.console_files import RESULTS_BEGIN, RESULTS_END, extract_files, followed_files, followers_script
from kvmpy.bed.initramfs import busybox
from kvmpy.bed.kernel import Kernel
from kvmpy.bed.machine import ConsoleLog
from kvmpy.bed.media import append_archive, make_iso, write_cpio
from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import BedRequest, megabytes

REPO = Path(__file__).resolve().parents[1]


def fake_kernel(tmp_path):
    image = tmp_path / "vmlinuz"
    image.write_bytes(b"not a kernel")
    mods = tmp_path / "lib/modules/6.12.0-test"
    mods.mkdir(parents=True)
    return Kernel("6.12.0-test", image, mods, "user:test", tmp_path / "cache")


def test_bochsrc_has_vmx_cpu_media_serial_and_quiet_logging(tmp_path):
    rc = bochsrc(tmp_path / "boot.iso", tmp_path / "serial.out", tmp_path / "bochs.log",
                 megs=768, disc=tmp_path / "payload.iso", ips=50_000_000)
    lines = rc.splitlines()
    assert "megs: 768" in lines
    assert f"cpu: model={CPU_MODEL}, count=1, ips=50000000, reset_on_triple_fault=0" in lines
    assert f"ata0-master: type=cdrom, path={tmp_path / 'boot.iso'}, status=inserted" in lines
    assert f"ata0-slave: type=cdrom, path={tmp_path / 'payload.iso'}, status=inserted" in lines
    assert "boot: cdrom" in lines
    assert f"com1: enabled=1, mode=file, dev={tmp_path / 'serial.out'}" in lines
    assert "display_library: term" in lines
    assert any(l.startswith("clock: sync=none") for l in lines)
    # without a payload disc the second drive is absent
    assert "ata0-slave" not in bochsrc(tmp_path / "b.iso", tmp_path / "s", tmp_path / "l", 512)


def test_bochsrc_caps_memory_at_what_bochs_accepts(tmp_path):
    """Bochs 2.7 panics on megs > 2048 before it opens its log; `selftest --bed` asks for 4G."""
    rc = bochsrc(tmp_path / "b.iso", tmp_path / "s", tmp_path / "l", megabytes("4G"))
    assert "megs: 2048" in rc.splitlines()
    assert "megs: 2047" in bochsrc(tmp_path / "b.iso", tmp_path / "s", tmp_path / "l", 2047).splitlines()


def test_megabytes():
    assert megabytes("2G") == 2048
    assert megabytes("768M") == 768
    assert megabytes("1024") == 1024
    for bad in ("", "0", "2T", "1.5G", "-1G"):
        with pytest.raises(BedError):
            megabytes(bad)


def test_kernel_command_line_routes_params():
    req = BedRequest(command=["true"], params={"kvm_intel.ept": "0", "kvm.eager_page_split": "N"},
                     append=("loglevel=4",), hugepages={"2M": 32})
    words = kernel_append(req)
    assert words[:3] == ["console=ttyS0,115200", "panic=-1", "quiet"]
    assert "kvm_intel.ept=0" in words and "kvm.eager_page_split=N" in words
    # Bochs's page-modification log is not the SDM's: PML off unless asked for.
    assert "kvm_intel.pml=0" in words
    asked = kernel_append(BedRequest(command=["true"], params={"kvm_intel.pml": "1"}))
    assert "kvm_intel.pml=1" in asked and "kvm_intel.pml=0" not in asked
    # `selftest --bed --backend bochs` asks for 2M pages: they are reserved at boot.
    assert words[words.index("hugepagesz=2M") + 1] == "hugepages=32"
    assert words[-1] == "loglevel=4"
    cfg = isolinux_cfg(words)
    assert "KERNEL /vmlinuz" in cfg and "INITRD /initrd.img" in cfg
    assert "APPEND " + " ".join(words) in cfg
    assert "PROMPT 0" in cfg  # no boot prompt to wait at


def test_backend_rejects_unknown_payload(tmp_path):
    with pytest.raises(BedError, match="initramfs, disc"):
        BochsBackend(fake_kernel(tmp_path), payload="floppy")


def test_check_names_the_apt_package(tmp_path):
    backend = BochsBackend(fake_kernel(tmp_path), bochs="bochs-bin-that-is-not-installed")
    with pytest.raises(BedError, match="apt-get install .*bochs bochsbios vgabios bochs-term"):
        backend.check()


def _results_block(files, dmesg="[ 1.0] hello\n"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {**{f"results/{k}": v for k, v in files.items()},
                           "dmesg.txt": dmesg.encode()}.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    text = base64.encodebytes(buf.getvalue()).decode()
    return text


def test_extract_files_from_console_with_kernel_noise():
    block = _results_block({"junit.xml": b"<testsuite/>", "sub/x.txt": b"x"}, "[ 2.0] WARNING: x\n")
    lines = block.splitlines()
    # The kernel's own printk can land in the middle of the serial stream.
    noisy = "\r\n".join(lines[:1] + ["[   12.3] random: crng init done"] + lines[1:])
    console = f"boot\n{RESULTS_BEGIN}\n{noisy}\n{RESULTS_END}\nKVMPY-BED: exit 0\n"
    files, log, dropped = extract_files(console)
    assert files == {"junit.xml": b"<testsuite/>", "sub/x.txt": b"x"}
    assert "WARNING: x" in log
    assert dropped == []


def test_extract_files_truncated_block_gives_nothing():
    block = _results_block({"junit.xml": b"<testsuite/>" * 1000})
    console = f"{RESULTS_BEGIN}\n{block[: len(block) // 2]}\n{RESULTS_END}\n"
    assert extract_files(console) == ({}, "", [])
    assert extract_files("no block at all") == ({}, "", [])


def _busybox_path(tmp_path) -> str:
    """A PATH on which the tools the bed's init runs are busybox's, as in the bed."""
    try:
        bb = busybox()
    except BedError as e:
        pytest.skip(str(e))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "setsid", "tail", "sleep", "echo"):
        (bin_dir / tool).symlink_to(bb)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_followed_results_files_come_over_the_console_as_they_are_written(tmp_path):
    """What a Bochs machine that never reaches its files block (stopped, or past its timeout)
    still brings back: the payload's followers send each line of a followed results file to the
    console as it is written, and stop_followers ends them (tail and loop)."""
    results = tmp_path / "results"
    results.mkdir()
    progress = results / "results.json.progress"
    lines = ['{"started": "t.py::a"}', r'{"test": {"nodeid": "t.py::a", "reason": "a \\ b  c"}}']
    script = "\n".join([
        followers_script(["results.json.progress", "never.txt"]),
        f"start_followers {results}",
        f"sleep 0.2; echo '{lines[0]}' >> {progress}",     # the file appears after the start
        f"sleep 1.2; echo '{lines[1]}' >> {progress}",
        "sleep 1.5; stop_followers; sleep 0.3; echo job done",
    ])
    # The followers share our stdout: if one outlived stop_followers, this would time out.
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PATH": _busybox_path(tmp_path)})
    assert out.returncode == 0, out.stderr
    log = ConsoleLog(BedRequest(command=["true"]), 0.0)
    log.feed(out.stdout.encode())
    assert log.lines == ["job done"]
    assert followed_files(log.followed, ["results.json.progress", "never.txt"]) == (
        {"results.json.progress": progress.read_bytes()}, [])
    assert progress.read_text().splitlines() == lines


def test_console_log_keeps_followed_lines_apart_and_unechoed():
    echoed = []
    log = ConsoleLog(BedRequest(command=["true"], on_console=echoed.append), 0.0)
    log.feed(b"boot\r\nKVMPY-BED: follow p {\"x\": 1}\n[  3.1] kvm: hiKVMPY-BED: follow p {}\nKVMPY-BED: follow q \nend\n")
    assert log.lines == ["boot", "[  3.1] kvm: hi", "end"] and echoed == log.lines
    assert log.followed == {"p": ['{"x": 1}', "{}"], "q": [""]}
    assert followed_files(log.followed, ["p", "q", "r"]) == ({"p": b'{"x": 1}\n{}\n', "q": b"\n"}, [])


def test_a_followed_file_past_the_size_limit_is_dropped_and_named(monkeypatch):
    from kvmpy.bed import console_files
    monkeypatch.setattr(console_files, "MAX_FILE_BYTES", 10)
    files, dropped = followed_files({"big": ["x" * 20], "small": ["ok"]}, ["big", "small"])
    assert files == {"small": b"ok\n"}
    assert dropped == ["big: followed over the console, 21 bytes, past the size limit"]


def test_a_run_without_its_files_brings_back_what_was_followed(tmp_path, monkeypatch):
    """The backend's glue: no result file in the files block (here: one whose only member was
    dropped), so the followed file is what comes back, and the drop is still named."""
    from kvmpy.bed import bochs
    block = _results_block({"../escape": b"x"})
    console = f"{RESULTS_BEGIN}\n{block}\n{RESULTS_END}\n"
    monkeypatch.setattr(BochsBackend, "check", lambda self: None)
    monkeypatch.setattr(BochsBackend, "prepare", lambda self, request, tmp: (tmp / "boot.iso", None, []))
    monkeypatch.setattr(bochs, "_run_machine", lambda *a: (console, {"p.progress": ['{"started": "t"}']},
                                                           None, True, 4242, None))
    result = BochsBackend(fake_kernel(tmp_path)).run(
        BedRequest(command=["true"], timeout=60, follow=("p.progress",), env={"PYTHONPATH": "/x"}))
    assert result.files == {"p.progress": b'{"started": "t"}\n'}
    assert result.timed_out and result.status is None
    assert any("escape" in d for d in result.dropped), result.dropped


@pytest.mark.parametrize("name", ["../x", "a b", ".hidden", "a;reboot", "", "x/y"])
def test_a_followed_file_is_a_plain_name(name):
    with pytest.raises(BedError, match="a results file to follow is a plain file name"):
        BedRequest(command=["true"], follow=(name,))


def test_stage_mirrors_host_paths_keeps_links_and_mtimes(tmp_path):
    src = tmp_path / "host" / "pkg"
    (src / "__pycache__").mkdir(parents=True)
    (src / "a.py").write_text("A = 1\n")
    os.utime(src / "a.py", (1_600_000_000, 1_600_000_000))
    (src / "__pycache__" / f"a.{sys.implementation.cache_tag}.pyc").write_bytes(b"x")
    (src / "__pycache__" / f"a.{sys.implementation.cache_tag}.opt-1.pyc").write_bytes(b"x")
    os.symlink("a.py", src / "link.py")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref\n")
    stage = carry.Stage(tmp_path / "stage")
    stage.add_tree(src, exclude=carry.TREE_EXCLUDE, keep=carry._pycache_keep(sys.implementation.cache_tag))
    inside = stage.inside(src)
    assert (inside / "a.py").read_text() == "A = 1\n"
    assert (inside / "a.py").stat().st_mtime == 1_600_000_000  # .pyc validity depends on it
    assert os.readlink(inside / "link.py") == "a.py"
    assert not (inside / ".git").exists()
    assert not (inside / "__pycache__").exists()  # excluded by TREE_EXCLUDE


def test_stage_tree_carries_pytests_rewrites_not_stale_bytecode(tmp_path):
    tag = sys.implementation.cache_tag
    src = tmp_path / "checkout" / "selftests"
    (src / "__pycache__").mkdir(parents=True)
    (src / "test_a.py").write_text("def test_a():\n    assert 1\n")
    rewritten = src / "__pycache__" / f"test_a.{tag}-pytest-9.2.0.pyc"
    rewritten.write_bytes(b"rewritten")
    (src / "__pycache__" / f"test_a.{tag}.pyc").write_bytes(b"stale")
    (src / "__pycache__" / "test_a.cpython-39-pytest-9.2.0.pyc").write_bytes(b"other python")
    stage = carry.Stage(tmp_path / "stage")
    carry.stage_tree(stage, tmp_path / "checkout")
    cache = stage.inside(src / "__pycache__")
    assert (cache / rewritten.name).read_bytes() == b"rewritten"
    assert (cache / f"test_a.{tag}.pyc").read_bytes() != b"stale"  # compiled for the stage
    assert not (cache / "test_a.cpython-39-pytest-9.2.0.pyc").exists()


def test_stdlib_pruning():
    keep = carry._stdlib_keep("cpython-311")
    assert keep("os.py") and keep("json/__init__.py") and keep("lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so")
    assert keep("__pycache__/os.cpython-311.pyc")
    assert not keep("__pycache__/os.cpython-311.opt-2.pyc")
    assert not keep("test/test_os.py") and not keep("tkinter/__init__.py")
    assert not keep("site-packages/numpy/__init__.py")
    assert not keep("lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so")
    assert not keep("config-3.11-x86_64-linux-gnu/libpython3.11.a")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed: apt-get install cpio")
def test_archives_concatenate_aligned_with_mtimes(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a/b").mkdir(parents=True)
    (tree / "a/b/f.txt").write_text("data")
    os.utime(tree / "a/b/f.txt", (1_500_000_000, 1_500_000_000))
    archive = write_cpio(tmp_path / "tree.cpio.gz", tree)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"odd")  # a first archive of unaligned length
    append_archive(initrd, archive)
    data = initrd.read_bytes()
    assert data[:4] == b"odd\0" and data[4:6] == b"\x1f\x8b"  # gzip starts 4-aligned
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], cwd=out, input=gzip.decompress(data[4:]), check=True)
    assert (out / "a/b/f.txt").read_text() == "data"
    assert (out / "a/b/f.txt").stat().st_mtime == 1_500_000_000


@pytest.mark.skipif(shutil.which("xorriso") is None, reason="xorriso not installed: apt-get install xorriso")
def test_make_iso_merges_grafts_and_is_bootable(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    (one / "isolinux").mkdir(parents=True)
    (one / "isolinux" / "isolinux.bin").write_bytes(b"\0" * 2048)
    (two / "etc").mkdir(parents=True)
    (two / "etc" / "x").write_text("x")
    iso = make_iso(tmp_path / "x.iso", [("/", one), ("/", two)], boot=True)
    data = iso.read_bytes()
    assert data[0x8001:0x8006] == b"CD001"
    assert b"EL TORITO SPECIFICATION" in data[0x8800:0x9000]
    listing = subprocess.run(["xorriso", "-indev", str(iso), "-find", "/", "-type", "f"],
                             capture_output=True, text=True).stdout
    assert "/isolinux/isolinux.bin" in listing and "/etc/x" in listing


def test_a_machine_stopped_in_bochss_debugger_is_reported_not_waited_for():
    """Bochs (built with its debugger) stops at its prompt on a triple fault instead of exiting:
    seen in CI as a boot that sat idle until its timeout.  The pty line says so at once."""
    from kvmpy.bed.bochs import debugger_stop
    start = (b'Bochs connected to screen "/dev/pts/1"\nNext at t=0\n'
             b"(0) [0x0000fffffff0] f000:fff0 (unk. ctxt): jmpf 0xf000:e05b          ; ea5be000f0\n")
    assert debugger_stop(start) is None
    why = debugger_stop(start + b"(0).[10718293409] ??? (physical address not available)\n<bochs:2> ")
    assert why and "instruction 10718293409" in why and "triple fault" in why
    assert why.endswith("(0).[10718293409] ??? (physical address not available)")


# -- integration: boots Bochs ---------------------------------------------

VMX_PROBE = r"""
import os, sys
flags = open('/proc/cpuinfo').read()
print('fact vmx', ' vmx' in flags, 'ept', ' ept' in flags)
print('fact nested', open('/sys/module/kvm_intel/parameters/nested').read().strip())
print('fact ept', open('/sys/module/kvm_intel/parameters/ept').read().strip())
from kvmpy import Kvm
kvm = Kvm()
vm = kvm.create_vm()
vm.set_tss_addr(0xFFFBD000)  # VMX real mode may need a TSS
vm.add_memory(0, 0, 1 << 20)
# real mode at 0x1000: out 0x10, al ; hlt
vm.write(0x1000, bytes([0xB0, 0x2A, 0xE6, 0x10, 0xF4]))
vcpu = vm.create_vcpu(0)
sregs = vcpu.get_sregs()
sregs.cs.base, sregs.cs.selector = 0, 0
vcpu.set_sregs(sregs)
regs = vcpu.get_regs()
regs.rip, regs.rflags = 0x1000, 2
vcpu.set_regs(regs)
from kvmpy.exits import HltExit, IoExit
first, second = vcpu.run(), vcpu.run()
exits = ['Io%#x' % first.port if isinstance(first, IoExit) else type(first).__name__,
         'Hlt' if isinstance(second, HltExit) else type(second).__name__]
print('fact exits', *exits)
open(os.path.join(os.environ['KVMPY_BED_RESULTS'], 'exits.txt'), 'w').write(' '.join(exits))
sys.exit('inside failure: deliberate')
"""


@pytest.fixture(scope="module")
def bochs_bed(request):
    if "bed" not in (request.config.getoption("-m") or ""):
        pytest.skip("boots Bochs (several minutes): select with pytest -m bed")
    if not shutil.which(BOCHS):
        pytest.skip(f"{BOCHS} not installed: apt-get install --no-install-recommends "
                    "bochs bochsbios vgabios bochs-term isolinux syslinux-common xorriso")
    from kvmpy.bed.debian import fetch_debian

    backend = BochsBackend(fetch_debian(os.environ.get("KVMPY_BED_KERNEL", "6.12")))
    try:
        backend.check()
    except BedError as exc:
        pytest.skip(str(exc))
    return backend


@pytest.mark.bed
def test_bochs_bed_vmx_kvm_guest_and_failing_status(bochs_bed):
    r = bochs_bed.run(BedRequest(
        command=["python3", "-c", VMX_PROBE], params={"kvm_intel.nested": "1"}, mem="768M",
        timeout=float(os.environ.get("KVMPY_BOCHS_TIMEOUT", "900")), cwd=str(REPO),
        env={"PYTHONPATH": str(REPO)}))
    assert not r.timed_out, r.console[-3000:]
    assert r.error is None, r.error
    assert "fact vmx True ept True" in r.console
    assert "fact nested Y" in r.console
    assert r.params.get("kvm_intel.nested") == "Y"
    assert "fact exits" in r.console, r.console[-3000:]
    assert "inside failure: deliberate" in r.console
    assert r.status == 1
    assert r.files.get("exits.txt", b"") == b"Io0x10 Hlt"
    assert "Linux version" in r.kernel_log


def test_guest_elves_are_carried_with_their_symbols(tmp_path):
    """build/ is excluded from carried trees, but the guests must reach the bed (it has no compiler),
    with the symbols the runner loads them by (exc_stub_table, globals) and their mtimes."""
    from kvmpy.guest import programs
    from kvmpy.guest.elf import GuestElf

    if programs.source_root() is None or not shutil.which("strip"):
        pytest.skip("needs the guest sources (to build hello.elf) and binutils' strip")
    build = tmp_path / "checkout" / "build" / "guests"
    build.mkdir(parents=True)
    shutil.copy2(programs.find("hello"), build / "hello.elf")
    (build / "hello.o").write_bytes(b"")
    stage = carry.Stage(tmp_path / "stage")
    assert stage.strip  # other ELFs (Python, libraries) are stripped
    carry.stage_tree(stage, tmp_path / "checkout")
    assert not stage.inside(build).exists()
    carry.stage_guests(stage, build)
    staged = stage.inside(build / "hello.elf")
    assert GuestElf(staged).symbol("exc_stub_table").size > 0
    assert staged.stat().st_mtime == (build / "hello.elf").stat().st_mtime
    assert not stage.inside(build / "hello.o").exists()
    assert stage.strip
