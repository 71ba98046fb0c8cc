"""JUnit XML: what a configuration ran on as testsuite properties, and a report as a JUnit document.

pytest writes the JUnit file of each run itself (``--junit``); a merged report
(``kvmpy report merge --junit``) has only the runs' JSON, and gets its document from
:func:`format_junit`: one testsuite per configuration, one testcase per test.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from kvmpy.selftest.report import FAILING, NOT_TESTED, VERDICT_CASE, RunResults, run_problems


def setting_properties(label: str, setting: dict) -> dict[str, str]:
    """``kvmpy.*`` properties naming a configuration and what it ran on (RunResults.bed)."""
    facts = setting.get("facts", {})
    props = {"kvmpy.config": label}
    if setting:
        props["kvmpy.summary"] = setting.get("summary", "")
    for key in ("kernel", "kernel_origin", "backend", "accel", "cpu", "cpu_model", "vendor_module"):
        if facts.get(key):
            props[f"kvmpy.{key}"] = str(facts[key])
    props.update({f"kvmpy.param.{k}": str(v) for k, v in sorted(facts.get("params", {}).items())})
    props.update({f"kvmpy.hugepages.{k}": str(v) for k, v in sorted(facts.get("hugepages", {}).items())})
    return props


def _case(suite: ET.Element, classname: str, name: str, seconds: float = 0.0) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname=classname, name=name, time=f"{seconds:.3f}")


def _split(nodeid: str) -> tuple[str, str]:
    """pytest's (classname, name) of a node id: ``selftests/test_a.py::test_x[p]`` -> (selftests.test_a, test_x[p])."""
    path, _, name = nodeid.partition("::")
    return path.removesuffix(".py").replace("/", "."), name or path


def format_junit(runs: list[RunResults]) -> bytes:
    """One testsuite per run (its setting as properties), one testcase per test; harness errors
    and stops as error cases, so that a JUnit reader fails exactly where `kvmpy selftest` does."""
    root = ET.Element("testsuites", name="kvmpy selftest")
    problems = run_problems(runs)
    for r in runs:
        suite = ET.SubElement(root, "testsuite", name=r.config)
        props = ET.SubElement(suite, "properties")
        for name, value in setting_properties(r.config, r.bed).items():
            ET.SubElement(props, "property", name=name, value=value)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for case, config, text in problems:
            if case != VERDICT_CASE and config == r.config:     # this run's harness error or stop
                ET.SubElement(_case(suite, "kvmpy", case), "error", message=text)
                counts["tests"] += 1
                counts["errors"] += 1
        for t in r.tests:
            case = _case(suite, *_split(t["nodeid"]), float(t.get("duration", 0.0)))
            reason, outcome = t.get("reason") or "", t["outcome"]
            counts["tests"] += 1
            if outcome in ("skipped", "xfailed"):
                ET.SubElement(case, "skipped", message=reason,
                              **({"type": "pytest.xfail"} if outcome == "xfailed" else {}))
                counts["skipped"] += 1
            elif outcome in FAILING - {"error"}:
                ET.SubElement(case, "failure", message=reason or outcome)
                counts["failures"] += 1
            elif outcome in ("error", NOT_TESTED, "interrupted"):
                ET.SubElement(case, "error", message=reason or outcome)
                counts["errors"] += 1
            elif outcome == "known-absent" and reason:
                ET.SubElement(case, "system-out").text = reason
        for key, value in counts.items():
            suite.set(key, str(value))
    verdict = [(case, text) for case, _config, text in problems if case == VERDICT_CASE]
    if verdict:
        _error_suite(root, verdict)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _error_suite(root: ET.Element, errors: list[tuple[str, str]]) -> None:
    """A testsuite "kvmpy" of one error case per (name, message), added to ``root``."""
    suite = ET.SubElement(root, "testsuite", name="kvmpy", tests=str(len(errors)), failures="0",
                          errors=str(len(errors)), skipped="0")
    for name, message in errors:
        ET.SubElement(_case(suite, "kvmpy", name), "error", message=message)


def with_verdict(xml: bytes | None, runs: list[RunResults]) -> bytes | None:
    """The host run's JUnit document (``xml``, as pytest wrote it; None: it wrote none) made to
    fail where the report does: each of :func:`~kvmpy.selftest.report.run_problems` added as an
    error case. None when pytest's document needs nothing added."""
    errors = [(case, text if case == VERDICT_CASE else f"{config}: {text}") for case, config, text in run_problems(runs)]
    if xml is None:
        return format_junit(runs)
    if not errors:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return format_junit(runs)   # cut short (pytest killed while writing it): the report's own
    if root.tag != "testsuites":
        wrapper = ET.Element("testsuites")
        wrapper.append(root)
        root = wrapper
    _error_suite(root, errors)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
