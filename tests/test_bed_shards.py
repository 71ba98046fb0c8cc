"""`--shard K/N` and `kvmpy report merge`, on fake beds: slices, usage errors, merged == unsharded."""
from __future__ import annotations

import json
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmpy import cli
from kvmpy.selftest import bed_runner, merge, report
from kvmpy.selftest.shard import Shard, ShardError, parse, slice_of

from bed_fakes import bed_args, sigterm_stops

ROWS = [f"fake/{k}/{c}" for k in ("6.12", "6.1") for c in ("tdp+split", "tdp-split", "legacy-tdp", "shadow")]
HOST = {"kernel": "6.18", "vendor_module": "kvm_pvm"}


@pytest.mark.parametrize("text", ["", "1", "0/2", "3/2", "1/0", "a/b", "1/2/3", "-1/2"])
def test_malformed_shards_are_refused(text):
    with pytest.raises(ShardError, match="--shard"):
        parse(text)


def test_shards_are_contiguous_near_equal_slices_covering_every_row_once():
    for n in range(1, 10):
        slices = [slice_of(ROWS, k, n) for k in range(1, n + 1)]
        assert [r for s in slices for r in s] == ROWS
        sizes = [len(s) for s in slices]
        assert max(sizes) - min(sizes) <= 1
    assert slice_of(ROWS, 1, 2) == ROWS[:4] and slice_of(ROWS, 2, 2) == ROWS[4:]  # one kernel per runner


def test_a_shard_with_no_rows_is_an_error_not_green():
    with pytest.raises(ShardError, match=r"--shard 1/9: no rows in this slice: the run has 8 row\(s\).*N <= 8"):
        Shard.select("1/9", ROWS)


def _run(args):
    """What `kvmpy selftest` does for ``args``: plan, run, the JSON report."""
    pairs, shard = bed_runner.plan(args) if args.shard else (None, None)
    runs = bed_runner.run(args, quiet=True, pairs=pairs)
    return report.to_json(HOST, runs, {"shard": shard.to_dict()} if shard else {})


def test_a_shard_runs_only_its_rows_and_says_which(beds, tmp_path):
    seen, _ = beds
    doc = json.loads(_run(bed_args(tmp_path, shard="2/3")))
    # Its JUnit files are named as in the unsharded run.
    assert sorted(p.name for p in tmp_path.glob("j-*.xml")) == ["j-6.1-tdp+split.xml", "j-6.12-legacy-tdp.xml",
                                                               "j-6.12-shadow.xml"]
    assert doc["shard"]["rows"] == ROWS[2:5] and doc["shard"]["all_rows"] == ROWS
    assert [r["row"] for r in doc["runs"]] == ROWS[2:5]
    assert [(r.env["KVMPY_BED_CONFIG"], r.env["KVMPY_BED_BACKEND"]) for r in seen] == \
        [("legacy-tdp", "fake"), ("shadow", "fake"), ("tdp+split", "fake")]


def _shard_files(tmp_path, n, **over):
    paths = []
    for k in range(1, n + 1):
        path = tmp_path / f"shard{k}.json"
        path.write_text(_run(bed_args(tmp_path, junit=None, shard=f"{k}/{n}", **over)))
        paths.append(str(path))
    return paths


def test_two_shards_merged_equal_the_unsharded_report(beds, tmp_path):
    whole = _run(bed_args(tmp_path, junit=None))
    host, runs, extra = merge.merge([merge.load(p) for p in reversed(_shard_files(tmp_path, 2))])
    assert report.to_json(host, runs, extra) == whole
    assert report.exit_status(runs) == json.loads(whole)["exit_status"] == 0
    assert report.format_table(runs, width=200) == report.format_table(report.runs_from_json(json.loads(whole)), 200)


def test_merge_gives_the_whole_runs_verdict_and_junit(beds, tmp_path, capsys):
    _, opts = beds
    opts["same"] = True      # every row reads back the first row's parameters: rows 2-4 of each kernel are errors
    paths = _shard_files(tmp_path, 2)
    out = tmp_path / "merged.xml"
    assert cli.main(["report", "merge", *paths, "--junit", str(out)]) == 2
    table = capsys.readouterr().out
    assert "same effective configuration as tdp+split" in table and f"merged 2 report(s): {paths[0]}" in table
    suites = ET.parse(out).getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == [f"bed amd {r.split('/')[1]} {r.split('/')[2]}" for r in ROWS]
    assert suites[1].get("errors") == "1" and suites[0].get("errors") == "0" and suites[0].get("tests") == "1"
    props = {p.get("name"): p.get("value") for p in suites[0].find("properties")}
    assert props["kvmpy.kernel"] == "6.12.117+deb12-amd64"
    assert cli.main(["report", "merge", *paths, "--ktap"]) == 2 and capsys.readouterr().out.startswith("KTAP")


def test_merge_of_a_stopped_shard_keeps_its_signal(beds, tmp_path):
    _, opts = beds
    opts.update(stop_at=6, procs=[])      # shard 2's second boot: SIGTERM
    with sigterm_stops(opts["procs"]):
        paths = _shard_files(tmp_path, 2)
    _, runs, _ = merge.merge([merge.load(p) for p in paths])
    assert report.exit_status(runs) == 128 + signal.SIGTERM
    assert runs[5].interrupted == signal.SIGTERM and "not run: bed amd 6.1 legacy-tdp" in report.stop_note(runs[5])


def _doc(tmp_path, name, k, n, rows=ROWS, host=HOST):
    mine = slice_of(rows, k, n)
    runs = [report.RunResults(f"bed amd {r}", [{"nodeid": "t::x", "outcome": "passed"}], 0, row=r) for r in mine]
    path = tmp_path / name
    path.write_text(report.to_json(host, runs, {"shard": Shard(k, n, tuple(mine), tuple(rows)).to_dict()}))
    return str(path)


@pytest.mark.parametrize("given,error", [
    ([("a", 1, 2), ("b", 1, 2), ("c", 2, 2)], r"shard 1/2 given twice: .*a and .*b"),
    ([("a", 1, 2), ("b", 2, 3), ("c", 3, 3)], r"inconsistent shards: the same rows sliced in 2 and 3 parts"),
    ([("a", 1, 3), ("b", 3, 3)], r"missing shard 2/3 \(rows fake/6.12/legacy-tdp, fake/6.12/shadow, "
                                 r"fake/6.1/tdp\+split\)"),
    ([], "no reports to merge"),
])
def test_merge_refuses_shards_that_are_not_one_run(tmp_path, given, error):
    with pytest.raises(merge.MergeError, match=error):
        merge.merge([merge.load(_doc(tmp_path, name, k, n)) for name, k, n in given])


def test_merge_refuses_a_row_from_two_runs(tmp_path):
    other = ROWS[:2] + ["fake/6.1/extra"]       # another run's rows, sharing two with this one
    reports = [merge.load(_doc(tmp_path, "a", 1, 1)), merge.load(_doc(tmp_path, "b", 1, 1, other))]
    with pytest.raises(merge.MergeError, match=r"row fake/6.12/tdp\+split is in two reports"):
        merge.merge(reports)


def test_merge_refuses_a_shard_that_ran_another_slice(tmp_path):
    path = _doc(tmp_path, "a", 1, 2)
    doc = json.loads(Path(path).read_text())
    doc["shard"]["rows"] = ROWS[:3]
    Path(path).write_text(json.dumps(doc))
    with pytest.raises(merge.MergeError, match=r"shard 1/2 ran rows .* but 1/2 of its run is"):
        merge.merge([merge.load(path), merge.load(_doc(tmp_path, "b", 2, 2))])


def test_merge_cli_errors_are_usage_errors(tmp_path, capsys):
    (tmp_path / "host.json").write_text(report.to_json(HOST, [report.RunResults("host kvm_pvm")]))
    (tmp_path / "junk.json").write_text("{")
    for name, why in (("host.json", "not a shard report"), ("junk.json", "not JSON"), ("nope.json", "cannot read")):
        assert cli.main(["report", "merge", str(tmp_path / name)]) == 2
        assert why in capsys.readouterr().err
    assert cli.main(["report", "merge", _doc(tmp_path, "a", 1, 2)]) == 2
    assert "missing shard 2/2" in capsys.readouterr().err


def test_shards_of_different_hosts_keep_each_hosts_header(tmp_path):
    paths = [_doc(tmp_path, "a", 1, 2), _doc(tmp_path, "b", 2, 2, host={**HOST, "kernel": "6.19"})]
    host, runs, extra = merge.merge([merge.load(p) for p in paths])
    assert host == HOST and [h["host"]["kernel"] for h in extra["shard_hosts"]] == ["6.18", "6.19"]
    assert [r.row for r in runs] == ROWS


def test_shard_usage_errors(beds, capsys):
    assert cli.main(["selftest", "--shard", "1/2"]) == 2
    assert "a host run is one row, this host's KVM" in capsys.readouterr().err
    assert cli.main(["selftest", "--bed", "--matrix", "--shard", "2/x"]) == 2
    assert "expected K/N" in capsys.readouterr().err
    assert cli.main(["selftest", "--bed", "--shard", "1/2"]) == 2      # one row without --matrix
    assert "--shard 1/2: no rows in this slice: the run has 1 row(s) (fake/6.12/default)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["selftest", "--bed", "--jobs", "0"])


def test_the_example_workflows_shards_cover_every_row_of_each_backend_once():
    import re
    from pathlib import Path

    from kvmpy.bed import matrix

    text = (Path(__file__).parent.parent / "ci/examples/github-actions-sharded.yml").read_text()
    shards: dict = {}
    for backend, k, n in re.findall(r"- \{ backend: (\w+), shard: (\d+)/(\d+) \}", text):
        shards.setdefault(backend, []).append((int(k), int(n)))
    assert sorted(shards) == ["bochs", "qemu"]
    for backend, given in shards.items():
        vendor = {"qemu": "amd", "bochs": "intel"}[backend]
        rows = [f"{backend}/{k}/{c.name}" for k in ("6.12", "6.1") for c in matrix.matrix_for(vendor)]
        n = given[0][1]
        assert sorted(given) == [(k, n) for k in range(1, n + 1)], f"{backend}: not every shard of {n}"
        assert [r for k, _ in sorted(given) for r in Shard.select(f"{k}/{n}", rows).rows] == rows
    assert "kvmpy report merge shards/report-*.json" in text
