#!/usr/bin/env bash
# CI's Intel bed: Bochs (VMX+EPT), one boot for the guest runtime and the VMX variants of
# the nested tests.
#
# test_timeout_stops_the_vcpu and test_vcpu_waiting_forever_is_stopped_on_timeout are left
# out in Bochs only: a guest spinning on Bochs's single emulated CPU is never interrupted (no
# timer VM exit reaches KVM, with or without kvm_intel.preemption_timer), so the host thread
# that would kick it never runs and the boot hangs to its timeout. They pass on this host and
# in the QEMU bed, with 1 or 2 CPUs.
#
# Bochs 2.7 stopped its machine in its debugger in 3 of 3 boots that shared the 2 cores with
# two QEMU emulators (2026-11-30; twice at instruction ~10,718,300,000, in different tests; no
# console output: a triple fault of the bed's kernel or an emulator error, cause not known), and
# in none of 4 with at most one emulator per core, so .ci/run runs it alone. A boot that stops
# tested nothing after that point: it is a harness error (exit 2), printed in full here, and
# the boot runs once more. Any other failure, and a second stop, fail the step.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
select='(guest_runtime or (nested and vmx)) and not test_timeout_stops_the_vcpu and not test_vcpu_waiting_forever'
for attempt in 1 2; do
	log=results/bochs-attempt$attempt.log
	.venv/bin/kvmpy selftest --bed --backend bochs -k "$select" --junit results/bochs-junit.xml 2>&1 | tee "$log"
	rc=${PIPESTATUS[0]}
	grep -q "Bochs stopped the emulated machine" "$log" || exit "$rc"
	echo "bochs-suite: attempt $attempt: Bochs stopped its machine (see above)"
done
exit "$rc"
