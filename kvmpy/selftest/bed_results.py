"""What the suite's boots in the bed come back as: one RunResults per configuration.

A boot's results file becomes its run; a boot whose pytest never wrote one (killed by the
bed's timeout, or a machine that died or was stopped) shows what its progress file had:
the tests that finished and the one that was running. Here too: how a configuration is
labelled and identified (``row_id``, what --shard slices) and what it ran on (``setting``,
also the JUnit file's properties).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Collection, Dict, List, Tuple

from kvmpy.bed import matrix
from kvmpy.bed.request import BedResult
from kvmpy.bed.testbed import Bed
from kvmpy.selftest.junit import setting_properties
from kvmpy.selftest.progress import (PROGRESS_SUFFIX, STOPPED_TEST, add_unfinished, progress_note,
                                     unfinished_tests)
from kvmpy.selftest.report import RunResults
from kvmpy.selftest.runner import pytest_harness_error

# What pytest writes in the bed's results directory (and the progress file beside it).
RESULTS_FILE = "results.json"
PROGRESS_FILE = RESULTS_FILE + PROGRESS_SUFFIX

Pair = Tuple[Bed, matrix.Config]


def kernel_name(bed: Bed) -> str:
    """The Debian line ("6.12") or, for a kernel the user built, its release."""
    return bed.kernel.release if bed.options.kernel is not None and bed.kernel else bed.kernel_line


def label(bed: Bed, config: matrix.Config, in_matrix: bool) -> str:
    """A configuration's name in the report: ``bed amd 6.12 tdp+split`` (its parameters outside a matrix)."""
    what = config.name if in_matrix else " ".join(f"{k}={v}" for k, v in bed.options.params.items()) or "defaults"
    return f"bed {bed.vendor} {kernel_name(bed)} {what}"


def setting(bed: Bed, config: matrix.Config, row: matrix.Row | None) -> dict:
    """RunResults.bed: what a configuration ran on (as far as known when ``row`` is None)."""
    requested = {**bed.options.params, **config.params}
    if row is None:
        kernel = bed.kernel.release if bed.kernel else f"Debian {bed.kernel_line}"
        return {"summary": f"{bed.describe()}; stopped before it reported its facts",
                "requested_params": requested, "facts": {"kernel": kernel}}
    facts = row.result.facts
    return {"summary": facts.summary(), "requested_params": requested, "facts": facts.to_dict()}


def boot_run(config_label: str, row: matrix.Row) -> RunResults:
    """RunResults of one boot, with bed-level problems as harness errors or failures."""
    result = row.result
    raw = result.files.get(RESULTS_FILE)
    if result.status is not None and row.mismatches:
        return RunResults(config_label, harness_error="bed parameters: " + "; ".join(row.mismatches))
    if result.status is None or raw is None:
        error = (f"bed: {result.error or 'no exit status'}" if result.status is None
                 else f"pytest in the bed exited {result.status} without results")
        run = RunResults(config_label, exitstatus=result.status, harness_error=error)
        # What its progress file shows: a test that hangs the bed is named.
        add_unfinished(run, progress_text(result), "failed", f"did not finish: running when {_ended(result)}")
    else:
        run = RunResults.from_json(config_label, raw.decode())
        run.harness_error = pytest_harness_error(run.exitstatus)
    # A splat the per-test watch could not pin on a test still fails the run.
    for splat in row.splats:
        first = splat.splitlines()[0] if splat else "kernel splat"
        if not any(first in (t.get("reason") or "") for t in run.tests):
            run.tests.append({"nodeid": "(bed kernel log)", "outcome": "failed",
                              "reason": f"kernel splat: {first}", "duration": 0.0, "stats": {}})
    return run


def _ended(result: BedResult) -> str:
    """What ended a boot's pytest before it wrote its results."""
    if result.status is None:
        return f"the bed stopped ({result.error or 'no exit status'})"
    if result.status == 128 + 9:
        return "pytest in the bed was killed (SIGKILL: the bed's timeout, or the kernel's OOM killer)"
    return f"pytest in the bed exited {result.status}"


def progress_text(result: BedResult) -> str:
    """A boot's progress file (see :mod:`kvmpy.selftest.progress`); '' without one: a boot whose
    pytest wrote its results, or never started."""
    progress = result.files.get(PROGRESS_FILE)
    return progress.decode(errors="replace") if progress is not None else ""


def junit_with_setting(xml: bytes, config_label: str, ran_on: dict) -> bytes:
    """The JUnit document with what the configuration ran on (``ran_on``: its :func:`setting`) as
    ``kvmpy.*`` testsuite properties."""
    props = setting_properties(config_label, ran_on)
    root = ET.fromstring(xml)
    for suite in root.iter("testsuite"):
        node = suite.find("properties")
        if node is None:
            node = ET.Element("properties")
            suite.insert(0, node)
        for name, value in props.items():
            ET.SubElement(node, "property", name=name, value=value)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def row_id(bed: Bed, config: matrix.Config) -> str:
    """A row of the run: ``qemu/6.12/tdp+split`` (backend, kernel, configuration), what --shard slices."""
    return f"{bed.backend_class.name}/{kernel_name(bed)}/{config.name}"


def cut_run(pair: Pair, row: matrix.Row | None, in_matrix: bool) -> Tuple[RunResults, str] | None:
    """The run of a configuration (or part of one) a stop cut short, from its boot as it came
    back (``row``): the tests its progress file shows, the one running as interrupted; and a
    note saying so. None if the boot brought no such test back."""
    tests, running = unfinished_tests(progress_text(row.result), *STOPPED_TEST) if row is not None else ([], "")
    if not tests:
        return None
    bed, config = pair
    # The bed reports its facts before 'ready' (the boot time): from then on they are whole.
    reported = row if row.result.boot_seconds is not None else None
    run = RunResults(label(bed, config, in_matrix), tests, bed=setting(bed, config, reported), row=row_id(bed, config))
    return run, progress_note(tests, running)


def parts_stop_detail(nparts: int, finished: Collection[int], cut_notes: Dict[int, str]) -> str:
    """What a stop left of a configuration run in ``nparts`` parts (numbered from 0): the note of
    each part it cut short (:func:`cut_run`), then the parts whose results are lost."""
    notes = [f"while part {k + 1}/{nparts} ran in the bed ({cut_notes[k]})" for k in sorted(cut_notes)]
    lost = [f"{k + 1}/{nparts}" for k in range(nparts) if k not in finished and k not in cut_notes]
    if len(lost) == 1:
        notes.append(f"while part {lost[0]} ran in the bed: its results are lost")
    elif lost:
        notes.append(f"while parts {', '.join(lost)} ran in the bed: their results are lost")
    return "; ".join(notes) or "after every part had finished"


def stopped_runs(pairs: List[Pair], finished: List[int], running: List[int], signo: int,
                 in_matrix: bool, cut: Dict[int, matrix.Row] | None = None) -> List[RunResults]:
    """A row for each configuration a signal stopped, the last saying what was left unrun; with
    the tests that had finished in it where its boot came back (``cut``) with a progress file."""
    left = [i for i in range(len(pairs)) if i not in finished]
    if not left:
        return [RunResults("bed", interrupted=signo, stop_detail="after every configuration had finished")]
    running = running or left[:1]
    rest = [label(*pairs[i], in_matrix) for i in left if i not in running]
    out = []
    for n, i in enumerate(running):
        bed, config = pairs[i]
        run, note = cut_run(pairs[i], (cut or {}).get(i), in_matrix) or (
            RunResults(label(bed, config, in_matrix), bed=setting(bed, config, None), row=row_id(bed, config)), "")
        run.interrupted = signo
        run.stop_detail = (f"while this configuration ran in the bed ({note})" if note
                           else "while this configuration ran in the bed: its results are lost")
        if rest and n == len(running) - 1:
            run.stop_detail += f"; not run: {', '.join(rest)}"
        out.append(run)
    return out
