"""Shared fixtures for selftests that run on the host's /dev/kvm."""
from __future__ import annotations

import os

import pytest

# Results (JSON for the report, the kvmpy_stats fixture), the known-issues list and
# the kernel-splat watch apply to every selftest run, by `kvmpy selftest` or plain pytest.
pytest_plugins = ["kvmpy.selftest.fixtures", "kvmpy.selftest.results", "kvmpy.selftest.known_issues",
                  "kvmpy.selftest.splat"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmpy")
    group.addoption("--kvmpy-scale", type=int, default=None, metavar="N",
                    help="multiply test sizes (pages, writes, rounds) by N for real hardware "
                         "(default 1, sized for an instruction-emulated guest; env KVMPY_SCALE)")


@pytest.fixture
def scale(request: pytest.FixtureRequest) -> int:
    """The size multiplier from --kvmpy-scale or KVMPY_SCALE (default 1)."""
    opt = request.config.getoption("--kvmpy-scale")
    value = opt if opt is not None else int(os.environ.get("KVMPY_SCALE", "1"))
    if value < 1:
        raise pytest.UsageError("--kvmpy-scale must be >= 1")
    return value
