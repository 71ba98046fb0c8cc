"""Running kvmpy's selftests: pytest plugins (results, known issues, splat watch) and the report."""
