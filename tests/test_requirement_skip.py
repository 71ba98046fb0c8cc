"""The selftest plugin turns a RequirementError into a skip with its text, and nothing else."""
from __future__ import annotations

import textwrap


def test_requirement_error_in_a_test_or_fixture_is_a_skip(pytester):
    pytester.makepyfile(test_inner=textwrap.dedent("""
        import pytest
        from kvmpy.errors import RequirementError, require

        @pytest.fixture
        def needs_cap():
            raise RequirementError("KVM lacks KVM_CAP_X (load it with x=1)")

        def test_fixture_unmet(needs_cap):
            pass

        def test_body_unmet():
            require(False, "needs shadow paging: reload kvm_amd with npt=0")

        def test_met():
            require(True, "never shown")

        def test_real_failure():
            raise AssertionError("a failure stays a failure")
    """))
    result = pytester.runpytest("-p", "kvmpy.selftest.fixtures", "-rs")
    result.assert_outcomes(passed=1, skipped=2, failed=1)
    result.stdout.fnmatch_lines(["*KVM lacks KVM_CAP_X (load it with x=1)*",
                                 "*needs shadow paging: reload kvm_amd with npt=0*"])
