"""The nested test bed: boot a kernel under an emulator and run commands inside it.

A library first (after QEMU's ``python/qemu/machine``); both ``kvmpy bed`` and
``kvmpy selftest --bed`` are thin front ends of it.  From the bottom up:

* :mod:`~kvmpy.bed.protocol`: what host and bed agree on (console markers,
  ``BOOT_DONE``, inside paths) and :class:`BedError`; imports no other module;
* :mod:`~kvmpy.bed.request`: one boot's values: :class:`Job`, ``BedRequest``,
  ``BedResult`` with its ``BedFacts``; console parsing, parameter syntax;
* :mod:`~kvmpy.bed.kernel`: a kernel and its KVM modules (a user's build is
  checked here); :mod:`~kvmpy.bed.debian` fetches Debian's;
* :mod:`~kvmpy.bed.initramfs`: busybox, the modules and the shared init;
* :mod:`~kvmpy.bed.job`: the command's script inside; :mod:`~kvmpy.bed.machine`:
  running an emulator process; :mod:`~kvmpy.bed.results`: result files,
  confined and bounded; :mod:`~kvmpy.bed.media`, :mod:`~kvmpy.bed.carry`:
  boot media and carried files for a machine that cannot share the host's /;
* :mod:`~kvmpy.bed.backend`: the machine interface and registry, implemented
  by :mod:`~kvmpy.bed.qemu` (AMD SVM+NPT) and :mod:`~kvmpy.bed.bochs` (Intel VMX+EPT);
* :mod:`~kvmpy.bed.options` (``BedOptions``, validated before any download or
  boot) and :mod:`~kvmpy.bed.testbed` (``Bed``: options -> prepare -> run ->
  result), the entry point;
* :mod:`~kvmpy.bed.matrix`: (bed, module-parameter configuration) pairs, one table;
* :mod:`~kvmpy.bed.cli`: the ``kvmpy bed`` command.

The kernel-log splat parser the bed shares with the selftests is
:mod:`kvmpy.kernel_log`.
"""
