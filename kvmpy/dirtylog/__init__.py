"""Dirty logging verified page by page: the checker, a collector per mode, the writer guest.

    checker      DirtyLogChecker: the host's model of one slot, verified each round
                 (the rules are in its module docstring); DirtyLogMismatch
    collectors   one collector per logging mode and LOG_MODES, the table of modes
    writer       DirtyWriterVm: guests/dirty_writer.c with test slots, driven by
                 SteppedGuest, its exit hook for KVM_EXIT_DIRTY_RING_FULL
    rounds       RoundPlan and run_round: one round from stamp to verdict
"""
from kvmpy.dirtylog.checker import DirtyLogChecker, DirtyLogMismatch, RoundReport, read_stamps
from kvmpy.dirtylog.collectors import LOG_MODES, MODE_NAMES, Collector, collector_by_name
from kvmpy.dirtylog.rounds import RoundPlan
from kvmpy.dirtylog.writer import DirtyWriterVm, SlotSpec

__all__ = ["DirtyLogChecker", "DirtyLogMismatch", "RoundReport", "read_stamps", "LOG_MODES", "MODE_NAMES",
           "Collector", "collector_by_name", "RoundPlan", "DirtyWriterVm", "SlotSpec"]
