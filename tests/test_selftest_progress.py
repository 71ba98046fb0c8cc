"""A run that never reaches pytest's end (killed by the bed's timeout, a machine that dies) still
shows the tests that had finished and names the one that was running."""
from __future__ import annotations

import json
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

from kvmpy.bed import parallel
from kvmpy.bed.request import BedFacts, BedResult
from kvmpy.selftest import bed_runner, report
from kvmpy.selftest.progress import PROGRESS_SUFFIX, read_progress

from bed_fakes import bed_args, machine_until_stopped, run_until_stopped

SUITE = """
import os, signal

def test_one():
    pass

def test_two():
    assert False, "two broke"

def test_hangs():
    os.kill(os.getpid(), signal.SIGKILL)    # as the bed's `timeout -s KILL` ends a hung test

def test_never_runs():
    pass
"""


def _run(pytester, monkeypatch, suite: str) -> Path:
    pytester.makepyfile(test_suite=suite)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    out = pytester.path / "results.json"
    pytester.runpytest_subprocess("-p", "kvmpy.selftest.results", f"--kvmpy-results={out}")
    return out


def test_a_killed_run_leaves_what_finished_and_what_was_running(pytester, monkeypatch):
    out = _run(pytester, monkeypatch, SUITE)
    assert not out.exists()
    tests, running = read_progress(Path(str(out) + PROGRESS_SUFFIX).read_text())
    assert [(t["nodeid"], t["outcome"]) for t in tests] == [("test_suite.py::test_one", "passed"),
                                                           ("test_suite.py::test_two", "failed")]
    assert "two broke" in tests[1]["reason"]
    assert running == "test_suite.py::test_hangs"


def test_a_finished_run_leaves_only_its_results(pytester, monkeypatch):
    out = _run(pytester, monkeypatch, "def test_one():\n    pass\n")
    assert json.loads(out.read_text())["tests"][0]["outcome"] == "passed"
    assert not Path(str(out) + PROGRESS_SUFFIX).exists()


def test_progress_lines_cut_or_foreign_are_skipped():
    good = {"nodeid": "t::a", "outcome": "passed", "reason": "", "duration": 0.5, "stats": {"pages_4k": 1}}
    text = "\n".join([
        json.dumps({"started": "t::a"}), json.dumps({"test": good}),
        "[1, 2]", "not json", json.dumps({"test": {"nodeid": 7}}),
        json.dumps({"test": {"nodeid": "t::b", "outcome": None, "duration": "long", "stats": []}}),
        json.dumps({"started": "t::c"}), '{"test": {"nodeid": "t::c", "outc',     # the kill cut this line
    ])
    tests, running = read_progress(text)
    assert tests == [good, {"nodeid": "t::b", "outcome": "", "reason": "", "duration": 0.0, "stats": {}}]
    assert running == "t::c"


def _progress(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _killed_boot(status):
    """A boot whose pytest was killed in its second test: no results file, its progress file."""
    files = {"results.json" + PROGRESS_SUFFIX: _progress(
        {"started": "selftests/test_a.py::test_ok"},
        {"test": {"nodeid": "selftests/test_a.py::test_ok", "outcome": "passed", "reason": "", "duration": 2.0}},
        {"started": "selftests/test_b.py::test_hangs"})}
    facts = BedFacts(backend="fake", cpu="max", kernel="6.12.117+deb12-amd64", vendor_module="kvm_amd",
                     params={}, hugepages={})
    error = "" if status is not None else "timed out after 600 s"
    return BedResult(status, "", files=files, facts=facts, seconds=600, error=error)


def test_a_boot_killed_in_a_test_names_it_and_keeps_the_finished(beds, tmp_path):
    _, opts = beds
    for status, why, ended in (
            (137, "pytest in the bed exited 137 without results",
             "pytest in the bed was killed (SIGKILL: the bed's timeout, or the kernel's OOM killer)"),
            (None, "bed: timed out after 600 s", "the bed stopped (timed out after 600 s)")):
        opts["hook"] = lambda bed, request, status=status: _killed_boot(status)
        [run] = bed_runner.run(bed_args(tmp_path, matrix=False), quiet=True)
        assert [(t["nodeid"], t["outcome"]) for t in run.tests] == [
            ("selftests/test_a.py::test_ok", "passed"), ("selftests/test_b.py::test_hangs", "failed")]
        assert run.tests[1]["reason"] == f"did not finish: running when {ended}"
        assert run.harness_error == f"{why}; 1 test(s) had finished, selftests/test_b.py::test_hangs was running"
        # Still not a verdict: the run did not finish.
        assert report.exit_status([run]) == report.EXIT_NOT_TESTED
        names = [c.get("name") for c in ET.parse(tmp_path / "j.xml").getroot().iter("testcase")]
        assert "test_hangs" in " ".join(names) and "test_ok" in " ".join(names)


def test_the_bed_brings_the_progress_file_back_even_from_a_machine_that_never_finishes(beds, tmp_path):
    # Bochs, which shares no directory with the host, sends a followed file over the console.
    _, opts = beds
    follows = []
    opts["hook"] = lambda bed, request: follows.append(request.follow) or _killed_boot(137)
    bed_runner.run(bed_args(tmp_path, matrix=False), quiet=True)
    assert follows == [("results.json" + PROGRESS_SUFFIX,)]


def test_a_boot_without_a_progress_file_is_the_error_alone(beds, tmp_path):
    _, opts = beds
    opts["hook"] = lambda bed, request: BedResult(137, "", files={}, facts=_killed_boot(137).facts)
    [run] = bed_runner.run(bed_args(tmp_path, matrix=False), quiet=True)
    assert run.tests == [] and run.harness_error == "pytest in the bed exited 137 without results"



def _stopped_with_progress(procs, part_with_progress):
    """Boots that run until a stop (once both started) and come back then; the one whose command
    names ``part_with_progress`` brings its progress file (a test finished, one running)."""
    def hook(bed, request):
        result = machine_until_stopped(procs, lambda started: len(started) == 2)
        if part_with_progress in " ".join(request.command) or part_with_progress in request.env.values():
            result.files, result.facts = _killed_boot(None).files, _killed_boot(None).facts
            result.boot_seconds = 5.0       # it had reported its facts: 'ready'
        return result
    return hook


def _stopped_run(beds, monkeypatch, args, marker: str):
    """``bed_runner.run(args)`` on 2 CPUs, SIGTERM once two boots run; the boot whose command
    or row names ``marker`` brings back its progress file."""
    _, opts = beds
    monkeypatch.setattr(parallel, "cpus", lambda: 2)
    monkeypatch.setattr(bed_runner, "mem_available", lambda: 64 << 30)
    procs = []
    opts["hook"] = _stopped_with_progress(procs, marker)
    return run_until_stopped(args, procs)


def test_a_stop_keeps_what_a_stopped_part_had_finished(beds, tmp_path, monkeypatch):
    [run] = _stopped_run(beds, monkeypatch, bed_args(tmp_path, matrix=False, jobs=None), "--kvmpy-part=1/2")
    assert [(t["nodeid"], t["outcome"]) for t in run.tests] == [
        ("selftests/test_a.py::test_ok", "passed"), ("selftests/test_b.py::test_hangs", "interrupted")]
    assert report.stop_note(run) == (
        "stopped by SIGTERM while part 1/2 ran in the bed (1 test(s) had finished, "
        "selftests/test_b.py::test_hangs was running); while part 2/2 ran in the bed: its results are lost")
    assert report.exit_status([run]) == 143
    cases = [c.get("name") for c in ET.parse(tmp_path / "j.xml").getroot().iter("testcase")]
    assert any("test_ok" in c for c in cases) and any("test_hangs" in c for c in cases)


def test_a_stopped_matrix_row_keeps_what_its_boot_had_finished(beds, tmp_path, monkeypatch):
    runs = _stopped_run(beds, monkeypatch, bed_args(tmp_path, jobs=2), "tdp-split")
    by_config = {r.config: r for r in runs}
    lost, kept = by_config["bed amd 6.12 tdp+split"], by_config["bed amd 6.12 tdp-split"]
    assert lost.tests == [] and "its results are lost" in lost.stop_detail
    assert [t["outcome"] for t in kept.tests] == ["passed", "interrupted"]
    assert kept.stop_detail.startswith("while this configuration ran in the bed (1 test(s) had finished, ")
    assert lost.interrupted == kept.interrupted == signal.SIGTERM
    # The boot that came back had reported its facts; the other one says it had not.
    assert kept.bed["summary"].startswith("fake (max), kernel 6.12.117+deb12-amd64, kvm_amd")
    assert lost.bed["summary"].endswith("stopped before it reported its facts")
    cases = [c.get("name") for c in ET.parse(tmp_path / "j-6.12-tdp-split.xml").getroot().iter("testcase")]
    assert any("test_ok" in c for c in cases)


def test_a_killed_boot_reports_the_splat_that_explains_it(beds, tmp_path):
    # A soft lockup in the hung test is what a KVM developer needs to see next to its name.
    _, opts = beds
    lockup = "[  99.0] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [python3:77]\n"

    def hook(bed, request):
        boot = _killed_boot(137)
        boot.kernel_log = lockup
        return boot

    opts["hook"] = hook
    [run] = bed_runner.run(bed_args(tmp_path, matrix=False), quiet=True)
    assert [t["nodeid"] for t in run.tests] == ["selftests/test_a.py::test_ok", "selftests/test_b.py::test_hangs",
                                                "(bed kernel log)"]
    assert "soft lockup" in run.tests[2]["reason"]
