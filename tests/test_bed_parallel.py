"""`kvmpy selftest --bed --matrix --jobs N` on fake beds: the bound, the order, a stop that kills every machine."""
from __future__ import annotations

import json
import signal
import threading
import xml.etree.ElementTree as ET

import pytest

from kvmpy import cli
from kvmpy.bed import machine, parallel
from kvmpy.selftest import bed_runner, report

from bed_fakes import bed_args, machine_until_stopped, run_until_stopped

GiB = 1 << 30


@pytest.mark.parametrize("asked,rows,cpus,avail,want,why", [
    (2, 8, 2, 24 * GiB, 2, ""),
    (4, 8, 2, 24 * GiB, 2, "--jobs 4: running 2 at once (2 CPUs)"),
    (4, 8, 8, 12 * GiB, 2, "--jobs 4: running 2 at once (12.0 GiB of available memory holds 2 bed(s) of 5.0 GiB)"),
    (4, 3, 8, 64 * GiB, 3, "--jobs 4: running 3 at once (3 rows to run)"),
    (2, 8, 1, 24 * GiB, 1, "--jobs 2: running 1 at once (1 CPU)"),
    (2, 8, 4, 2 * GiB, 1, "--jobs 2: running 1 at once (2.0 GiB of available memory holds 1 bed(s) of 5.0 GiB)"),
    (3, 8, 4, 0, 3, ""),      # available memory unknown: no bound from it
])
def test_jobs_are_bounded_by_cpus_memory_and_rows_saying_why(asked, rows, cpus, avail, want, why):
    assert parallel.bound_jobs(asked, rows, 4 * GiB, cpus, avail) == (want, why)


def test_rows_are_committed_in_order_whatever_order_they_finish_in():
    first_may_finish = threading.Event()
    committed = []

    def work(i):
        if i == 0:   # the first row finishes last: only after the third has
            assert first_may_finish.wait(10), "the rows did not run at once"
        if i == 2:
            first_may_finish.set()
        return i * 10

    parallel.run_in_order(4, work, 3, lambda i, r: committed.append((i, r)))
    assert committed == [(0, 0), (1, 10), (2, 20), (3, 30)]


def _whole(tmp_path, jobs):
    runs = bed_runner.run(bed_args(tmp_path, jobs=jobs), quiet=True)
    return report.to_json({}, runs), sorted(p.name for p in tmp_path.glob("j-*.xml"))


def test_jobs_2_gives_the_report_of_jobs_1(beds, tmp_path, monkeypatch):
    seen, opts = beds
    monkeypatch.setattr(parallel, "cpus", lambda: 2)
    one, files_one = _whole(tmp_path, 1)
    running, most = set(), []
    lock = threading.Lock()

    def hook(bed, request):
        row = (bed.kernel.release, request.env["KVMPY_BED_CONFIG"])
        with lock:
            running.add(row)
            most.append(len(running))
        threading.Event().wait(0.02)    # long enough for the other worker to start its row
        with lock:
            running.discard(row)

    opts["hook"] = hook
    two, files_two = _whole(tmp_path, 2)
    assert two == one and files_two == files_one and len(files_one) == 8
    assert max(most) == 2, "two rows never ran at once"
    assert json.loads(two)["runs"][7]["row"] == "fake/6.1/shadow"


def test_a_stop_kills_every_machine_and_keeps_the_finished_rows(beds, tmp_path, monkeypatch):
    """SIGTERM while two rows boot (one of them a real process standing for its emulator): both
    machines die, the rows finished before are kept, the stopped ones and the unrun ones named."""
    _, opts = beds
    monkeypatch.setattr(parallel, "cpus", lambda: 2)
    procs = []

    def hook(bed, request):
        if bed.kernel.release.startswith("6.1.") or request.env["KVMPY_BED_CONFIG"] in ("tdp+split", "tdp-split"):
            return None
        # 6.12 legacy-tdp and shadow boot, each as a `sleep`, until killed; the stop comes meanwhile.
        return machine_until_stopped(procs, lambda started: len(started) == 2)

    opts["hook"] = hook
    runs = run_until_stopped(bed_args(tmp_path, jobs=2), procs)
    assert len(procs) == 2
    assert [r.config for r in runs] == ["bed amd 6.12 tdp+split", "bed amd 6.12 tdp-split",
                                        "bed amd 6.12 legacy-tdp", "bed amd 6.12 shadow"]
    assert runs[0].tests and runs[1].tests and not runs[2].tests
    assert [r.interrupted for r in runs] == [0, 0, signal.SIGTERM, signal.SIGTERM]
    assert report.stop_note(runs[3]).endswith("not run: bed amd 6.1 tdp+split, bed amd 6.1 tdp-split, "
                                              "bed amd 6.1 legacy-tdp, bed amd 6.1 shadow")
    assert report.exit_status(runs) == 143
    # --junit: a file per finished row, and one per stopped row with the stop as its error; none unrun.
    files = {p.name: p for p in tmp_path.glob("j-*.xml")}
    assert sorted(files) == sorted(f"j-6.12-{c}.xml" for c in ("tdp+split", "tdp-split", "legacy-tdp", "shadow")), files
    for config, stopped in (("tdp+split", False), ("legacy-tdp", True), ("shadow", True)):
        errors = [e.get("message", "") for e in ET.parse(files[f"j-6.12-{config}.xml"]).getroot().iter("error")]
        assert bool(errors) == stopped and all("stopped by SIGTERM" in e for e in errors), (config, errors)


def test_a_default_sigterm_unwinds_and_stops_the_machines():
    """A program that left SIGTERM at its default (a library user's): the run unwinds with
    SystemExit(143) instead of the process ending at once, and the machine is killed."""
    procs = []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    try:
        with pytest.raises(SystemExit) as e:
            parallel.run_in_order(1, lambda i: machine_until_stopped(procs, lambda started: True), 1,
                                  lambda i, r: None)
    finally:
        machine.allow_machines()
    assert e.value.code == 128 + signal.SIGTERM
    assert procs and procs[0].poll() is not None
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_no_machine_starts_once_a_stop_began():
    machine.stop_machines()
    try:
        with pytest.raises(Exception, match="the run is stopping: no machine started"):
            machine.start_machine(["true"])
    finally:
        machine.allow_machines()


def test_jobs_needs_the_bed(capsys):
    for jobs in ("2", "auto"):
        assert cli.main(["selftest", "--jobs", jobs]) == 2
        assert "--jobs: test bed option, ignored without --bed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["selftest", "--bed", "--jobs", "many"])
    assert "'many': a whole number, at least 1" in capsys.readouterr().err
