"""The selftest machinery: results plugin, known-issues plugin, report and exit status."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from kvmpy.selftest import guard, known_issues
from kvmpy.selftest.report import RunResults, exit_status, format_ktap, format_table

SAMPLE = '''
import pytest
def test_pass(kvmpy_stats):
    kvmpy_stats(pages_2m=-3, pages_4k=1536)
def test_fail():
    assert 1 + 1 == 3, "arithmetic broke"
def test_skip():
    pytest.skip("KVM lacks KVM_CAP_NESTED_STATE")
def test_known_bad():
    assert False, "Page 17 should have its dirty bit set in iteration 2 but it is missing"
def test_known_fixed():
    pass
def test_known_other_failure():
    raise RuntimeError("something unrelated")
def test_known_intermittent():
    pass
'''

KNOWN = '''
[[issue]]
test = "*::test_known_bad"
reason = "ring loses pages"
evidence = "page 17 missing in iteration 2"
match = "should have its dirty bit set"

[[issue]]
test = "*::test_known_fixed"
reason = "was broken once"
evidence = "old log"

[[issue]]
test = "*::test_known_other_failure"
reason = "ring loses pages"
evidence = "x"
match = "should have its dirty bit set"

[[issue]]
test = "*::test_known_intermittent"
reason = "a race"
evidence = "failed 9 of 10 runs"
intermittent = true

[[issue]]
test = "*::test_pass"
reason = "only on another kernel"
evidence = "x"
kernel_release = "0.0.0-nonexistent"
'''


@pytest.fixture
def sample_run(pytester, monkeypatch):
    pytester.makepyfile(test_sample=SAMPLE)
    kfile = pytester.path / "known.toml"
    kfile.write_text(KNOWN)
    monkeypatch.setenv("KVMPY_KNOWN_ISSUES", str(kfile))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    out = pytester.path / "results.json"
    pytester.runpytest_subprocess("-p", "kvmpy.selftest.results", "-p", "kvmpy.selftest.known_issues",
                                  f"--kvmpy-results={out}")
    data = json.loads(out.read_text())
    return {t["nodeid"].split("::")[-1]: t for t in data["tests"]}, data


def test_results_and_known_issues(sample_run):
    tests, data = sample_run
    assert tests["test_pass"]["outcome"] == "passed"
    assert tests["test_pass"]["stats"] == {"pages_2m": -3, "pages_4k": 1536}
    assert tests["test_fail"]["outcome"] == "failed"
    assert "arithmetic broke" in tests["test_fail"]["reason"]
    assert tests["test_skip"]["outcome"] == "skipped"
    assert tests["test_skip"]["reason"] == "KVM lacks KVM_CAP_NESTED_STATE"
    # A matching failure of a known issue is an expected failure with the reason...
    assert tests["test_known_bad"]["outcome"] == "xfailed"
    assert "ring loses pages" in tests["test_known_bad"]["reason"]
    # ...a pass is reported loudly...
    assert tests["test_known_fixed"]["outcome"] == "failed"
    assert "did not reproduce" in tests["test_known_fixed"]["reason"]
    # ...and a different failure stays a failure.
    assert tests["test_known_other_failure"]["outcome"] == "failed"
    # An intermittent known issue that did not show: said so, not a failure.
    assert tests["test_known_intermittent"]["outcome"] == "known-absent"
    assert "did not reproduce this run" in tests["test_known_intermittent"]["reason"]
    assert data["exitstatus"] == 1


def test_report_of_sample(sample_run):
    tests, _ = sample_run
    run = RunResults("host kvm_pvm", list(tests.values()))
    table = format_table([run], width=200)
    assert "KVM lacks KVM_CAP_NESTED_STATE" in table
    assert "XFAIL(known)" in table and "pages_2m=-3" in table
    assert "PASS(known issue absent)" in table
    assert table.splitlines()[-1] == "2 passed, 3 failed, 1 skipped (1 xfailed, 1 intermittent known issue absent)"
    ktap = format_ktap([run]).splitlines()
    assert ktap[0] == "KTAP version 1" and ktap[1] == "1..7"
    assert any(line.startswith("ok ") and "# SKIP KVM lacks" in line for line in ktap)
    assert any(line.startswith("ok ") and "# XFAIL" in line for line in ktap)
    assert sum(line.startswith("not ok") for line in ktap) == 3
    assert exit_status([run]) == 1


def test_exit_status_rules():
    ok = RunResults("c", [{"nodeid": "a", "outcome": "passed"}, {"nodeid": "b", "outcome": "skipped", "reason": "r"},
                          {"nodeid": "c", "outcome": "xfailed", "reason": "r"}])
    assert exit_status([ok]) == 0
    assert exit_status([ok, RunResults("d", harness_error="pytest: no tests collected (exit 5)")]) == 2
    assert exit_status([RunResults("e", [{"nodeid": "x", "outcome": "xpassed"}])]) == 1
    assert exit_status([RunResults("e", [{"nodeid": "x", "outcome": "skipped", "reason": ""}])]) == 1
    # Nothing tested is never green, even next to a green run.
    not_tested = RunResults("f", [{"nodeid": "(not tested)", "outcome": "not-tested", "reason": "no /dev/kvm"}])
    assert exit_status([ok, not_tested]) == 2
    # A stopped run's partial results: 128 + the signal, whatever they say.
    stopped = RunResults("g", [{"nodeid": "a", "outcome": "failed"}], interrupted=signal.SIGTERM)
    assert exit_status([ok, stopped]) == 143
    assert exit_status([RunResults("h", interrupted=signal.SIGINT)]) == 130


def test_report_of_a_stopped_run():
    run = RunResults("host", [{"nodeid": "a", "outcome": "passed"},
                              {"nodeid": "b", "outcome": "interrupted", "reason": "the run was stopped during this test"}],
                     interrupted=signal.SIGINT, collected=96)
    table = format_table([run], width=200)
    assert "INTERRUPTED  stopped by SIGINT after 1 of 96 tests: the results are partial" in table
    assert table.splitlines()[-1] == "1 passed, 0 failed, 0 skipped (1 interrupted)"
    ktap = format_ktap([run]).splitlines()
    assert ktap[1] == "1..3" and ktap[2].startswith("not ok 1 harness host # stopped by SIGINT")


def test_not_tested_report():
    run = RunResults("host", [{"nodeid": "(not tested)", "outcome": "not-tested",
                               "reason": "not tested: /dev/kvm does not exist"}])
    table = format_table([run], width=200)
    assert "NOT TESTED  not tested: /dev/kvm does not exist" in table
    assert table.splitlines()[-1].startswith("NOT TESTED: 0 passed, 0 failed, 0 skipped")


def test_a_test_stopped_midway_is_not_recorded_as_passed(pytester, monkeypatch):
    # Before: its passing setup made it "passed" although its call never finished.
    pytester.makepyfile(test_stop="""
        import pytest
        def test_done():
            pass
        def test_stopped():
            raise KeyboardInterrupt
        def test_never_ran():
            pass
    """)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    out = pytester.path / "results.json"
    pytester.runpytest_subprocess("-p", "kvmpy.selftest.results", f"--kvmpy-results={out}")
    data = json.loads(out.read_text())
    tests = {t["nodeid"].split("::")[-1]: t["outcome"] for t in data["tests"]}
    assert tests == {"test_done": "passed", "test_stopped": "interrupted"}
    assert data["collected"] == 3 and data["exitstatus"] == 2


def test_kvm_unusable_names_the_cause(tmp_path):
    assert "does not exist" in guard.kvm_unusable(str(tmp_path / "kvm"))
    assert "KVM_GET_API_VERSION on /dev/null failed: ENOTTY" in guard.kvm_unusable("/dev/null")


@pytest.mark.parametrize("entry, error", [
    ('test = "x"\nreason = "r"\n', "lacks evidence"),
    ('test = "x"\nreason = "r"\nevidence = "e"\nmodul = "kvm_pvm"\n', "unknown keys"),
    ('test = "x"\nreason = "r"\nevidence = "e"\nintermittent = "yes"\n', "true or false"),
    ('test = "x"\nreason = "r"\nevidence = "e"\nsplats = "^WARNING"\n', "list of regexes"),
    ('test = "x"\nreason = "r"\nevidence = "e"\nsplats = ["(unclosed"]\n', "bad regex"),
    ('test = "x"\nreason = "r"\nevidence = "e"\nmatch = "[a-"\n', "bad regex"),
])
def test_known_issue_file_validation(tmp_path, entry, error):
    f = tmp_path / "k.toml"
    f.write_text("[[issue]]\n" + entry)
    with pytest.raises(known_issues.KnownIssueFileError, match=error):
        known_issues.load(f)


def test_known_issue_host_matching():
    k = known_issues.KnownIssue("t", "r", "e", kernel_release="6.18.*", module="kvm_pvm")
    assert k.applies_to_host("6.18.44-fc", {"kvm", "kvm_pvm"})
    assert not k.applies_to_host("6.18.44-fc", {"kvm", "kvm_amd"})
    assert not k.applies_to_host("6.12.1", {"kvm_pvm"})
    assert k.matches("selftests/test_dirty_log.py::t") is False
    k2 = known_issues.KnownIssue("test_dirty_log.py::test_x[ring]", "r", "e")
    assert k2.matches("selftests/test_dirty_log.py::test_x[ring]")
