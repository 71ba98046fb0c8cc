"""The nested test bed: boot a kernel under an emulator and run commands inside it.

The pieces a machine backend (QEMU, Bochs) shares live here:

* :mod:`kvmpy.bed.kernel` fetches or adopts a kernel and its KVM modules;
* :mod:`kvmpy.bed.initramfs` builds the busybox initramfs around a payload;
* :mod:`kvmpy.bed.backend` is the interface every backend implements;
* :mod:`kvmpy.bed.matrix` runs one command per module-parameter configuration;
* :mod:`kvmpy.bed.qemu` is the QEMU backend, :mod:`kvmpy.bed.cli` the
  ``kvmpy bed`` command.
"""
