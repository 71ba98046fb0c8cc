"""Running kvmpy's selftests: pytest plugins (fixtures and TEST_REQUIRE, results, known issues,
splat watch) and the report.

:mod:`~kvmpy.selftest.runner` runs the suite on this host; :mod:`~kvmpy.selftest.bed_runner`
runs it inside the nested test bed through the bed's library entry point
(:class:`kvmpy.bed.testbed.Bed`).  The splat watch's kernel-log parser lives in
:mod:`kvmpy.kernel_log`, shared with the bed.
"""
