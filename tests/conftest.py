"""Fixtures for kvmpy's own unit tests."""
from __future__ import annotations

pytest_plugins = ["pytester", "kvmpy.selftest.fixtures"]
