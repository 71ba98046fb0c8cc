"""Fixtures for kvmpy's own unit tests."""
from __future__ import annotations

import pytest

from kvmpy.errors import RequirementError


@pytest.fixture
def kvm():
    """An open /dev/kvm, or a skip naming why there is none."""
    from kvmpy import Kvm

    try:
        k = Kvm()
    except RequirementError as e:
        pytest.skip(str(e))
    with k:
        yield k

pytest_plugins = ["pytester"]
