"""pytest plugin shared by kvmpy's selftests and unit tests: the ``kvm`` fixture and TEST_REQUIRE.

A :class:`~kvmpy.errors.RequirementError` raised anywhere in a test or a fixture
(a missing capability, CPU feature, backing, module parameter...) becomes a skip
whose reason is the error's text, here and nowhere else: tests and fixtures just
call the ``require*`` functions, like the kernel selftests' TEST_REQUIRE.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from kvmpy.errors import RequirementError
from kvmpy.kvm import Kvm


def _requirement_as_skip():
    try:
        return (yield)
    except RequirementError as e:
        # Reported at the test's own location, like a skip marker's.
        raise pytest.skip.Exception(str(e), _use_item_location=True) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    return (yield from _requirement_as_skip())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    return (yield from _requirement_as_skip())


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    """An open /dev/kvm (a skip saying why when there is none)."""
    with Kvm() as k:
        yield k
