"""Kernel splats in the verdict: a splat between tests is a failed row; a known issue may name its own splat."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from kvmpy.selftest import known_issues
from kvmpy.selftest.report import RunResults, exit_status, format_table

ROOT = Path(__file__).resolve().parent.parent

# As this host's kernel logged it (dmesg, 2026-11-30), in /dev/kmsg's record format.
RING_WARN = [
    "4,700,1000,-;------------[ cut here ]------------",
    "4,701,1001,-;WARNING: CPU: 0 PID: 4299 at arch/x86/kvm/../../../virt/kvm/dirty_ring.c:225 "
    "kvm_dirty_ring_push+0xe2/0xf0",
    "4,702,1002,-;RIP: 0010:kvm_dirty_ring_push+0xe2/0xf0",
    "4,703,1003,-;Call Trace:",
    "4,704,1004,-;---[ end trace 0000000000000000 ]---",
]
OTHER_WARN = [
    "4,800,2000,-;WARNING: CPU: 1 PID: 77 at arch/x86/kvm/mmu/mmu.c:6123 kvm_mmu_zap_all+0x12/0x40 [kvm]",
    "4,801,2001,-;---[ end trace 0000000000000000 ]---",
]

KNOWN = r'''
[[issue]]
test = "*::test_ring_*"
reason = "the ring overfills"
evidence = "our output"
match = "pages changed but NOT reported"
splats = ['^WARNING: CPU: \d+ PID: \d+ at \S*virt/kvm/dirty_ring\.c:\d+ kvm_dirty_ring_push\b']
'''


def _run(pytester, monkeypatch, tests: str, known: str = KNOWN) -> tuple[dict, dict]:
    log = pytester.path / "kmsg"
    log.write_text("")
    kfile = pytester.path / "known.toml"
    kfile.write_text(known)
    monkeypatch.setenv("KVMPY_KMSG", str(log))
    monkeypatch.setenv("KVMPY_KNOWN_ISSUES", str(kfile))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_sample=textwrap.dedent(f"""
        LOG = {str(log)!r}
        RING_WARN = {chr(10).join(RING_WARN)!r} + "\\n"
        OTHER_WARN = {chr(10).join(OTHER_WARN)!r} + "\\n"

        def splat(text):
            with open(LOG, "a") as f:
                f.write(text)
    """) + textwrap.dedent(tests))
    out = pytester.path / "results.json"
    pytester.runpytest_subprocess("-p", "kvmpy.selftest.results", "-p", "kvmpy.selftest.known_issues",
                                  "-p", "kvmpy.selftest.splat", f"--kvmpy-results={out}")
    data = json.loads(out.read_text())
    return {t["nodeid"].split("::")[-1]: t for t in data["tests"]}, data


def test_splat_between_tests_is_a_failed_row_of_its_own(pytester, monkeypatch):
    # pytest_runtest_logfinish runs after test_a's last kernel-log check: the splat belongs to no test.
    pytester.makeconftest(f"""
        def pytest_runtest_logfinish(nodeid):
            if nodeid.endswith("test_a") or nodeid.endswith("test_b"):
                with open({str(pytester.path / "kmsg")!r}, "a") as f:
                    f.write({chr(10).join(OTHER_WARN)!r} + "\\n")
    """)
    tests, data = _run(pytester, monkeypatch, """
        def test_a():
            pass
        def test_b():
            pass
    """, known="")
    assert tests["test_a"]["outcome"] == tests["test_b"]["outcome"] == "passed"
    rows = {t["nodeid"]: t for t in data["tests"] if t["nodeid"].startswith("(kernel log")}
    # One after test_a (seen when test_b starts), one after the last test (seen at session end).
    assert sorted(rows) == ["(kernel log after test_sample.py::test_a)", "(kernel log after test_sample.py::test_b)"]
    for row in rows.values():
        assert row["outcome"] == "failed" and row["reason"] == OTHER_WARN[0].split(";", 1)[1]
    assert data["exitstatus"] == 1
    run = RunResults("host", data["tests"])
    assert exit_status([run]) == 1
    table = format_table([run], width=200)
    assert "(kernel log after test_sample.py::test_a)" in table
    assert "FAIL    WARNING: CPU: 1 PID: 77 at arch/x86/kvm/mmu" in table


def test_known_issue_names_its_splat_in_that_test_only(pytester, monkeypatch):
    tests, data = _run(pytester, monkeypatch, """
        def test_ring_fails_and_warns():
            splat(RING_WARN)
            assert False, "8192 pages changed but NOT reported (false negative)"

        def test_ring_passes_but_warns():
            splat(RING_WARN)

        def test_ring_fails_differently_and_warns():
            splat(RING_WARN)
            raise RuntimeError("unrelated")

        def test_ring_warns_something_else():
            splat(OTHER_WARN)
            assert False, "8192 pages changed but NOT reported (false negative)"

        def test_other_test_same_warn():
            splat(RING_WARN)
    """)
    # The listed defect, with its own splat: an expected failure whose reason quotes the splat.
    t = tests["test_ring_fails_and_warns"]
    assert t["outcome"] == "xfailed"
    assert "the ring overfills" in t["reason"] and "kvm_dirty_ring_push+0xe2/0xf0" in t["reason"]
    # The checks held but the kernel logged the defect's signature: it reproduced (not XPASS).
    t = tests["test_ring_passes_but_warns"]
    assert t["outcome"] == "xfailed" and "its kernel splat: WARNING" in t["reason"]
    # A failure the entry does not describe stays a failure, splat or not.
    assert tests["test_ring_fails_differently_and_warns"]["outcome"] == "failed"
    # A splat the entry does not name fails the test although its failure matches.
    assert tests["test_ring_warns_something_else"]["outcome"] == "failed"
    # The same splat in another test: a real failure.
    t = tests["test_other_test_same_warn"]
    assert t["outcome"] == "failed" and t["reason"].startswith("kernel splat during call of")
    assert data["exitstatus"] == 1


def test_known_issue_splat_patterns(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text(KNOWN)
    (k,) = known_issues.load(f)
    first = RING_WARN[1].split(";", 1)[1]
    assert k.explains_splat(first + "\nRIP: ...")
    assert not k.explains_splat(OTHER_WARN[0].split(";", 1)[1])
    # Anchored at the splat's first line: a trace that merely passes through the function is not it.
    assert not k.explains_splat("BUG: KASAN: use-after-free\n" + first)


def test_shipped_known_issues_name_the_dirty_ring_warn():
    issues = known_issues.load(ROOT / "selftests" / "known_issues.toml")
    first = RING_WARN[1].split(";", 1)[1]
    ring = [k for k in issues if "test_dirty_ring_full_1g_slot" in k.test]
    assert ring and all(k.explains_splat(first) for k in ring)
    assert not any(k.explains_splat(OTHER_WARN[0].split(";", 1)[1]) for k in issues)
