"""Named faults injected into kvmpy on purpose, to test the tests.

``KVMPY_FAULTS=name[,name...]`` (read once, on first use) switches faults on for
a run: each is one bug planted at the one place in kvmpy where it applies, a
hook marked ``# FAULT: <name>``::

    if faults.active("collector-drops-page"):   # FAULT: collector-drops-page
        ...the broken behaviour...

Every fault names the tests that must catch it: with it on, those runs must
fail (``ci/faults.py`` runs them, a step of ``.ci/run``). A fault no test
catches is a hole in the suite. ``FAULTS`` is the registry; adding a fault is an
entry here, its hook, and the runs that must fail (README, "Fault injection").
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

from kvmpy.errors import KvmError
from kvmpy.record import Record

ENV = "KVMPY_FAULTS"


class FaultError(KvmError):
    """An unknown fault name (in ``KVMPY_FAULTS`` or a hook), or an injected failure."""


class Fault(Record, frozen=True):
    """A named fault: what it breaks, where its hook is, and which runs must fail with it on.

    ``host``: a ``kvmpy selftest -k`` expression whose run on any KVM host must fail;
    ``bed``: the same inside ``kvmpy selftest --bed`` (faults only real KVM's MMU shows);
    ``unit``: unit-test files (under tests/) whose run must fail. Empty: no such run.
    """

    name: str
    breaks: str
    hook: str
    host: str = ""
    bed: str = ""
    unit: tuple[str, ...] = ()


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("collector-drops-page", "every collection of dirty pages loses one reported page",
          "kvmpy.dirtylog.writer.DirtyWriterVm.collect",
          host="test_dirty_log and (test_dirty_ring_full or test_every_page_written)"),
    Fault("clear-misses-last-word", "KVM_CLEAR_DIRTY_LOG is never asked to clear the slot's last bitmap word",
          "kvmpy.dirtylog.collectors.ClearDirtyLogCollector.collect",
          host="test_slot_not_multiple_of_64_pages or test_clear_dirty_log_in_64_page_chunks"),
    Fault("ring-never-reset", "KVM_RESET_DIRTY_RINGS is skipped (its count faked): harvested entries are never "
          "handed back to KVM", "kvmpy.dirtylog.collectors.DirtyRingCollector.collect",
          host="test_dirty_ring_full and not 1g"),
    Fault("logging-never-disabled", "Vm.enable_dirty_logging(slot, False) leaves KVM_MEM_LOG_DIRTY_PAGES set",
          "kvmpy.vm.Vm.enable_dirty_logging", host="test_toggle_logging_while_guest_runs"),
    Fault("probe-fails", "the MMU probe fails before its guest runs", "kvmpy.hostinfo.probe_mmu",
          host="splitting or unsync", bed="splitting or unsync"),
    Fault("stats-names-swapped", "the stats parser gives pages_4k the value of pages_2m and vice versa",
          "kvmpy.stats_layout._read_as", host="splitting", bed="splitting", unit=("tests/test_stats_parse.py",)),
)}

_enabled: frozenset[str] | None = None


def parse(spec: str) -> frozenset[str]:
    """The fault names of a ``KVMPY_FAULTS`` value (comma or space separated)."""
    names = frozenset(n for n in spec.replace(",", " ").split())
    unknown = sorted(names - set(FAULTS))
    if unknown:
        raise FaultError(f"{ENV}: unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return names


def enabled() -> frozenset[str]:
    """The faults switched on for this process (``KVMPY_FAULTS``, read once)."""
    global _enabled
    if _enabled is None:
        _enabled = parse(os.environ.get(ENV, ""))
    return _enabled


def active(name: str) -> bool:
    """Whether fault ``name`` is on: the condition of its hook."""
    if name not in FAULTS:
        raise FaultError(f"no fault named {name!r} (hooks name a FAULTS entry)")
    return name in enabled()


def check(name: str) -> None:
    """A hook that fails: raise FaultError if fault ``name`` is on."""
    if active(name):
        raise FaultError(f"injected fault {name}: {FAULTS[name].breaks}")


def banner(consequence: str, names: Iterable[str] | None = None) -> str | None:
    """The loud line of a run with faults injected (``names``, default: this process's), saying
    ``consequence``; None without faults."""
    names = sorted(enabled() if names is None else names)
    return f"FAULTS INJECTED ({ENV}={','.join(names)}): {consequence}" if names else None


def env() -> dict[str, str]:
    """The environment that carries this process's faults to a child (e.g. inside the bed)."""
    names = enabled()
    return {ENV: ",".join(sorted(names))} if names else {}


@contextlib.contextmanager
def injected(*names: str) -> Iterator[None]:
    """Switch ``names`` on inside this process for the ``with`` block (unit tests of the hooks)."""
    global _enabled
    before = enabled()
    _enabled = before | parse(" ".join(names))
    try:
        yield
    finally:
        _enabled = before
