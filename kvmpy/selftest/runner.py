"""`kvmpy selftest`: run the packaged selftests through pytest and build the report."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmpy.selftest.report import RunResults

# pytest exit codes that mean the harness, not a test, went wrong.
PYTEST_HARNESS_ERRORS = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}


def selftests_dir() -> Path:
    """The selftests: the source tree's ``selftests/`` or the installed ``kvmpy/selftests``."""
    pkg = Path(__file__).resolve().parent.parent
    for candidate in (pkg.parent / "selftests", pkg / "selftests"):
        if (candidate / "conftest.py").exists():
            return candidate
    raise FileNotFoundError(f"kvmpy selftests not found next to {pkg} (broken install?)")


def pytest_command(results_json: str, junit: str | None, keyword: str | None,
                   extra: list[str] | None = None, python: str | None = None) -> list[str]:
    """The pytest command line used on the host and inside the bed."""
    cmd = [python or sys.executable, "-m", "pytest", str(selftests_dir()), "-v", "-rN", "--tb=short",
           "-p", "no:cacheprovider", "-p", "kvmpy.selftest.results", f"--kvmpy-results={results_json}"]
    if junit:
        cmd.append(f"--junitxml={junit}")
    if keyword:
        cmd += ["-k", keyword]
    return cmd + list(extra or [])


def run_host(junit: str | None = None, keyword: str | None = None, extra: list[str] | None = None,
             config: str = "host", machine_output: bool = False) -> RunResults:
    """Run the suite against this host's /dev/kvm, streaming pytest's per-test lines.

    With ``machine_output`` pytest's own output goes to stderr, keeping stdout for JSON/KTAP.
    """
    with tempfile.TemporaryDirectory(prefix="kvmpy-selftest-") as tmp:
        results = os.path.join(tmp, "results.json")
        cmd = pytest_command(results, junit, keyword, extra)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        try:
            proc = subprocess.run(cmd, env=env, cwd=str(selftests_dir().parent),
                                  stdout=sys.stderr if machine_output else None)
        except KeyboardInterrupt:
            return RunResults(config, harness_error="interrupted (Ctrl-C)")
        if not os.path.exists(results):
            return RunResults(config, exitstatus=proc.returncode,
                              harness_error=f"pytest exited {proc.returncode} without results "
                                            f"({'killed by signal %d' % -proc.returncode if proc.returncode < 0 else 'see output above'})")
        with open(results) as f:
            run = RunResults.from_json(config, f.read())
    if run.exitstatus in PYTEST_HARNESS_ERRORS:
        run.harness_error = f"pytest: {PYTEST_HARNESS_ERRORS[run.exitstatus]} (exit {run.exitstatus})"
    return run
