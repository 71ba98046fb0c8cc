"""Shared fixtures for selftests that run on the host's /dev/kvm."""
from __future__ import annotations

import pytest

from kvmpy.errors import RequirementError

# Results (JSON for the report, the kvmpy_stats fixture), the known-issues list and
# the kernel-splat watch apply to every selftest run, by `kvmpy selftest` or plain pytest.
pytest_plugins = ["kvmpy.selftest.results", "kvmpy.selftest.known_issues", "kvmpy.selftest.splat"]


@pytest.fixture
def kvm():
    """An open /dev/kvm, or a skip whose reason is exactly why there is none."""
    from kvmpy import Kvm

    try:
        k = Kvm()
    except RequirementError as e:
        pytest.skip(str(e))
    with k:
        yield k
