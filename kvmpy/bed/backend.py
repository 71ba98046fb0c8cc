"""The machine-backend interface of the test bed, and the registry of backends.

A backend boots a prepared kernel + initramfs in some machine (QEMU, Bochs),
runs one command inside, and returns a :class:`~kvmpy.bed.request.BedResult`.
Everything that is not machine-specific (which modules to load, how module
parameters reach insmod, how the exit status and facts are reported, the job
script, safe result files) is shared, so a new backend only has to know how
to start its machine, carry the command in and the results out.

Writing a backend (e.g. ``kvmpy/bed/bochs.py``): subclass :class:`Backend`,
register it in :data:`BACKENDS`, and in ``run``:

1. build the initramfs with :func:`kvmpy.bed.initramfs.build_initramfs`,
   passing a payload script that runs :func:`kvmpy.bed.job.job_script` and sets
   ``$status`` (the shared init loads the modules with the request's
   parameters and prints the markers of :mod:`kvmpy.bed.protocol`); pass
   ``params_cmdline(request.params)`` on the kernel command line;
2. start the machine with the helpers of :mod:`kvmpy.bed.machine` (own process
   group, dies with the harness), feed console lines to ``request.on_console``,
   kill the group when ``request.timeout`` expires;
3. bring the result files back through :mod:`kvmpy.bed.results` and return
   ``settle(parse_console(console), ..., self.machine_facts(), ...)``.
"""

from __future__ import annotations

import abc
import importlib

from kvmpy.bed.kernel import Kernel
from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import BedFacts, BedRequest, BedResult


class Backend(abc.ABC):
    """A machine that can boot the bed's kernel and initramfs.

    Backends are constructed as ``cls(kernel, **options)`` with a
    :class:`kvmpy.bed.kernel.Kernel`; options are backend-specific (QEMU
    takes ``accel``) and unknown ones must be rejected with BedError.
    """

    #: Name used by ``--backend``.
    name: str = ""
    #: CPU vendor the guest sees ("amd" or "intel"); picks the matrix.
    vendor: str = ""
    #: Debian kernel line used when the user names none.
    default_kernel_line: str = "6.12"

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    @classmethod
    def cpu_vendor(cls, accel: str = "tcg") -> str:
        """The CPU vendor the guest will see with ``accel`` (known before any kernel is)."""
        return cls.vendor

    @abc.abstractmethod
    def check(self) -> None:
        """Raise BedError (naming the apt package) if a host tool is missing."""

    @abc.abstractmethod
    def run(self, request: BedRequest) -> BedResult:
        """Boot, run ``request.command`` inside, power off; never hang.

        Must kill the machine (by pid, with its process group) once
        ``request.timeout`` expires and leave no temporary files behind.
        """

    def machine_facts(self) -> BedFacts:
        """What the host knows of this machine (backend, CPU, kernel image)."""
        return BedFacts(backend=self.name, kernel=self.kernel.release, kernel_origin=self.kernel.origin)


#: Backend name -> "module:Class"; imported lazily so a backend's host tools
#: are only needed when it is chosen.
BACKENDS = {
    "qemu": "kvmpy.bed.qemu:QemuBackend",
    "bochs": "kvmpy.bed.bochs:BochsBackend",
}
#: --vendor -> backend: TCG gives AMD SVM, Bochs gives Intel VMX.
VENDOR_BACKENDS = {"amd": "qemu", "intel": "bochs"}


def backend_class(name: str) -> type:
    """The Backend subclass registered as ``name``."""
    try:
        module_name, _, cls_name = BACKENDS[name].partition(":")
    except KeyError:
        raise BedError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BedError(f"backend {name} is not available: {exc}") from None
    return getattr(module, cls_name)
