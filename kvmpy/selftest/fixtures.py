"""pytest plugin with the fixtures shared by kvmpy's selftests and unit tests."""
from __future__ import annotations

from typing import Iterator

import pytest

from kvmpy.errors import RequirementError


@pytest.fixture
def kvm() -> Iterator["Kvm"]:  # noqa: F821
    """An open /dev/kvm, or a skip whose reason is exactly why there is none."""
    from kvmpy import Kvm

    try:
        k = Kvm()
    except RequirementError as e:
        pytest.skip(str(e))
    with k:
        yield k
