"""Bad input to `kvmpy selftest` and `kvmpy report merge`: one clear error and exit 2, never a
traceback, never a green run that tested less than it says."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy import cli
from kvmpy.selftest import bed_runner, known_issues, options, report
from kvmpy.selftest.shard import Shard

from bed_fakes import bed_args

ROOT = Path(__file__).resolve().parent.parent
ROWS = ["qemu/6.12/a", "qemu/6.12/b"]


def _selftest(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["selftest", *argv])
    return rc, capsys.readouterr().err


# --- 1, 6, 7: pytest arguments that would test nothing, or less, or unwatched ------------

@pytest.mark.parametrize("args, error", [
    (["--collect-only"], "--collect-only: pytest then only collects the tests and runs no test"),
    (["--co"], "--co: pytest then only collects"),
    (["--setup-plan"], "--setup-plan: pytest then only shows the fixtures"),
    (["--setup-only"], "--setup-only: pytest then only sets the fixtures up"),
    (["--kvmpy-part", "1/3"], "--kvmpy-part: kvmpy-internal"),
    (["--kvmpy-part=1/3"], "--kvmpy-part: kvmpy-internal"),
    (["--kvmpy-results=/tmp/x"], "--kvmpy-results: kvmpy-internal"),
    (["--junitxml=/tmp/x.xml"], "use `kvmpy selftest --junit FILE`"),
    (["--no-splat-watch"], "--no-splat-watch: switches the kernel-splat watch off"),
    (["-p", "no:kvmpy.selftest.splat"], "-p no:kvmpy.selftest.splat: switches the kernel-splat watch off"),
    (["-pno:kvmpy.selftest.known_issues"], "switches the known-issues list off"),
    (["-p", "no:kvmpy.selftest.guard"], "switches the usable-KVM guard off"),
    (["--kvmpy-scale", "0"], "--kvmpy-scale 0: must be 1 to 100"),
    (["--kvmpy-scale=abc"], "--kvmpy-scale 'abc': a whole number, 1 to 100"),
    (["@args.txt"], "@args.txt: pytest would read more arguments from that file"),
])
@pytest.mark.parametrize("bed", [False, True], ids=["host", "bed"])
def test_pytest_arguments_that_would_not_test_what_is_asked_are_usage_errors(beds, capsys, args, error, bed):
    # (fake beds: were the check gone, --bed would boot nothing)
    rc, err = _selftest(capsys, *(["--bed"] if bed else []), "-k", "hello", "--", *args)
    assert rc == 2 and error in err, err
    assert err.startswith("kvmpy selftest: error: ") and "Traceback" not in err


def test_pytest_arguments_that_are_fine_pass(capsys):
    options.check_pytest_args(["-x", "--kvmpy-scale", "10", "-p", "s15_probe", "--setup-show", "-m", "not slow"])


def test_pytest_addopts_is_checked_like_the_arguments(capsys, monkeypatch):
    monkeypatch.setenv("PYTEST_ADDOPTS", "-q --collect-only")
    rc, err = _selftest(capsys, "-k", "hello")
    assert rc == 2 and "PYTEST_ADDOPTS: --collect-only" in err


# --- 9: the size multiplier ------------------------------------------------------------

@pytest.mark.parametrize("value, error", [("abc", "a whole number"), ("0", "must be 1 to 100"),
                                          ("-3", "must be 1 to 100"), ("1000000", "must be 1 to 100")])
def test_a_bad_scale_is_one_usage_error(capsys, monkeypatch, value, error):
    monkeypatch.setenv("KVMPY_SCALE", value)
    rc, err = _selftest(capsys, "-k", "hello")
    assert rc == 2 and "KVMPY_SCALE" in err and error in err


def test_a_bad_scale_stops_pytest_before_any_test(tmp_path):
    # Before: each test using `scale` errored (exit 1); now pytest stops once, a usage error.
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "selftests", "-k",
                        "test_every_page_written"], capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                       env=dict(os.environ, KVMPY_SCALE="0", PYTHONDONTWRITEBYTECODE="1"))
    assert p.returncode == 4, p.stdout + p.stderr
    assert "KVMPY_SCALE 0: must be 1 to 100" in p.stderr
    assert options.parse_scale("10") == 10 and options.parse_scale(" 100 ") == 100


def test_the_report_says_which_scale_a_run_used(tmp_path, capfd, monkeypatch):
    """A KVMPY_SCALE left in a shell silently made every run larger: the report now says so."""
    monkeypatch.setenv("KVMPY_SCALE", "2")
    rc = cli.main(["selftest", "-k", "test_hello_syncs_prints_and_finishes", "--json"])
    doc = json.loads(capfd.readouterr().out)
    assert rc == 0 and doc["runs"][0]["scale"] == 2, doc
    runs = report.runs_from_json(doc)
    assert runs[0].scale == 2 and "sizes multiplied by 2 (--kvmpy-scale or KVMPY_SCALE)" in report.format_table(runs)
    assert "# sizes multiplied by 2" in report.format_ktap(runs)
    runs[0].scale = 1
    assert "multiplied" not in report.format_table(runs)


# --- 8: KVMPY_KNOWN_ISSUES -------------------------------------------------------------

@pytest.mark.parametrize("content, error", [
    (b"\xff\xfe[[issue]]\n", "not UTF-8"),
    (b'issue = "x"\n', "'issue' must be an array of tables"),
    (b'[issue]\ntest = "t"\nreason = "r"\nevidence = "e"\n', "'issue' must be an array of tables"),
    (b'[[issue]]\ntest = "t"\nreason = "r"\nevidence = "e"\nmatch = 5\n', "match must be text"),
    (b'[[issue]]\ntest = 5\nreason = "r"\nevidence = "e"\n', "test must be text"),
    (b'[[issue]\n', "not valid TOML"),
])
def test_known_issues_files_that_are_not_are_errors(tmp_path, content, error):
    f = tmp_path / "k.toml"
    f.write_bytes(content)
    with pytest.raises(known_issues.KnownIssueFileError, match=error):
        known_issues.load(f)


def test_a_known_issues_directory_or_missing_file_is_an_error(tmp_path):
    with pytest.raises(known_issues.KnownIssueFileError, match="is a directory"):
        known_issues.load(tmp_path)
    with pytest.raises(known_issues.KnownIssueFileError, match="no such file"):
        known_issues.load(tmp_path / "missing.toml", missing_ok=False)


@pytest.mark.parametrize("name, content, error", [
    ("missing.toml", None, "does not exist"),
    ("dir", "dir", "is not a file"),
    ("bad.toml", b'issue = "x"\n', "'issue' must be an array of tables"),
    ("bin.toml", b"\xff\xfe", "not UTF-8"),
])
def test_known_issues_env_is_checked_before_the_run(capsys, monkeypatch, tmp_path, name, content, error):
    if content == "dir":
        (tmp_path / name).mkdir()
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVMPY_KNOWN_ISSUES", name)        # relative: to the user's directory
    rc, err = _selftest(capsys, "-k", "hello")
    assert rc == 2 and error in err and "Traceback" not in err, err
    assert f"{tmp_path}" in err


def test_a_relative_known_issues_path_is_the_users(tmp_path, monkeypatch):
    (tmp_path / "k.toml").write_text("")
    assert options.known_issues_path({"KVMPY_KNOWN_ISSUES": "k.toml"}, cwd=str(tmp_path)) == tmp_path / "k.toml"
    assert options.known_issues_path({}) is None


def test_the_known_issues_plugin_turns_a_bad_file_into_a_usage_error(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("KVMPY_KNOWN_ISSUES", str(tmp_path))          # a directory
    pytester.makepyfile(test_s="def test_a():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "kvmpy.selftest.known_issues")
    assert result.ret == 4
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert "is a directory" in result.stderr.str()
    monkeypatch.setenv("KVMPY_KNOWN_ISSUES", str(tmp_path / "missing.toml"))
    assert pytester.runpytest_subprocess("-p", "kvmpy.selftest.known_issues").ret == 4


# --- 10: --timeout, --ktap/--json, unwritable output ------------------------------------

@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "abc"])
def test_bed_timeout_must_be_positive(capsys, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["selftest", "--bed", "--timeout", value])
    assert e.value.code == 2 and "a positive number of seconds" in capsys.readouterr().err


def test_bed_timeout_zero_is_not_the_default(tmp_path):
    from kvmpy.bed.protocol import BedError

    assert bed_runner.bed_options(bed_args(tmp_path)).timeout == bed_runner.BED_TIMEOUT
    zero = bed_runner.bed_options(bed_args(tmp_path, timeout=0.0))
    assert zero.timeout == 0.0          # before: `or BED_TIMEOUT` made it 1500 s
    with pytest.raises(BedError, match="--timeout"):
        zero.validate()


def test_ktap_and_json_are_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["selftest", "--ktap", "--json"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# --- 3, 4: `kvmpy report merge` inputs ---------------------------------------------------

def _shard_doc(k: int, n: int = 2, rows=ROWS) -> dict:
    mine = rows[(k - 1) * len(rows) // n:k * len(rows) // n]
    runs = [report.RunResults(f"bed amd {r}", [{"nodeid": "t.py::x", "outcome": "passed", "reason": "",
                                                "duration": 0.1, "stats": {}}], 0, row=r) for r in mine]
    return json.loads(report.to_json({"kernel": "6.18"}, runs,
                                     {"shard": Shard(k, n, tuple(mine), tuple(rows)).to_dict()}))


def _merge(capsys, tmp_path, second: dict | str, *extra: str) -> tuple[int, str]:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_shard_doc(1)))
    b.write_text(second if isinstance(second, str) else json.dumps(second))
    rc = cli.main(["report", "merge", str(a), str(b), *extra])
    return rc, capsys.readouterr().err


def _edit(fn):
    doc = _shard_doc(2)
    fn(doc)
    return doc


@pytest.mark.parametrize("edit, error", [
    (lambda d: d.update(runs=[]), "shard 2/2 claims row qemu/6.12/b but has no run of it"),
    (lambda d: d["runs"][0].update(row="qemu/6.12/a"), "reports rows outside its slice"),
    (lambda d: d["runs"][0].update(tests=[]), "runs[0] (row qemu/6.12/b) has no tests"),
    (lambda d: d["runs"][0].pop("row"), "runs[0] (bed amd qemu/6.12/b) names no row"),
    (lambda d: d["runs"].append(dict(d["runs"][0])), "row qemu/6.12/b has two runs"),
    (lambda d: d["runs"][0]["tests"][0].update(outcome="weird"), "runs[0].tests[0].outcome: 'weird' is no outcome"),
    (lambda d: d["shard"].update(rows=[], all_rows=[]), "shard.rows: empty"),
    (lambda d: d["shard"].update(rows=["x"]), "shard.rows: x not in shard.all_rows"),
    (lambda d: d["runs"][0]["tests"][0].pop("outcome"), "runs[0].tests[0].outcome: missing"),
    (lambda d: d["runs"][0]["tests"].__setitem__(0, "str"), "runs[0].tests[0]: an object expected, not str"),
    (lambda d: d["runs"][0].update(interrupted=5), "runs[0].interrupted: text expected, not int 5"),
    (lambda d: d["runs"][0].update(interrupted="SIGFOO"), "runs[0].interrupted: 'SIGFOO' names no signal"),
    (lambda d: d["runs"][0]["tests"][0].update(stats=[1, 2]), "runs[0].tests[0].stats: an object expected"),
    (lambda d: d["runs"][0]["tests"][0].update(nodeid=5), "runs[0].tests[0].nodeid: text expected, not int 5"),
    (lambda d: d["runs"][0].update(config=None), "runs[0].config: text expected, not null"),
    (lambda d: d["runs"][0].update(collected="abc"), "runs[0].collected: a whole number or null expected"),
    (lambda d: d["runs"][0].update(seconds="abc"), "runs[0].seconds: a number expected"),
    (lambda d: d["runs"][0].update(bed="str"), "runs[0].bed: an object expected"),
    (lambda d: d["runs"][0].update(harness_error=None), "runs[0].harness_error: text expected"),
    (lambda d: d.update(runs={"a": 1}), "runs: a list expected"),
    (lambda d: d["shard"].update(index="2"), "shard.index: a whole number expected"),
    (lambda d: d["shard"].update(rows="qemu/6.12/b"), "shard.rows: a list of row names expected"),
])
def test_merge_refuses_reports_that_do_not_cover_their_rows_or_are_malformed(capsys, tmp_path, edit, error):
    rc, err = _merge(capsys, tmp_path, _edit(edit))
    assert rc == 2, err
    assert error in err and "Traceback" not in err, err
    assert err.startswith("kvmpy report merge: error: ")


def test_merge_accepts_a_stopped_shard_without_every_row(capsys, tmp_path):
    stopped = _edit(lambda d: d.update(runs=[{"config": "bed", "interrupted": "SIGTERM", "tests": [],
                                              "stop_detail": "before it ran"}]))
    rc, err = _merge(capsys, tmp_path, stopped)
    assert rc == 128 + 15, err


@pytest.mark.parametrize("text, error", [("[" * 100000, "nested too deeply"), ('{"runs": ' + "[" * 100000, "")])
def test_merge_of_deeply_nested_json_is_an_error_not_a_traceback(capsys, tmp_path, text, error):
    rc, err = _merge(capsys, tmp_path, text)
    assert rc == 2 and error in err and "Traceback" not in err


def test_merge_junit_may_not_overwrite_an_input(capsys, tmp_path):
    a = tmp_path / "a.json"
    rc, err = _merge(capsys, tmp_path, _shard_doc(2), "--junit", str(a))
    assert rc == 2 and "is one of the reports to merge" in err
    assert json.loads(a.read_text())["shard"]["index"] == 1         # intact
    rc, err = _merge(capsys, tmp_path, _shard_doc(2), "--junit", str(tmp_path / "." / "b.json"))
    assert rc == 2 and "is one of the reports to merge" in err


def test_merge_output_to_a_full_device_is_an_error(capsys, tmp_path):
    rc, err = _merge(capsys, tmp_path, _shard_doc(2), "--junit", "/dev/full")
    assert rc == 2 and "--junit /dev/full: cannot write: No space left on device" in err
    (tmp_path / "b.json").write_text(json.dumps(_shard_doc(2)))
    for argv in (["report", "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"],
                 ["info", "--json", "--no-probe"]):
        with open("/dev/full", "w") as full:
            p = subprocess.run([sys.executable, "-m", "kvmpy.cli", *argv], stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=120, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert p.returncode == 2, p.stderr
        assert "cannot write to standard output: No space left on device" in p.stderr
        assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr


def test_merge_junit_replaces_a_stale_file_even_when_the_merge_fails(capsys, tmp_path):
    out = tmp_path / "all.xml"
    out.write_text("<testsuites><testsuite name='old' tests='1'/></testsuites>")
    rc, _ = _merge(capsys, tmp_path, _edit(lambda d: d.update(runs=[])), "--junit", str(out))
    assert rc == 2 and not out.exists()
    rc, _ = _merge(capsys, tmp_path, _shard_doc(2), "--junit", str(out))
    assert rc == 0 and "qemu/6.12/b" in out.read_text()
