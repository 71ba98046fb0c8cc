"""The suite's bytecode compiled on the host before a bed boot (kvmpy.selftest.bytecode)."""
import importlib.util
import os
import shutil
import sys

import pytest

from kvmpy.selftest import bytecode
from kvmpy.selftest.runner import selftests_dir


def test_compiles_the_suite_with_pytests_rewrites(tmp_path):
    suite = tmp_path / "selftests"
    shutil.copytree(selftests_dir(), suite, ignore=shutil.ignore_patterns("__pycache__"))
    notes = []
    assert bytecode.compile_suite(notes.append, suite=suite), notes
    assert notes == []
    tag = f"{sys.implementation.cache_tag}-pytest-{pytest.__version__}"
    tests = sorted(suite.glob("test_*.py"))
    assert tests
    for test in tests + [suite / "conftest.py"]:
        rewritten = test.parent / "__pycache__" / f"{test.stem}.{tag}.pyc"
        # pytest checks them by source hash: this is what the bed will accept.
        assert rewritten.read_bytes()[8:16] == importlib.util.source_hash(test.read_bytes())[:8], test
        assert os.path.exists(importlib.util.cache_from_source(str(test)))
    assert os.path.exists(importlib.util.cache_from_source(bytecode.__file__))


def test_a_tree_it_cannot_write_is_left_to_the_bed(monkeypatch):
    notes = []
    monkeypatch.setattr(bytecode.os, "access", lambda path, mode: False)
    monkeypatch.setattr(bytecode, "_rewrite_tests", lambda suite: pytest.fail("compiled anyway"))
    assert not bytecode.compile_suite(notes.append)
    assert notes and "not writable" in notes[0]


def test_a_failed_collection_is_said(monkeypatch):
    notes = []
    monkeypatch.setattr(bytecode, "_rewrite_tests", lambda suite: False)
    assert not bytecode.compile_suite(notes.append)
    assert notes and "could not compile" in notes[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_as_root_the_files_go_to_the_trees_owner(tmp_path):
    tree = tmp_path / "tree"
    cache = tree / "sub" / "__pycache__"
    cache.mkdir(parents=True)
    (cache / "a.pyc").write_bytes(b"x")
    (tree / "a.py").write_text("")
    os.chown(tree, 4321, 4321)
    bytecode._give_to_owner([tree])
    for path in (cache, cache / "a.pyc"):
        assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4321)
    assert (tree / "a.py").stat().st_uid == 0  # only what Python's caches hold
