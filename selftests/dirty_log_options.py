"""pytest plugin for the dirty-logging selftests: ``--kvmpy-scale N``.

Load it with ``-p selftests.dirty_log_options`` or list it in selftests/conftest.py's
``pytest_plugins``. Without it, the tests read ``KVMPY_SCALE`` from the environment.
"""
from __future__ import annotations


def pytest_addoption(parser) -> None:
    group = parser.getgroup("kvmpy")
    group.addoption("--kvmpy-scale", type=int, default=None, metavar="N",
                    help="multiply dirty-log test sizes (pages, writes, rounds) by N for real hardware "
                         "(default 1, sized for an emulated guest; env KVMPY_SCALE)")
