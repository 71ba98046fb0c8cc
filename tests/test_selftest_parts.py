"""One configuration's tests over several boots (`kvmpy selftest --bed --jobs N`, one row):
each boot runs its part, every selected test runs once, the parts merge back into one run."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

from kvmpy.bed import parallel
from kvmpy.bed.request import BedFacts, BedResult
from kvmpy.selftest import bed_runner, report
from kvmpy.selftest.parts import merge_parts, parse
from kvmpy.selftest.report import RunResults

from bed_fakes import bed_args, machine_until_stopped, run_until_stopped

TESTS = "import pytest\n" + "".join(f"def test_{n}(): pass\n" for n in "abcde") + \
        "@pytest.mark.parametrize('x', [1, 2])\ndef test_p(x): pass\n"


def selected(tmp_path, *args) -> list[str]:
    (tmp_path / "test_many.py").write_text(TESTS)
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "kvmpy.selftest.parts", "-p", "no:cacheprovider",
                          "--collect-only", "-q", *args, str(tmp_path / "test_many.py")],
                         capture_output=True, text=True, cwd=tmp_path)
    return [line.split("::", 1)[1] for line in out.stdout.splitlines() if "::" in line]


def test_parts_split_the_selected_tests_each_once(tmp_path):
    whole = selected(tmp_path)
    assert whole == ["test_a", "test_b", "test_c", "test_d", "test_e", "test_p[1]", "test_p[2]"]
    parts = [selected(tmp_path, f"--kvmpy-part={k}/3") for k in (1, 2, 3)]
    assert parts == [whole[0::3], whole[1::3], whole[2::3]]
    # After -k: the parts share what it selected.
    assert selected(tmp_path, "-k", "not test_a", "--kvmpy-part=2/2") == ["test_c", "test_e", "test_p[2]"]


@pytest.mark.parametrize("text", ["0/2", "3/2", "2", "a/b", "1/0"])
def test_a_bad_part_is_a_usage_error(text, tmp_path):
    with pytest.raises(ValueError, match="1 <= K <= N"):
        parse(text)
    (tmp_path / "test_one.py").write_text("def test_x(): pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "kvmpy.selftest.parts", "-p", "no:cacheprovider",
                           f"--kvmpy-part={text}", str(tmp_path / "test_one.py")], capture_output=True, text=True)
    assert proc.returncode == 4, proc.stdout + proc.stderr


def _t(name, outcome="passed"):
    return {"nodeid": f"selftests/test_a.py::{name}", "outcome": outcome, "reason": "", "stats": {}}


def _facts(kernel="6.12.117", tdp="Y"):
    return {"facts": {"kernel": kernel, "params": {"kvm.tdp_mmu": tdp}}}


def test_merged_parts_are_the_run_in_collection_order():
    splat = {"nodeid": "(bed kernel log)", "outcome": "failed", "reason": "kernel splat: WARNING", "stats": {}}
    one = RunResults("bed", [_t("a"), _t("c"), _t("e")], 0, seconds=30, collected=3, bed=_facts(), row="r")
    two = RunResults("bed", [_t("b"), _t("d", "failed"), splat], 1, seconds=40, collected=2, bed=_facts(), row="r")
    run = merge_parts([one, two])
    assert [t["nodeid"].split("::")[-1] for t in run.tests] == ["a", "b", "c", "d", "e", "(bed kernel log)"]
    assert (run.exitstatus, run.seconds, run.collected, run.harness_error, run.row) == (1, 40, 5, "", "r")


def test_a_part_with_no_test_is_no_error_but_all_empty_is():
    ran = RunResults("bed", [_t("a")], 0, collected=1, bed=_facts())
    empty = RunResults("bed", [], 5, harness_error="pytest: no tests collected (exit 5)", collected=0, bed=_facts())
    merged = merge_parts([ran, empty])
    assert (merged.exitstatus, merged.harness_error, len(merged.tests)) == (0, "", 1)
    assert merge_parts([empty, empty]).harness_error.startswith("part 1/2: pytest: no tests collected")


def test_a_part_a_stop_caught_is_skipped_but_keeps_the_numbering():
    broken = RunResults("bed", [_t("b")], 3, harness_error="pytest: internal error (exit 3)", collected=1,
                        bed=_facts())
    merged = merge_parts([RunResults("bed", [_t("a")], 0, collected=1, bed=_facts()), None, broken])
    assert [t["nodeid"][-1] for t in merged.tests] == ["a", "b"] and merged.collected == 2
    assert merged.harness_error == "part 3/3: pytest: internal error (exit 3)"


def test_parts_on_different_configurations_are_a_harness_error():
    run = merge_parts([RunResults("bed", [_t("a")], 0, bed=_facts()),
                       RunResults("bed", [_t("b")], 0, bed=_facts(tdp="N"))])
    assert "different configurations" in run.harness_error
    assert report.exit_status([run]) == 2


def test_merged_parts_keep_what_the_splat_watch_read_and_the_scale():
    """Merging dropped both: a part whose kernel log nobody watched then made a green run, and
    the report did not say the size multiplier the parts ran at."""
    def part(watch, scale=2):
        return RunResults("bed", [_t("a")], 0, collected=1, bed=_facts(), splat_watch=watch, scale=scale)

    run = merge_parts([part("/dev/kmsg"), part("/dev/kmsg")])
    assert (run.splat_watch, run.scale, run.harness_error) == ("/dev/kmsg", 2, "")
    off = "OFF: no root to read /dev/kmsg"
    run = merge_parts([part("/dev/kmsg"), part(off)])
    assert run.splat_watch == off and report.not_tested_note([run])
    run = merge_parts([part("/dev/kmsg", 2), part("/dev/kmsg", 3)])
    assert run.scale is None and "different size multipliers (2, 3)" in run.harness_error


def _part_results(backend, request):
    """A fake boot that runs its part of tests a..e (the part read from the job's command; all without one)."""
    part = re.search(r"--kvmpy-part=(\d+)/(\d+)", " ".join(request.command))
    k, n = map(int, part.groups()) if part else (1, 1)
    tests = [_t(x) for x in "abcde"[k - 1::n]]
    facts = BedFacts(backend="fake", cpu="max", kernel=backend.kernel.release, vendor_module="kvm_amd",
                     params={}, hugepages={})
    results = {"exitstatus": 0, "seconds": 1.0, "collected": len(tests), "tests": tests}
    return BedResult(0, "", files={"results.json": json.dumps(results).encode()}, facts=facts, seconds=1)


def test_one_row_with_jobs_2_boots_twice_and_reports_one_run(beds, tmp_path, monkeypatch):
    seen, opts = beds
    opts["hook"] = _part_results
    monkeypatch.setattr(parallel, "cpus", lambda: 2)
    monkeypatch.setattr(bed_runner, "mem_available", lambda: 64 << 30)
    runs = bed_runner.run(bed_args(tmp_path, matrix=False, jobs=2), quiet=True)
    assert sorted(re.search(r"--kvmpy-part=\S+", " ".join(r.command)).group() for r in seen) == \
        ["--kvmpy-part=1/2", "--kvmpy-part=2/2"]
    assert len(runs) == 1 and runs[0].config == "bed amd 6.12 defaults" and runs[0].collected == 5
    assert [t["nodeid"][-1] for t in runs[0].tests] == list("abcde")
    cases = [c.get("name") for c in ET.parse(tmp_path / "j.xml").getroot().iter("testcase")]
    assert cases == list("abcde")
    assert report.exit_status(runs) == 0


def test_one_row_on_one_cpu_is_one_boot(beds, tmp_path, monkeypatch):
    seen, _ = beds
    monkeypatch.setattr(parallel, "cpus", lambda: 1)
    runs = bed_runner.run(bed_args(tmp_path, matrix=False, jobs=2, junit=None), quiet=True)
    assert len(seen) == 1 and "--kvmpy-part" not in " ".join(seen[0].command) and runs[0].tests


def test_without_jobs_one_row_boots_once_per_cpu_that_memory_holds(beds, tmp_path, monkeypatch, capsys):
    # The default (auto): each emulator runs on one host thread, so one boot per CPU.
    seen, opts = beds
    opts["hook"] = _part_results
    monkeypatch.setattr(parallel, "cpus", lambda: 2)
    monkeypatch.setattr(bed_runner, "mem_available", lambda: 64 << 30)
    runs = bed_runner.run(bed_args(tmp_path, matrix=False, jobs=None, junit=None), quiet=True)
    assert len(seen) == 2 and [t["nodeid"][-1] for t in runs[0].tests] == list("abcde")
    # Memory for one bed only: one boot, and the note says why.
    seen.clear()
    monkeypatch.setattr(bed_runner, "mem_available", lambda: 4 << 30)
    runs = bed_runner.run(bed_args(tmp_path, matrix=False, jobs="auto", junit=None), quiet=True)
    assert len(seen) == 1 and "--kvmpy-part" not in " ".join(seen[0].command) and len(runs[0].tests) == 5
    assert "--jobs auto (2 CPUs): running 1 at once (4.0 GiB of available memory holds 1 bed(s)" \
        in capsys.readouterr().err


def test_auto_splits_one_row_in_at_most_auto_parts_but_runs_matrix_rows_by_cpu(beds, tmp_path, monkeypatch):
    seen, opts = beds
    opts["hook"] = _part_results
    monkeypatch.setattr(parallel, "cpus", lambda: 64)
    monkeypatch.setattr(bed_runner, "mem_available", lambda: 1 << 40)
    runs = bed_runner.run(bed_args(tmp_path, matrix=False, jobs=None, junit=None), quiet=True)
    assert len(seen) == bed_runner.AUTO_PARTS == 4 and [t["nodeid"][-1] for t in runs[0].tests] == list("abcde")
    # Matrix rows are no parts: auto runs as many as the CPUs (and memory) hold.
    bed = SimpleNamespace(options=SimpleNamespace(mem="2G"))
    assert bed_runner._at_once(bed_args(tmp_path, jobs=None), [(bed, None)] * 8, 8, print) == 8
    assert bed_runner._at_once(bed_args(tmp_path, jobs=None), [(bed, None)] * 80, 80, print) == 64


def test_a_stop_while_the_parts_boot_kills_both_machines(beds, tmp_path, monkeypatch):
    """SIGTERM while the two parts of the default run boot (each a real process standing for its
    emulator): both die, and the run (and its --junit file) says the configuration's results are
    lost (exit 143)."""
    _, opts = beds
    monkeypatch.setattr(parallel, "cpus", lambda: 2)
    monkeypatch.setattr(bed_runner, "mem_available", lambda: 64 << 30)
    procs = []
    opts["hook"] = lambda bed, request: machine_until_stopped(procs, lambda started: len(started) == 2)
    runs = run_until_stopped(bed_args(tmp_path, matrix=False, jobs=None), procs)
    assert len(procs) == 2
    assert len(runs) == 1 and runs[0].interrupted == signal.SIGTERM and not runs[0].tests
    assert "its results are lost" in runs[0].stop_detail
    assert report.exit_status(runs) == 143
    # The --junit file says so too (a CI system finds an error, not a missing file).
    errors = [e.get("message") for e in ET.parse(tmp_path / "j.xml").getroot().iter("error")]
    assert len(errors) == 1 and "stopped by SIGTERM" in errors[0] and "its results are lost" in errors[0]


def test_a_stop_keeps_the_parts_that_had_finished(beds, tmp_path, monkeypatch):
    """Part 1 finishes, then SIGTERM while part 2 boots: part 1's tests are kept, and the run
    says part 2's results are lost (as a matrix keeps its finished rows)."""
    _, opts = beds
    monkeypatch.setattr(parallel, "cpus", lambda: 2)
    monkeypatch.setattr(bed_runner, "mem_available", lambda: 64 << 30)
    committed = threading.Event()

    def note(msg):
        if msg.startswith("[part 1/2]"):
            committed.set()

    monkeypatch.setattr(bed_runner, "_note", note)
    procs = []

    def hook(bed, request):
        if "--kvmpy-part=1/2" in " ".join(request.command):
            return _part_results(bed, request)
        return machine_until_stopped(procs, lambda started: committed.wait(30))

    opts["hook"] = hook
    runs = run_until_stopped(bed_args(tmp_path, matrix=False, jobs=None), procs)
    assert len(runs) == 1 and [t["nodeid"][-1] for t in runs[0].tests] == ["a", "c", "e"]
    assert report.stop_note(runs[0]) == "stopped by SIGTERM while part 2/2 ran in the bed: its results are lost"
    assert report.exit_status(runs) == 143
    cases = [c.get("name") for c in ET.parse(tmp_path / "j.xml").getroot().iter("testcase")]
    assert cases == ["(run)", "a", "c", "e"]
