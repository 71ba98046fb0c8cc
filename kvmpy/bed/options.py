"""The bed's options: which kernel, which machine, its size and KVM module parameters.

:class:`BedOptions` is what both command lines (``kvmpy bed`` and ``kvmpy
selftest --bed``) build and what :class:`kvmpy.bed.testbed.Bed` takes.
:meth:`BedOptions.validate` checks everything that needs neither a download
nor a boot, so a typo costs no time; :meth:`BedOptions.parse` turns the
command-line spellings (``MODULE.PARAM=VALUE``, ``SIZE:COUNT``) into fields.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from kvmpy.bed.backend import BACKENDS
from kvmpy.bed.debian import KERNEL_LINES
from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import hugepages_cmdline, megabytes, params_cmdline, parse_hugepages, parse_param

ACCELS = ("tcg", "kvm")


@dataclasses.dataclass(frozen=True)
class BedOptions:
    """How to set up the bed.

    The kernel is a Debian line (``kernel_line``, "6.12" or "6.1", fetched
    into the cache; default: the backend's) or one the user built
    (``kernel``, a bzImage, with ``modules``, its ``INSTALL_MOD_PATH`` root or
    ``lib/modules/<release>``).  ``params`` are KVM module parameters, e.g.
    ``{"kvm.tdp_mmu": "N"}``; ``hugepages`` hugetlb pages reserved at boot,
    e.g. ``{"1G": 1, "2M": 32}``; ``timeout`` is in seconds per boot.
    """

    backend: str = "qemu"
    kernel_line: Optional[str] = None
    kernel: Optional[Path] = None
    modules: Optional[Path] = None
    accel: str = "tcg"
    mem: str = "2G"
    smp: int = 2
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    hugepages: Mapping[str, int] = dataclasses.field(default_factory=dict)
    timeout: float = 600.0

    @classmethod
    def parse(cls, *, params: Iterable[str] = (), hugepages: Iterable[str] = (),
              **fields: Any) -> "BedOptions":
        """Options from command-line strings: ``MODULE.PARAM=VALUE`` and ``SIZE:COUNT`` lists.

        Raises BedError naming the first malformed one.
        """
        for name in ("kernel", "modules"):
            if fields.get(name) is not None:
                fields[name] = Path(fields[name])
        return cls(params=dict(parse_param(p) for p in params),
                   hugepages=dict(parse_hugepages(h) for h in hugepages), **fields)

    def validate(self) -> None:
        """Raise BedError for an option no bed could run with; no download, no boot.

        A user kernel's files are checked when the bed adopts them
        (:func:`kvmpy.bed.kernel.user_kernel`), still before anything boots.
        """
        if self.backend not in BACKENDS:
            raise BedError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.accel not in ACCELS:
            raise BedError(f"--accel {self.accel}: choose {' or '.join(ACCELS)}")
        if self.accel != "tcg" and self.backend != "qemu":
            raise BedError(f"--accel applies to QEMU only, not {self.backend}")
        if (self.kernel is None) != (self.modules is None):
            raise BedError("--kernel and --modules go together")
        if self.kernel is not None and self.kernel_line is not None:
            raise BedError("--kernel-version names a Debian kernel; it does not go with --kernel")
        if self.kernel_line is not None and self.kernel_line not in KERNEL_LINES:
            raise BedError(f"unknown kernel line {self.kernel_line!r}; choose one of {', '.join(KERNEL_LINES)}")
        megabytes(self.mem)
        if not isinstance(self.smp, int) or self.smp < 1:
            raise BedError(f"--smp {self.smp!r}: at least 1 CPU")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise BedError(f"--timeout {self.timeout!r}: a positive number of seconds")
        params_cmdline(self.params)
        hugepages_cmdline(self.hugepages)
