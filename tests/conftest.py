"""Fixtures for kvmpy's own unit tests."""
from __future__ import annotations

import os

import pytest

# Unit tests leave the user's guest-layout cache alone (test_elf's cache tests give it a tmp_path).
os.environ["KVMPY_ELF_CACHE"] = ""

from bed_fakes import install_fake_beds

pytest_plugins = ["pytester", "kvmpy.selftest.fixtures"]


@pytest.fixture
def beds(tmp_path, monkeypatch):
    """Fake beds of two kernels (6.12, 6.1) for `kvmpy selftest --bed`; returns (seen requests, FakeBed
    options: set them before the run)."""
    opts: dict = {}
    return install_fake_beds(tmp_path, monkeypatch, opts), opts
