"""The `kvmpy` command as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def kvmpy(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "kvmpy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


def test_info_json_has_the_facts():
    p = kvmpy("info", "--json")
    facts = json.loads(p.stdout)
    for key in ("kernel_release", "vendor_module", "capabilities", "thp", "hugetlb_2m", "nested", "mmu_probe"):
        assert key in facts
    if not os.path.exists("/dev/kvm"):
        assert p.returncode == 1 and "does not exist" in facts["error"]
    else:
        assert p.returncode == 0
        assert facts["api_version"] == 12
        probe = facts["mmu_probe"]
        # The probe always lands on one side: SPTEs seen, or an explanation why not.
        assert probe["spte_pages"] > 0 or "SPTE" in facts["mmu_meaning"]


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm does not exist on this host")
def test_selftest_ktap_and_exit_status():
    p = kvmpy("selftest", "--ktap", "-k", "test_hello_syncs or test_1g_mapping")
    lines = p.stdout.splitlines()
    assert lines[0] == "KTAP version 1"  # stdout is KTAP only; pytest's chatter goes to stderr
    assert lines[1] == "1..2"
    body = lines[2:]
    assert any(line.startswith("ok ") and "test_hello_syncs" in line for line in body)
    assert p.returncode == 0, p.stdout + p.stderr


def test_selftest_no_match_is_a_harness_error():
    # pytest's "no tests collected" must never count as success.
    p = kvmpy("selftest", "--json", "-k", "no_such_test_anywhere")
    data = json.loads(p.stdout)
    assert p.returncode == 2
    assert "no tests collected" in data["runs"][0]["harness_error"]
