"""`kvmpy selftest --bed [--matrix]` without booting: kernels x rows, what each row records, a stopped run."""
from __future__ import annotations

import json
import signal
import xml.etree.ElementTree as ET

from kvmpy.bed import matrix
from kvmpy.bed.options import BedOptions
from kvmpy.selftest import bed_runner, report

from bed_fakes import bed_args as _args, run_until_stopped

def test_kernel_axis_covers_both_debian_lines_unless_one_is_named():
    assert [o.kernel_line for o in matrix.kernel_axis(BedOptions())] == ["6.12", "6.1"]
    assert [o.kernel_line for o in matrix.kernel_axis(BedOptions(kernel_line="6.1"))] == ["6.1"]


def test_matrix_runs_every_row_on_every_kernel_and_records_what_it_ran_on(beds, tmp_path):
    seen, _ = beds
    runs = bed_runner.run(_args(tmp_path), quiet=True)
    rows = [c.name for c in matrix.AMD_MATRIX]
    assert [r.config for r in runs] == [f"bed amd {k} {c}" for k in ("6.12", "6.1") for c in rows]
    # The job learns its row and the parameters its boot was given.
    assert [r.env["KVMPY_BED_CONFIG"] for r in seen] == rows * 2
    assert seen[2].env["KVMPY_BED_PARAMS"] == "kvm.tdp_mmu=N"
    doc = json.loads(report.to_json({}, runs))
    bed = doc["runs"][5]["bed"]
    assert bed["facts"]["kernel"] == "6.1.0-57-amd64" and bed["facts"]["params"] == {"kvm.tdp_mmu": "Y",
                                                                                     "kvm.eager_page_split": "N"}
    assert bed["requested_params"] == {"kvm.tdp_mmu": "Y", "kvm.eager_page_split": "N"}
    assert doc["exit_status"] == 0
    # Each row's JUnit file says which kernel and parameters produced it.
    suite = ET.parse(tmp_path / "j-6.1-tdp-split.xml").getroot().find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["kvmpy.kernel"] == "6.1.0-57-amd64" and props["kvmpy.param.kvm.eager_page_split"] == "N"
    assert props["kvmpy.config"] == "bed amd 6.1 tdp-split"
    ktap = report.format_ktap(runs).splitlines()
    assert "# bed amd 6.1 tdp-split: fake (max), kernel 6.1.0-57-amd64, kvm_amd kvm.tdp_mmu=Y " \
           "kvm.eager_page_split=N, hugepages 2M:32" in ktap
    assert report.format_setting(runs).splitlines()[0] == "tested in the bed:"


def test_two_rows_with_the_same_effective_configuration_are_an_error(beds, tmp_path):
    _, opts = beds
    opts["same"] = True    # every boot reads back the first row's parameters
    runs = bed_runner.run(_args(tmp_path, junit=None), quiet=True)
    assert runs[0].harness_error == ""
    assert "same effective configuration as tdp+split" in runs[1].harness_error
    assert runs[4].harness_error == ""     # the other kernel is another configuration
    assert report.exit_status(runs) == 2


def test_a_single_boot_is_no_matrix_row(beds, tmp_path):
    seen, _ = beds
    runs = bed_runner.run(_args(tmp_path, matrix=False, junit=None), quiet=True)
    assert "KVMPY_BED_CONFIG" not in seen[0].env and runs[0].config == "bed amd 6.12 defaults"


def test_a_stopped_matrix_keeps_the_finished_rows_and_names_the_stopped_one(beds, tmp_path):
    _, opts = beds
    opts.update(stop_at=3, procs=[])
    runs = run_until_stopped(_args(tmp_path), opts["procs"])
    assert [r.config for r in runs] == ["bed amd 6.12 tdp+split", "bed amd 6.12 tdp-split", "bed amd 6.12 legacy-tdp"]
    assert runs[0].tests and runs[2].interrupted == signal.SIGTERM
    assert (tmp_path / "j-6.12-tdp-split.xml").exists()
    note = report.stop_note(runs[2])
    assert note.startswith("stopped by SIGTERM while this configuration ran in the bed: its results are lost; "
                           "not run: bed amd 6.12 shadow, bed amd 6.1 tdp+split")
    assert report.exit_status(runs) == 143
    assert "INTERRUPTED" in report.format_table(runs, width=300)


def test_a_boot_that_brought_no_junit_back_still_gets_its_junit_file(beds, tmp_path):
    # The bed died before pytest wrote junit.xml: the --junit file holds the run's error instead.
    from kvmpy.bed.request import BedResult

    _, opts = beds
    opts["hook"] = lambda bed, request: BedResult(None, "", error="no ready line within 600s")
    runs = bed_runner.run(_args(tmp_path, matrix=False), quiet=True)
    assert report.exit_status(runs) == 2
    errors = [e.get("message") for e in ET.parse(tmp_path / "j.xml").getroot().iter("error")]
    assert errors and "no ready line within 600s" in " ".join(errors)
