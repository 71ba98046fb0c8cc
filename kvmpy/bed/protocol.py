"""What the host and the bed agree on: console markers, inside paths, the bed's error.

Every other bed module imports from here, and this module imports none of
them: the constants the init (:mod:`kvmpy.bed.initramfs`), the backends and
the result parser (:mod:`kvmpy.bed.request`) share have one home.

Console protocol, printed by the shared init so that every backend can parse
a boot's outcome from the serial log alone (each marker after the first carries the
nonce the first announces: ``KVMPY-BED: <nonce> kernel ...``; see "reading markers")::

    KVMPY-BED: <nonce> nonce               (first: this boot's nonce)
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

import re
from typing import Optional, Tuple

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


# --- reading markers ---------------------------------------------------------------
#
# Anything the command prints reaches the same console as the init's markers, so a marker
# counts only when it is a whole line of the init's own making:
#
# * it starts the line (a CR stripped): text a program prints after other output is not one;
# * it carries this boot's nonce: ``KVMPY-BED: <nonce> <kind> [<arg>]``.  The init makes the
#   nonce itself, from the kernel's RNG, as the very first thing it prints
#   (``KVMPY-BED: <nonce> nonce``), before any process of the job exists, and keeps it in an
#   unexported shell variable: never in a file, an argv, an environment or the kernel command
#   line, which the job could read (a nonce on the command line would also be in the kernel
#   log, ``Kernel command line: ...``, which any process inside may read).  The host takes the
#   nonce from the *first* marker line of the console only: the job cannot print before the
#   init, and an announcement the kernel garbled leaves no nonce at all, so that nothing after
#   it counts (the boot is then an error, never green).  A process that is root inside could
#   still dig it out of the init's memory (/proc/1/mem); the nonce stops the ordinary way of
#   faking the verdict, output that happens to hold marker text (a test of this very parser,
#   a log line), not a job bent on lying, which can always fake its own results;
# * facts (``kernel``, ``cpu``, ``module``, ``hugepages``, ``param``) count before ``ready``
#   only, ``exit`` after it only (the first one), ``ready`` once.
#
# Text that does not come from a machine (tests, a console saved before markers had a
# nonce) may have no announcement: there, line-start markers without a nonce are read
# (``strict=False``).  A machine's console is always read strictly (:class:`ConsoleText`).

#: The kind of the init's first marker: ``KVMPY-BED: <nonce> nonce``.
NONCE_KIND = "nonce"
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_KIND_RE = re.compile(r"[A-Za-z0-9_-]+")
#: Markers that report the bed's facts: they count before ``ready`` only.
FACT_KINDS = ("kernel", "cpu", "module", "hugepages", "param")


class ConsoleText(str):
    """A machine's console text (:meth:`kvmpy.bed.machine.ConsoleLog.text`): its markers are
    read strictly, i.e. only with the nonce the init announced first. ``dropped`` says how
    much of the console was not kept (None: all of it)."""

    strict = True
    dropped: Optional[str] = None


class MarkerReader:
    """The init's markers, out of console lines fed in order (see the rules above).

    :meth:`read` returns ``(kind, argument)`` for a marker that counts, else None.
    """

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.nonce: Optional[str] = None
        self.ready = False
        self.exited = False
        self._first = True

    def read(self, line: str) -> Optional[Tuple[str, str]]:
        line = line.rstrip("\r")
        if not line.startswith(MARKER):
            return None
        rest = line[len(MARKER):]
        if self._first:
            self._first = False
            words = rest.split(" ")
            if len(words) == 3 and words[0] == "" and words[2] == NONCE_KIND and _NONCE_RE.fullmatch(words[1]):
                self.nonce = words[1]
                return NONCE_KIND, self.nonce
        if self.nonce is not None:
            prefix = f" {self.nonce} "
        elif self.strict:
            return None
        else:
            prefix = " "
        if not rest.startswith(prefix):
            return None
        kind, _, arg = rest[len(prefix):].partition(" ")
        if not _KIND_RE.fullmatch(kind) or kind == NONCE_KIND:
            return None
        if kind in FACT_KINDS and self.ready:
            return None
        if kind == "ready":
            if self.ready:
                return None
            self.ready = True
        elif kind == "exit":
            if not self.ready or self.exited:
                return None
            self.exited = True
        return kind, arg.strip()


def marker_reader(console: str) -> MarkerReader:
    """The reader for ``console``: strict for a machine's (:class:`ConsoleText`)."""
    return MarkerReader(strict=getattr(console, "strict", False))
