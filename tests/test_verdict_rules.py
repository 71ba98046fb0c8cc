"""The verdict's own rules: nothing tested is never green, whatever the pytest run looked like.

Each test here is a way a run once came out green (exit 0) without having tested KVM: pytest
told not to run the tests, every selected test skipped, a kernel log nobody watched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvmpy.selftest import junit
from kvmpy.selftest.report import (EXIT_NOT_TESTED, RunResults, exit_status, format_ktap, format_table,
                                   not_tested_note, row_not_tested, to_json)

ROOT = Path(__file__).resolve().parent.parent


def _t(name, outcome="passed", reason=""):
    return {"nodeid": f"selftests/test_a.py::{name}", "outcome": outcome, "reason": reason}


def _pytest_results(pytester, monkeypatch, *args, suite="def test_a():\n    pass\ndef test_b():\n    pass\n",
                    plugins=("kvmpy.selftest.results",)) -> RunResults:
    """RunResults of a real pytest run of ``suite`` with kvmpy's results plugin (and ``plugins``)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_s=suite)
    out = pytester.path / "results.json"
    pytester.runpytest_subprocess(*[a for p in plugins for a in ("-p", p)], f"--kvmpy-results={out}", *args)
    return RunResults.from_json("host", out.read_text())


# --- 1. pytest told not to run the tests ------------------------------------------------

@pytest.mark.parametrize("option", ["--collect-only", "--setup-plan", "--setup-only"])
def test_a_run_whose_tests_pytest_did_not_run_is_not_green(pytester, monkeypatch, option):
    run = _pytest_results(pytester, monkeypatch, option)
    assert run.exitstatus == 0             # pytest itself calls it a success
    assert exit_status([run]) == EXIT_NOT_TESTED
    note = not_tested_note([run])
    assert "nothing was tested" in note or "never ran to a verdict" in note
    assert format_table([run], width=200).splitlines()[-1].startswith("NOT TESTED: 0 passed, 0 failed")
    assert "not ok" in format_ktap([run])


def test_interrupted_tests_without_a_signal_are_not_a_pass():
    run = RunResults("host", [_t("a"), _t("b", "interrupted", "the run was stopped during this test")])
    assert exit_status([run]) == EXIT_NOT_TESTED
    assert "1 test never ran to a verdict (outcome interrupted, e.g. test_a.py::b)" in not_tested_note([run])


def test_an_outcome_no_run_records_is_not_a_pass():
    assert exit_status([RunResults("host", [_t("a"), _t("b", "weird")])]) == EXIT_NOT_TESTED


# --- 2. every selected test skipped ----------------------------------------------------

def test_all_selected_tests_skipped_is_not_tested():
    tests = [_t(f"n{i}", "skipped", "CPU exposes no svm" if i % 2 else "needs kvm_intel") for i in range(18)]
    run = RunResults("host kvm_pvm", tests)
    assert exit_status([run]) == EXIT_NOT_TESTED
    note = not_tested_note([run])
    assert note.startswith("nothing was tested: all 18 selected tests skipped (")
    assert "CPU exposes no svm (x9)" in note and "needs kvm_intel (x9)" in note
    table = format_table([run], width=200).splitlines()
    assert table[-2] == note and table[-1] == "NOT TESTED: 0 passed, 0 failed, 18 skipped"
    assert json.loads(to_json({}, [run]))["not_tested"] == note
    assert b'name="(verdict)"' in junit.format_junit([run])


def test_the_normal_host_run_stays_green():
    run = RunResults("host", [_t("a"), _t("b", "skipped", "no 1G pool"), _t("c", "xfailed", "known")],
                     splat_watch="/dev/kmsg")
    assert exit_status([run]) == 0 and not_tested_note([run]) == ""
    assert format_table([run], width=200).splitlines()[-2:] == ["kernel splat watch: /dev/kmsg",
                                                                "1 passed, 0 failed, 1 skipped (1 xfailed)"]


def test_a_matrix_row_whose_tests_all_skip_is_shown_but_the_run_that_tested_others_is_green():
    tested = RunResults("bed amd 6.12 tdp+split", [_t("split")], row="qemu/6.12/tdp+split")
    skipped = RunResults("bed amd 6.12 shadow", [_t("split", "skipped", "needs the TDP MMU: row tdp+split")],
                         row="qemu/6.12/shadow")
    assert exit_status([tested, skipped]) == 0
    assert row_not_tested(skipped).startswith("all 1 selected test skipped (needs the TDP MMU")
    table = format_table([tested, skipped], width=200)
    assert "(nothing tested)" in table and "NOT TESTED  all 1 selected test skipped" in table
    assert "# bed amd 6.12 shadow: nothing tested: all 1 selected test skipped" in format_ktap([tested, skipped])
    # Every row skipping everything: nothing at all was tested.
    assert exit_status([skipped, skipped]) == EXIT_NOT_TESTED


# --- 7. the splat watch ----------------------------------------------------------------

def test_a_run_whose_kernel_log_was_not_watched_is_not_green(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("KVMPY_KMSG", str(tmp_path / "nonexistent"))
    run = _pytest_results(pytester, monkeypatch, plugins=("kvmpy.selftest.results", "kvmpy.selftest.splat"))
    assert [t["outcome"] for t in run.tests] == ["passed", "passed"]
    assert run.splat_watch.startswith("OFF: cannot read the kernel log")
    assert exit_status([run]) == EXIT_NOT_TESTED
    assert "the kernel log was not watched for splats" in not_tested_note([run])
    assert "kernel splat watch: OFF: cannot read the kernel log" in format_table([run], width=200)
    assert "# kernel splat watch: OFF" in format_ktap([run])
    assert json.loads(to_json({}, [run]))["runs"][0]["splat_watch"].startswith("OFF")


def test_a_watched_run_records_its_kernel_log(pytester, monkeypatch, tmp_path):
    log = tmp_path / "kmsg"
    log.write_text("")
    monkeypatch.setenv("KVMPY_KMSG", str(log))
    run = _pytest_results(pytester, monkeypatch, plugins=("kvmpy.selftest.results", "kvmpy.selftest.splat"))
    assert run.splat_watch == str(log) and exit_status([run]) == 0


def test_a_run_without_the_splat_plugin_records_it_off(pytester, monkeypatch):
    run = _pytest_results(pytester, monkeypatch)
    assert run.splat_watch.startswith("OFF: the splat watch was not loaded")
    assert exit_status([run]) == EXIT_NOT_TESTED


# --- 5. the host JUnit file ------------------------------------------------------------

PYTEST_JUNIT = (b'<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" '
                b'errors="0" failures="0" skipped="0" tests="0" /></testsuites>')


def test_host_junit_gets_the_harness_error_as_an_error_case():
    run = RunResults("host", harness_error="pytest: no tests collected (exit 5)")
    data = junit.with_verdict(PYTEST_JUNIT, [run])
    assert b'<error message="host: pytest: no tests collected (exit 5)"' in data
    assert junit.with_verdict(None, [run]).count(b"<error") >= 1   # pytest wrote none (killed)
    green = RunResults("host", [_t("a")], splat_watch="/dev/kmsg")
    assert junit.with_verdict(PYTEST_JUNIT, [green]) is None        # nothing to add
    assert b"(verdict)" in junit.with_verdict(PYTEST_JUNIT, [RunResults("host", [_t("a", "skipped", "r")])])
    assert b"(harness)" in junit.with_verdict(b"<testsuites><testsu", [run])     # cut short: rewritten


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm does not exist on this host")
def test_host_junit_is_never_a_stale_green_file(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "junit.xml"
    target.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="0" '
                      'tests="1"><testcase classname="old" name="green"/></testsuite></testsuites>')
    p = subprocess.run([sys.executable, "-m", "kvmpy.cli", "selftest", "-k", "no_such_test_anywhere",
                        "--junit", str(target)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=str(ROOT))
    assert p.returncode == 2, p.stdout + p.stderr
    text = target.read_text()
    assert 'name="green"' not in text
    assert "no tests collected" in text and "<error" in text


def test_every_output_lists_the_same_problems():
    """KTAP, the merged JUnit and the host's JUnit all fail on each harness error, stop and the
    not-tested note (report.run_problems), each once: a run with a harness error that was also
    stopped used to show only the harness error in KTAP."""
    import re
    import xml.etree.ElementTree as ET

    runs = [RunResults("row-a", [_t("a", "interrupted")], harness_error="bed: QEMU died", interrupted=2),
            RunResults("row-b", [_t("b", "skipped", "no nested")], splat_watch="OFF (no root)")]
    ktap = [line for line in format_ktap(runs).splitlines() if " harness " in line]
    assert [re.sub(r"not ok \d+ harness ", "", line).split(" # ")[0] for line in ktap] == ["row-a", "row-a", "verdict"]
    assert "QEMU died" in ktap[0] and "stopped by SIGINT" in ktap[1] and "NOT TESTED" in ktap[2]
    merged = ET.fromstring(junit.format_junit(runs))
    host = ET.fromstring(junit.with_verdict(PYTEST_JUNIT, runs))
    for doc in (merged, host):
        errors = sorted((case.get("name"), case.find("error").get("message").split(": ", 1)[-1][:20])
                        for case in doc.iter("testcase") if case.get("classname") == "kvmpy")
        assert [name for name, _ in errors] == ["(harness)", "(run)", "(verdict)"], errors
