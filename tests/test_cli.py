"""The `kvmpy` command as a user runs it."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy import cli

ROOT = Path(__file__).resolve().parent.parent


def kvmpy(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "kvmpy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


def test_info_json_has_the_facts():
    p = kvmpy("info", "--json")
    facts = json.loads(p.stdout)
    for key in ("kernel_release", "vendor_module", "capabilities", "thp", "hugetlb_2m", "nested", "mmu_probe"):
        assert key in facts
    if not os.path.exists("/dev/kvm"):
        assert p.returncode == 1 and "does not exist" in facts["error"]
    else:
        assert p.returncode == 0
        assert facts["api_version"] == 12
        probe = facts["mmu_probe"]
        # The probe lands on one side per level: SPTEs seen, or an explanation why not.
        assert facts["mmu_probe_error"] == ""
        for level, cpl, observable in (("ring0", 0, "ring 0: guest accesses go through"),
                                       ("cpl3", 3, "observable at CPL3")):
            assert (cpl in probe["levels"]) <= (sum(probe[level]["sptes"].values()) > 0)
            assert (observable in facts["mmu_meaning"]) == (cpl in probe["levels"])


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm does not exist on this host")
def test_selftest_ktap_and_exit_status():
    p = kvmpy("selftest", "--ktap", "-k", "test_hello_syncs and cpl3 or test_1g_mapping")
    lines = p.stdout.splitlines()
    assert lines[0] == "KTAP version 1"  # stdout is KTAP only; pytest's chatter goes to stderr
    assert lines[1] == "1..2"
    body = lines[2:]
    assert any(line.startswith("ok ") and "test_hello_syncs" in line for line in body)
    assert p.returncode == 0, p.stdout + p.stderr


def test_selftest_no_match_is_a_harness_error():
    # pytest's "no tests collected" must never count as success.
    p = kvmpy("selftest", "--json", "-k", "no_such_test_anywhere")
    data = json.loads(p.stdout)
    assert p.returncode == 2
    assert "no tests collected" in data["runs"][0]["harness_error"]


BED_ONLY = [["--kernel", "bzImage"], ["--modules", "lib/modules/6.12"], ["--kernel-version", "6.12"],
            ["--matrix"], ["--backend", "qemu"], ["--accel", "tcg"], ["--param", "kvm.tdp_mmu=0"],
            ["--timeout", "60"]]


@pytest.mark.parametrize("flag", BED_ONLY, ids=lambda f: f[0])
def test_bed_only_flag_without_bed_is_a_usage_error(flag):
    # Without the check the suite would run on the host, ignoring the flag, and pass.
    p = kvmpy("selftest", *flag, "-k", "test_hello_syncs")
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"{flag[0]}: test bed option, ignored without --bed" in p.stderr
    assert "test_hello_syncs" not in p.stdout  # nothing ran


def test_junit_in_a_missing_directory_is_a_usage_error(tmp_path):
    target = tmp_path / "missing" / "junit.xml"
    p = kvmpy("selftest", "--junit", str(target), "-k", "test_hello_syncs")
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"directory {target.parent} does not exist" in p.stderr
    assert not target.parent.exists()  # not created behind the user's back
    assert "test_hello_syncs" not in p.stdout


def test_junit_that_cannot_be_written_is_a_usage_error(tmp_path):
    p = kvmpy("selftest", "--junit", str(tmp_path), "-k", "test_hello_syncs")  # a directory
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"cannot write {tmp_path}: Is a directory" in p.stderr


# /dev as `kvmpy selftest` may find it, set up in a private mount namespace (needs root and unshare).
NO_KVM = {
    "absent": ("mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3", "",
               "/dev/kvm does not exist: KVM is not available on this host"),
    "not-kvm": ("mount --bind /dev/null /dev/kvm", "",
                "KVM_GET_API_VERSION on /dev/kvm failed: ENOTTY"),
    "no-permission": ("mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && mknod -m 000 /dev/kvm c 10 232",
                      "setpriv --inh-caps=-all --bounding-set=-all",
                      "/dev/kvm: permission denied"),
}


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
                    reason="needs root, unshare and setpriv to hide /dev/kvm in a mount namespace")
@pytest.mark.parametrize("keyword", [None, "test_hello_syncs or test_dirty_log"], ids=["all", "-k"])
@pytest.mark.parametrize("case", list(NO_KVM))
def test_no_usable_kvm_is_not_tested(case, keyword):
    setup, wrap, cause = NO_KVM[case]
    cmd = f"{shlex.quote(sys.executable)} -m kvmpy.cli selftest" + (f" -k {shlex.quote(keyword)}" if keyword else "")
    p = subprocess.run(["unshare", "-m", "sh", "-c", f"{setup} && exec {wrap} {cmd}"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=str(ROOT))
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"NOT TESTED  not tested: {cause}" in p.stdout
    assert p.stdout.splitlines()[-1].startswith("NOT TESTED: 0 passed, 0 failed, 0 skipped")


@pytest.mark.parametrize("argv, loaded, not_loaded", [
    (["info", "--help"], [], ["kvmpy.perf.cli", "kvmpy.bed.cli"]),
    (["perf", "dirty-log", "-b64M"], ["kvmpy.perf.cli"], ["kvmpy.bed.cli"]),
    (["bed", "run", "--", "true"], ["kvmpy.bed.cli"], ["kvmpy.perf.cli"]),
    (["--help"], [], ["kvmpy.perf.cli", "kvmpy.bed.cli"]),
])
def test_a_command_line_loads_only_the_command_it_names(argv, loaded, not_loaded):
    # What a command loads is start-up time of every `kvmpy` call (the perf tool's whole run).
    code = ("import sys; from kvmpy.cli import build_parser\n"
            f"p = build_parser({argv!r})\n"
            "help = p.format_help()\n"
            f"print(sorted(m for m in {loaded + not_loaded!r} if m in sys.modules))\n"
            "print('perf' in help and 'bed' in help and 'performance tools' in help)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True).stdout.splitlines()
    assert out == [str(sorted(loaded)), "True"]


def test_only_the_command_line_freezes_its_start_up_objects():
    """`kvmpy` itself moves start-up's objects out of the collector's way (gc.freeze); a caller's
    main([...]) leaves its process's collector alone."""
    import gc

    before = gc.get_freeze_count()
    assert cli.main(["info", "--no-probe", "--json"]) in (0, 1)
    assert gc.get_freeze_count() == before
    code = ("import gc, sys; from kvmpy.cli import main\n"
            "sys.argv = ['kvmpy', 'info', '--no-probe', '--json']\n"
            "main()\n"
            "print(gc.get_freeze_count() > 1000, file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stderr.strip().splitlines()[-1] == "True"


def test_every_lazy_command_parses_when_named():
    from kvmpy.cli import build_parser

    assert build_parser(["perf", "dirty-log", "-b64M"]).parse_args(["perf", "dirty-log", "-b64M"]).bytes == 64 << 20
    args = build_parser(["bed", "run", "--", "true"]).parse_args(["bed", "run", "--", "true"])
    assert args.bed_command == "run" and args.cmd[-1] == "true"


def test_a_stop_signal_in_a_deferred_block_is_acted_on_after_it():
    from kvmpy.stop import stop_signals_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with stop_signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block finished")
    assert done == ["the block finished"]


def test_main_puts_back_the_signal_handlers_it_installed(monkeypatch):
    """Called in-process (a test, a wrapper script), main() left its SIGTERM handler behind:
    a later test's default SIGTERM then unwound instead of killing (a test-order failure)."""
    from kvmpy.stop import stop_signals

    def raises(args):
        raise cli.UsageError("no")

    before = {signo: signal.getsignal(signo) for signo in stop_signals()}
    assert cli.main(["info", "--no-probe"]) == 0
    assert {signo: signal.getsignal(signo) for signo in stop_signals()} == before
    monkeypatch.setattr(cli, "_cmd_info", raises)
    assert cli.main(["info"]) == 2
    assert {signo: signal.getsignal(signo) for signo in stop_signals()} == before


def test_a_second_ctrl_c_while_stopping_still_exits_130():
    """The first Ctrl-C makes main() return 130; one more right after it (the user pressing
    again) killed the process by the signal instead (status -2)."""
    code = ("import os, signal, sys\n"
            "from kvmpy import cli\n"
            "def stopped(args):\n"
            "    raise KeyboardInterrupt\n"
            "cli._cmd_info = stopped\n"
            "rc = cli.main(['info'])\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 130, (p.returncode, p.stderr)


@pytest.mark.parametrize("argv", [["info", "--no-probe"], ["perf", "dirty-log", "-b", "4M", "-i", "2"]])
def test_a_closed_stdout_is_an_error_not_a_silent_success(argv):
    p = subprocess.run([sys.executable, "-c", "import sys; from kvmpy.cli import main; sys.exit(main())", *argv],
                       stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert p.returncode == 2 and "closed" in p.stderr, (p.returncode, p.stderr)
