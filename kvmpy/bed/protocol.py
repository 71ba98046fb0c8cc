"""What the host and the bed agree on: console markers, inside paths, the bed's error.

Every other bed module imports from here, and this module imports none of
them: the constants the init (:mod:`kvmpy.bed.initramfs`), the backends and
the result parser (:mod:`kvmpy.bed.request`) share have one home.

Console protocol, printed by the shared init so that every backend can parse
a boot's outcome from the serial log alone::

    KVMPY-BED: kernel 6.12.9+bpo-amd64     (uname -r)
    KVMPY-BED: cpu AMD EPYC ...             (the emulated CPU's model name)
    KVMPY-BED: module kvm_amd               (vendor module loaded, or built in)
    KVMPY-BED: hugepages 2048kB=32          (hugetlb pool sizes)
    KVMPY-BED: param kvm.tdp_mmu=Y          (effective module parameters)
    KVMPY-BED: ready                        (modules loaded, about to run)
    KVMPY-BED: error <why>                  (the bed itself failed)
    KVMPY-BED: exit 0                       (exit status of the command)
    KVMPY-BED: follow NAME LINE             (a line of a followed results file, Bochs only)
"""

from __future__ import annotations

#: Prefix of every line the bed's init prints for the host.
MARKER = "KVMPY-BED:"

#: Prefix of a line of a followed results file (``Job.follow``) sent over the console.
FOLLOW = f"{MARKER} follow "

#: Written to the bed kernel's log once it has booted, before KVM is loaded:
#: splats before it come from the emulated CPU, not from KVM.
BOOT_DONE = "kvmpy-bed: booted, loading KVM"

#: Exit status reported when the harness, not the command, failed.
STATUS_HARNESS_ERROR = 2

#: Where the job and its results appear inside the bed (both backends).
INSIDE_SHARE = "/run/kvmpy"
#: ``$KVMPY_BED_RESULTS`` inside: files written here come back to the host.
INSIDE_RESULTS = INSIDE_SHARE + "/results"


class BedError(RuntimeError):
    """The bed could not be set up or run (bad option, missing package, bad kernel, ...)."""
