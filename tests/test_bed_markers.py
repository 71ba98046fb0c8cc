"""Verdict integrity: only the bed's init can end a boot, report its facts or its files; a bed
without KVM, with an init error, timed out, or with a BUG on its console is never green; an
echo that fails loses nothing."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import tarfile
import time

import pytest

from kvmpy.bed import initramfs, matrix
from kvmpy.bed.console_files import BEGIN_KIND, END_KIND, RESULTS_BEGIN, RESULTS_END, extract_files
from kvmpy.bed.machine import ConsoleLog, boot_failure
from kvmpy.bed.protocol import ConsoleText
from kvmpy.bed.request import BedRequest, kernel_splats, parse_console
from kvmpy.bed.initramfs import busybox

from bed_fakes import printed

N = "5f0e2c9d8b7a41f6a3e2d1c0b9a8f7e6"
CONFIG = matrix.Config("default", {})


def say(*lines: str) -> str:
    """The init's marker lines, with the nonce."""
    return "".join(f"KVMPY-BED: {N} {line}\n" for line in lines)


def boot(job_output: str = "", status: int = 0, facts=("module kvm_amd",)) -> str:
    """A machine's console: announcement, facts, ready, the job's output, exit."""
    return ("[    0.5] Linux version 6.12\n" + say("nonce", "kernel 6.12.9-amd64", *facts,
                                                    "param kvm.tdp_mmu=Y", "ready")
            + job_output + say(f"exit {status}") + "[   60.0] reboot: Power down\n")


def machine(text: str) -> ConsoleText:
    return ConsoleText(text)


# --- item 1: markers only from the init ----------------------------------------------

SPOOFS = [
    "a test prints: KVMPY-BED: exit 0\n",              # not at the start of the line
    f"echo KVMPY-BED: {N} exit 0\n",                   # (if it knew the nonce) nor this
    "KVMPY-BED: exit 0\n",                               # at the start, without the nonce
    f"KVMPY-BED: {'0' * 32} exit 0\n",                  # a nonce of its own
    f"KVMPY-BED: {N} ready\nKVMPY-BED: {N} param kvm.tdp_mmu=N\n",   # (if it knew it) facts after ready
]


@pytest.mark.parametrize("spoof", SPOOFS)
def test_the_command_cannot_fake_the_exit_status_or_the_facts(spoof):
    r = parse_console(machine(boot("test_x FAILED\n" + spoof, status=1)))
    assert r.status == 1 and r.params == {"kvm.tdp_mmu": "Y"}
    assert (r.facts.kernel, r.facts.vendor_module) == ("6.12.9-amd64", "kvm_amd")


def test_a_spoofed_exit_does_not_end_the_boot_early():
    """The host kills the machine a grace after the exit marker: a spoofed one must not count."""
    log = ConsoleLog(BedRequest(command=["x"]), time.monotonic())
    log.feed(boot("KVMPY-BED: exit 0\nok KVMPY-BED: exit 0\n").split("KVMPY-BED: " + N + " exit")[0].encode())
    assert log.boot is not None and log.exit_seen_at is None
    log.feed(say("exit 3").encode())
    assert log.exit_seen_at is not None
    assert parse_console(log.text()).status == 3


def test_exit_before_ready_and_a_second_exit_do_not_count():
    text = "[ 0.1] x\n" + say("nonce", "module kvm_amd", "exit 0", "ready") + say("exit 4", "exit 0")
    assert parse_console(machine(text)).status == 4
    assert parse_console(machine(say("nonce", "module kvm_amd", "exit 0"))).status is None


def test_no_nonce_announcement_first_means_no_marker_counts():
    # The init's announcement garbled by a kernel message: the job's own announcement later
    # must not be taken, nor anything else.
    garbled = f"KVMPY-BED: {N[:10]}[  1.0] random: crng init done\n"
    text = garbled + say("module kvm_amd", "ready", "exit 0")
    assert parse_console(machine(text)).status is None
    assert parse_console(machine("KVMPY-BED: ready\nKVMPY-BED: exit 0\n")).status is None


def test_a_timed_out_boot_is_never_a_pass():
    r = parse_console(machine(boot()))
    r.timed_out, r.error = True, "timed out after 600s"
    row = matrix.evaluate(CONFIG, r)
    assert r.status == 0 and row.verdict == "ERROR" and "timed out" in row.detail
    assert matrix.exit_status([row]) == 2


def _init_sh(tmp_path, script: str, env=None) -> str:
    try:
        bb = str(busybox())
    except Exception as e:   # noqa: BLE001
        pytest.skip(str(e))
    (tmp_path / "init").write_text(initramfs.INIT_SCRIPT)
    env = dict(os.environ, KVMPY_INIT_TEST="1", **(env or {}))
    return subprocess.run([bb, "sh", "-c", f". {tmp_path / 'init'}; {script}"], env=env,
                          capture_output=True, text=True, check=True, timeout=30).stdout


def test_the_init_announces_a_nonce_first_and_never_exports_it(tmp_path):
    # The firmware's output ends mid-line, and so does the job's: each marker still starts one.
    out = "Booting from ROM..\x1bc\x1b[2J" + _init_sh(
        tmp_path, "new_nonce; say ready; kvmpy_fresh_line=1; echo 'KVMPY-BED: exit 0'; printf 'no newline';"
                  " say 'exit 5'; echo ENV:; env", env={"kvmpy_nonce": "inherited"})
    assert parse_console(ConsoleText(out)).status == 5
    first, *rest = out.splitlines()[1:]
    nonce = first.split()[1]
    assert first == f"KVMPY-BED: {nonce} nonce" and len(nonce) == 32 and nonce != "inherited"
    env = out.split("\nENV:\n")[1]
    assert "kvmpy_nonce" not in env and nonce not in env   # not in the job's environment
    # Two boots, two nonces.
    assert _init_sh(tmp_path, "new_nonce").split()[1] != nonce


def test_the_printer_hides_the_inits_own_empty_line_before_a_marker():
    assert printed(boot("a\n\n\nb\n\n").splitlines()) == "a\n\n\nb\n"


# --- item 2: a bed without KVM, or with an init error -----------------------------------

def test_an_init_error_or_a_missing_vendor_module_is_an_error(tmp_path):
    no_vendor = parse_console(machine(boot(facts=())))
    insmod = parse_console(machine(boot().replace(say("ready"), say("error insmod kvm_amd failed", "ready"))))
    for r, why in ((no_vendor, "no KVM vendor module"), (insmod, "insmod kvm_amd failed")):
        row = matrix.evaluate(matrix.Config("shadow", {"kvm_amd.npt": "0"}), r)
        assert r.status == 0 and row.verdict == "ERROR" and why in row.detail
        assert any(why in p for p in r.bed_problems)
    assert insmod.kvm_missing is False and no_vendor.kvm_missing is True
    assert parse_console(machine(boot())).bed_problems == []
    # The command cannot add an error either (nor hide one).
    assert parse_console(machine(boot("KVMPY-BED: error x\n"))).bed_errors == []
    assert boot_failure(parse_console(machine(say("nonce", "error cannot mount the job share")))) == \
        "error cannot mount the job share"


def test_kvmpy_bed_run_of_a_bed_without_kvm_exits_2_naming_why(monkeypatch, capsys):
    """`kvmpy bed run` took the command's exit status alone: 0 from a bed whose insmod failed."""
    from kvmpy.bed import cli
    from kvmpy.bed.options import BedOptions

    insmod = parse_console(machine(boot().replace(say("ready"), say("error insmod kvm_amd failed", "ready"))))

    class Bed:
        vendor, options = "amd", BedOptions()

        def run(self, job, params=None):
            return insmod

    monkeypatch.setattr(cli, "_prepared_bed", lambda args: Bed())
    assert insmod.status == 0
    assert cli.main(["run", "--", "true"]) == 2
    assert "bed: bed error: insmod kvm_amd failed" in capsys.readouterr().err


def test_console_printer_shows_init_errors_but_not_spoofed_markers():
    assert printed(boot("hello\nKVMPY-BED: exit 0\nstill the job\n").splitlines()) == \
        "hello\nKVMPY-BED: exit 0\nstill the job\n"


# --- item 3: the files block -------------------------------------------------------------

def _block(files) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.encodebytes(buf.getvalue()).decode()


def _files_console(block: str, before: str = "") -> str:
    return boot(before + say("files-begin") + block + say("files-end"))


def test_a_stray_begin_marker_neither_loses_the_results_nor_stops_the_echo():
    stray = f"test prints {RESULTS_BEGIN}\n{RESULTS_BEGIN}\ntest_a PASSED\n"
    text = _files_console(_block({"results/junit.xml": b"<testsuite/>", "dmesg.txt": b"[ 1.0] hi\n"}), stray)
    files, log, dropped = extract_files(machine(text))
    assert files == {"junit.xml": b"<testsuite/>"} and log == "[ 1.0] hi\n" and dropped == []
    # Also in text without a nonce (the last begin before the end).
    legacy = f"{RESULTS_BEGIN}\nnoise\n{RESULTS_BEGIN}\n{_block({'results/a': b'1'})}{RESULTS_END}\n"
    assert extract_files(legacy)[0] == {"a": b"1"}
    shown = []
    log = ConsoleLog(BedRequest(command=["x"], on_console=shown.append), 0, hide=(BEGIN_KIND, END_KIND))
    log.feed(text.encode())
    assert "test_a PASSED" in shown and not any(line.startswith("H4sI") for line in shown)
    assert shown[-1].endswith("Power down")


def test_a_damaged_or_missing_files_block_is_named():
    block = _block({"results/junit.xml": b"<testsuite/>" * 1000})
    files, log, dropped = extract_files(machine(_files_console(block[: len(block) // 2] + "\n")))
    assert files == {} and len(dropped) == 1 and "damaged" in dropped[0]
    files, log, dropped = extract_files(machine(boot()))
    assert files == {} and dropped and "missing" in dropped[0]


# --- item 4: a BUG on the console without a kernel log -------------------------------------

def test_an_oops_on_the_console_fails_a_boot_whose_kernel_log_did_not_come_back():
    oops = ("[  280.1] BUG: unable to handle page fault for address: 0000000000001000\n"
            "[  280.1] Oops: 0000 [#1] PREEMPT SMP NOPTI\n"
            "[  280.1] RIP: 0010:kvm_mmu_page_fault+0x10/0x20 [kvm]\n")
    r = parse_console(machine(boot(oops)))
    assert r.status == 0 and r.kernel_log == ""
    row = matrix.evaluate(CONFIG, r)
    assert row.verdict == "FAIL" and row.detail.startswith("kernel splat: BUG: unable to handle")
    # A boot-time splat (before the init ran) is reported, not failed; the command's own text is
    # not the kernel's.
    early = "[    0.2] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/cpu/topology_common.c:57 f+0x1/0x2\n"
    r = parse_console(machine(early + boot("WARNING: printed by the command\n")))
    before, after = kernel_splats(r)
    assert len(before) == 1 and after == []
    assert matrix.evaluate(CONFIG, r).verdict == "PASS"


# --- item 5: an echo that fails ----------------------------------------------------------

def test_an_echo_that_raises_is_dropped_and_the_boot_goes_on():
    calls = []

    def echo(line):
        calls.append(line)
        raise BrokenPipeError("stdout gone")

    log = ConsoleLog(BedRequest(command=["x"], on_console=echo), time.monotonic())
    log.feed(boot("hello\n", status=0).encode())
    assert len(calls) == 1 and isinstance(log.echo_error, BrokenPipeError)
    assert log.exit_seen_at is not None and parse_console(log.text()).status == 0


def test_an_echo_that_raises_does_not_lose_a_machine_run():
    from kvmpy.bed import qemu

    def echo(line):
        raise BrokenPipeError("stdout gone")

    script = "printf '%s' \"$0\"; exec sleep 30"
    req = BedRequest(command=["x"], timeout=60, on_console=echo)
    saved, qemu.POWEROFF_GRACE = qemu.POWEROFF_GRACE, 0.5
    try:
        console, _, timed_out, _ = qemu._run_machine(["sh", "-c", script, boot("hi\n")], req, time.monotonic())
    finally:
        qemu.POWEROFF_GRACE = saved
    assert not timed_out and parse_console(console).status == 0


def test_a_console_past_its_bound_keeps_the_markers_and_makes_the_boot_an_error():
    """A kernel printing in a loop filled the host's memory (every line was kept); now past the
    bound only the init's markers are kept, and the unkept, unscanned rest is a bed problem."""
    log = ConsoleLog(BedRequest(command=["x"]), time.monotonic(), max_bytes=4096)
    flood = "".join(f"[ {i}.0] kvm: printk storm line {i:05d} " + "x" * 40 + "\n" for i in range(1000))
    text = boot(flood + "------------[ cut here ]------------\n", status=0)
    for i in range(0, len(text), 777):                  # chunks that split lines and markers
        log.feed(text[i:i + 777].encode())
    console = log.text()
    assert len(console) < 4096 + 200 and log.dropped_lines > 900 and "cut here" not in console
    r = parse_console(console)
    assert r.status == 0 and r.facts.vendor_module == "kvm_amd"       # the markers are all there
    assert any(f"{log.dropped_lines} later lines" in p and "not kept" in p for p in r.bed_problems)
    small = ConsoleLog(BedRequest(command=["x"]), time.monotonic())
    small.feed(boot("fine\n").encode())
    assert small.text().dropped is None and parse_console(small.text()).bed_problems == []


def test_output_without_newlines_is_cut_into_bounded_lines():
    log = ConsoleLog(BedRequest(command=["x"]), time.monotonic())
    for _ in range(5):
        log.feed(b"y" * (1 << 20))
    assert [len(line) for line in log.lines] == [1 << 20] * 4 and len(log.text()) == 5 * (1 << 20) + 5
