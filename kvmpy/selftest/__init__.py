"""Running kvmpy's selftests: pytest plugins (fixtures and TEST_REQUIRE, results, known issues,
splat watch) and the report."""
