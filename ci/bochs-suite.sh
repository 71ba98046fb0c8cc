#!/usr/bin/env bash
# CI's Intel bed: Bochs (VMX+EPT), in two boots: the guest runtime, then the VMX variants of
# the nested tests with L1's NX huge pages (EPT's execute bit, where the AMD bed has NPT's NX).
#
# test_triple_fault_raises_crash_with_registers is left out in Bochs only: there, the guest's
# deliberate triple fault stopped the whole emulated machine in Bochs's debugger in 5 of 6
# boots (2026-11-30: at instruction ~10,718,300,000-10,719,700,000, always in that test or
# just after it; no console output, cause not known: Bochs's VMX or KVM). It passes on this host
# and in the QEMU bed. A stop is a harness error (exit 2) naming the instruction
# (kvmpy/bed/bochs.py debugger_stop). Two boots keep the nested results apart from the runtime's.
#
# test_timeout_stops_the_vcpu and test_vcpu_waiting_forever_is_stopped_on_timeout are left
# out in Bochs only: a guest spinning on Bochs's single emulated CPU is never interrupted (no
# timer VM exit reaches KVM, with or without kvm_intel.preemption_timer), so the host thread
# that would kick it never runs and the boot hangs to its timeout. They pass on this host and
# in the QEMU bed, with 1 or 2 CPUs.
#
# --jobs 1: this runs beside the host steps and the QEMU suite (.ci/run), one emulator per core.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
status=0
.venv/bin/kvmpy selftest --bed --backend bochs --jobs 1 \
	-k 'guest_runtime and not test_timeout_stops_the_vcpu and not test_vcpu_waiting_forever and not test_triple_fault' \
	--junit results/bochs-runtime-junit.xml || status=1
.venv/bin/kvmpy selftest --bed --backend bochs --jobs 1 \
	-k '(nested and vmx) or test_fetch_splits_nx_huge_pages' --junit results/bochs-nested-junit.xml || status=1
exit $status
