"""The bed as a library: options in, one :class:`Bed`, a :class:`BedResult` per boot.

Both command lines use it the same way (after QEMU's ``python/qemu/machine``,
a launcher with no CLI of its own)::

    bed = Bed(BedOptions.parse(backend="qemu", params=["kvm.tdp_mmu=N"]))  # validates
    bed.prepare()                       # fetches the kernel, checks host tools
    result = bed.run(Job(["python3", "-c", "..."]))
    result.status, result.files, result.facts.summary()

Constructing a Bed checks every option and, for a kernel the user built, its
files and KVM modules, before any download or boot; :meth:`Bed.prepare`
fetches and checks the rest; :meth:`Bed.run` boots once.  The matrix
(:func:`kvmpy.bed.matrix.run_matrix`) runs (bed, configuration) pairs.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from kvmpy.bed.backend import Backend, backend_class
from kvmpy.bed.debian import fetch_debian
from kvmpy.bed.kernel import Kernel, require_kvm, user_kernel
from kvmpy.bed.options import BedOptions
from kvmpy.bed.request import BedRequest, BedResult, Job

#: Set in the job's environment: the module parameters the boot was given
#: (``kvm.tdp_mmu=N kvm_amd.npt=0``, the kernel command line's spelling) and the machine backend.
PARAMS_ENV = "KVMPY_BED_PARAMS"
BACKEND_ENV = "KVMPY_BED_BACKEND"


def _quiet(msg: str) -> None:
    pass


class Bed:
    """A configured test bed: validated options, its kernel, its machine backend.

    ``log`` receives progress notes (a kernel being fetched, ...).  ``backend``
    replaces the machine the options name (tests, measurements); its kernel
    is the bed's.  Raises BedError for bad options or a kernel unfit for the
    bed (not a bzImage, modules of another release, no KVM for the CPU).
    """

    def __init__(self, options: BedOptions, log: Callable[[str], None] = _quiet,
                 backend: Optional[Backend] = None) -> None:
        options.validate()
        self.options = options
        self.log = log
        self.backend = backend
        self.backend_class = type(backend) if backend else backend_class(options.backend)
        #: CPU vendor the guest sees ("amd", "intel"): picks the vendor module and the matrix.
        self.vendor: str = backend.vendor if backend else self.backend_class.cpu_vendor(options.accel)
        self.kernel: Optional[Kernel] = backend.kernel if backend else None
        if self.kernel is None and options.kernel is not None:
            self.kernel = user_kernel(options.kernel, options.modules)
            require_kvm(self.kernel, self.vendor)

    @property
    def kernel_line(self) -> str:
        """The Debian kernel line fetched when the options name no kernel."""
        return self.options.kernel_line or self.backend_class.default_kernel_line

    def prepare(self) -> Backend:
        """Fetch the kernel if needed and check the host tools; idempotent.

        Raises BedError naming what is missing (an apt package, a module).
        """
        if self.backend is None:
            kernel = self.kernel or fetch_debian(self.kernel_line, log=self.log)
            require_kvm(kernel, self.vendor)
            extra = {"accel": self.options.accel} if self.backend_class.name == "qemu" else {}
            backend = self.backend_class(kernel, **extra)
            backend.check()
            self.kernel, self.backend = kernel, backend
        return self.backend

    def request(self, job: Job, params: Mapping[str, str] = {}) -> BedRequest:
        """The backend request for one boot of ``job``; ``params`` add to the options' own.

        The job's environment says which parameters the boot was given and the backend
        (``KVMPY_BED_PARAMS``, ``KVMPY_BED_BACKEND``), so what runs inside can tell a
        parameter the user fixed from a kernel default.
        """
        o = self.options
        params = {**o.params, **params}
        env = {**job.env, PARAMS_ENV: " ".join(f"{k}={v}" for k, v in params.items()),
               BACKEND_ENV: self.backend_class.name}
        return BedRequest(command=list(job.command), params=params, mem=o.mem,
                          smp=o.smp, timeout=o.timeout, cwd=job.cwd, env=env,
                          on_console=job.on_console, append=tuple(job.append),
                          hugepages=dict(o.hugepages), follow=tuple(job.follow),
                          carry=tuple(job.carry))

    def run(self, job: Job, params: Mapping[str, str] = {}) -> BedResult:
        """Boot once, run ``job`` inside, power off; ``params`` add to the options' own."""
        return self.prepare().run(self.request(job, params))

    def describe(self) -> str:
        """``qemu/tcg, kernel 6.12.9-amd64`` (the kernel once known)."""
        accel = f"/{self.options.accel}" if self.backend_class.name == "qemu" else ""
        kernel = self.kernel.release if self.kernel else f"Debian {self.kernel_line}"
        return f"{self.backend_class.name}{accel}, kernel {kernel}"
