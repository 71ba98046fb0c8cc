"""The kernel-log splat parser (kvmpy.kernel_log) and the splat watch plugin, through a fake kernel log file."""

import textwrap

import pytest

from kvmpy.kernel_log import Record, find_splats, find_splats_in_text, parse_kmsg_line

pytest_plugins = ["pytester"]

WARN = [
    "4,501,1000,-;------------[ cut here ]------------",
    "4,502,1001,-;WARNING: CPU: 1 PID: 77 at arch/x86/kvm/mmu/mmu.c:6123 kvm_mmu_zap_all+0x12/0x40 [kvm]",
    "4,503,1002,-;Modules linked in: kvm_amd kvm",
    "4,504,1003,-;Call Trace:",
    "4,505,1004,-;---[ end trace 0000000000000000 ]---",
    "6,506,1005,-;kvm: unrelated info after the splat",
]


def test_parse_kmsg_line_kernel_and_user_facility():
    assert parse_kmsg_line("4,1,2,-;WARNING: x") == Record(0, "WARNING: x")
    assert parse_kmsg_line("12,1,2,-;WARNING: from userspace") == Record(1, "WARNING: from userspace")
    assert parse_kmsg_line(" SUBSYSTEM=acpi") is None


def test_find_splats_quotes_until_end_trace():
    splats = find_splats(parse_kmsg_line(l) for l in WARN)
    assert len(splats) == 1
    assert splats[0].startswith("WARNING: CPU: 1 PID: 77 at arch/x86/kvm/mmu/mmu.c:6123")
    assert splats[0].endswith("---[ end trace 0000000000000000 ]---")
    assert "unrelated info" not in splats[0]


@pytest.mark.parametrize("line", [
    "BUG: KASAN: slab-use-after-free in kvm_mmu_page_fault+0x1/0x2",
    "WARNING: possible circular locking dependency detected",
    "general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP",
    "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
    "kernel BUG at arch/x86/kvm/mmu/tdp_mmu.c:100!",
])
def test_find_splats_kinds(line):
    assert find_splats([Record(0, line)]) == [line]


def test_find_splats_ignores_userspace_and_benign_lines():
    records = [Record(1, "WARNING: CPU: 0 PID: 1 at forged"), Record(0, "kvm_amd: Nested Virtualization enabled"),
               Record(0, "ACPI Warning: something benign")]
    assert find_splats(records) == []


def test_find_splats_in_dmesg_text():
    text = "[    1.000] ok\n[    2.500] WARNING: CPU: 0 PID: 1 at x.c:1 f\n[    2.501] Call Trace:\n"
    assert find_splats_in_text(text) == ["WARNING: CPU: 0 PID: 1 at x.c:1 f\nCall Trace:"]


def _suite(pytester, log):
    pytester.makepyfile(test_inner=textwrap.dedent(f"""
        LOG = {str(log)!r}
        SPLAT = {chr(10).join(WARN)!r} + "\\n"

        def test_clean():
            pass

        def test_warns():
            with open(LOG, "a") as f:
                f.write(SPLAT)

        def test_user_writes_warning():
            with open(LOG, "a") as f:
                f.write("12,9,9,-;WARNING: CPU: 0 written by a user process\\n")

        def test_fails_and_warns():
            with open(LOG, "a") as f:
                f.write(SPLAT)
            assert 1 == 2, "own assertion"
    """))


def test_plugin_fails_only_the_test_that_splatted(pytester, tmp_path, monkeypatch):
    log = tmp_path / "kmsg"
    # Records from before the session must not count.
    log.write_text("\n".join(WARN) + "\n")
    monkeypatch.setenv("KVMPY_KMSG", str(log))
    _suite(pytester, log)
    result = pytester.runpytest("-p", "kvmpy.selftest.splat")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        "*kernel splat watch: *kmsg*",
        "*kernel splat during call of test_inner.py::test_warns:*",
        "*WARNING: CPU: 1 PID: 77 at arch/x86/kvm/mmu/mmu.c:6123*",
    ])
    result.stdout.fnmatch_lines(["*own assertion*"])
    assert "FAILED test_inner.py::test_warns" in result.stdout.str()
    assert "FAILED test_inner.py::test_clean" not in result.stdout.str()
    assert "FAILED test_inner.py::test_user_writes_warning" not in result.stdout.str()


def test_plugin_unreadable_log_is_reported_once_and_tests_run(pytester, tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPY_KMSG", str(tmp_path / "missing"))
    pytester.makepyfile(test_a="def test_a(): pass\ndef test_b(): pass\n")
    result = pytester.runpytest("-p", "kvmpy.selftest.splat")
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert out.count("kernel splat watch: OFF, cannot read the kernel log") == 2  # header + summary
    assert "No such file" in out


def test_plugin_can_be_disabled(pytester, tmp_path, monkeypatch):
    log = tmp_path / "kmsg"
    log.write_text("")
    monkeypatch.setenv("KVMPY_KMSG", str(log))
    _suite(pytester, log)
    result = pytester.runpytest("-p", "kvmpy.selftest.splat", "--no-splat-watch")
    result.assert_outcomes(passed=3, failed=1)


def test_plugin_splat_outside_tests_fails_the_session(pytester, tmp_path, monkeypatch):
    log = tmp_path / "kmsg"
    log.write_text("")
    monkeypatch.setenv("KVMPY_KMSG", str(log))
    # Written at import, i.e. during collection: no test owns it.
    pytester.makepyfile(test_c=f"""
        open({str(log)!r}, "a").write({WARN[1]!r} + "\\n")
        def test_a():
            pass
    """)
    result = pytester.runpytest("-p", "kvmpy.selftest.splat")
    # A failed row of its own, after the tests: pytest counts it.
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["FAILED (kernel log before the first test) - WARNING: CPU: 1 PID: 77*"])
