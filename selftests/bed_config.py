"""Where the selftests run (this host, a bed boot, a matrix row) and what would run a test that cannot.

Inside ``kvmpy selftest --bed`` the bed tells the job the module parameters its boot was given
(``KVMPY_BED_PARAMS``: every ``--param``, and the matrix row's), the matrix row it runs in
(``KVMPY_BED_CONFIG``, absent outside ``--matrix``) and the machine (``KVMPY_BED_BACKEND``).

Which module parameters a test may change itself (set, and restore: selftests/host_state.py):

* on a normal host, none;
* in a matrix row, none: the row's parameters decide what runs, and a test that needs another
  value skips, naming the row (and the option) that runs it -- so two rows never run the same
  tests in the same configuration;
* in a single bed boot (``kvmpy selftest --bed``), those not given with ``--param``: one boot
  then runs the whole suite (eager and lazy huge-page splitting both); a ``--param`` value is
  fixed like a matrix row's.

Skip reasons say where the test ran and the option that would run it, in the bed's terms
(``--param kvm_amd.npt=0``, ``--backend bochs``), on a host in the host's.
"""
from __future__ import annotations

import os
from typing import Mapping

from kvmpy import bed_mark, hostinfo
from kvmpy.bed.matrix import CONFIG_ENV, configs_with, normalize
from kvmpy.bed.testbed import BACKEND_ENV, PARAMS_ENV
from kvmpy.errors import RequirementError
from kvmpy.mmu_params import MmuFlavour

# The bed backend whose machine has each CPU vendor's virtualization extension.
EXTENSION = {"amd": "SVM", "intel": "VMX"}
BACKEND_FOR = {"amd": "qemu", "intel": "bochs"}
VENDOR_NAME = {"amd": "AMD", "intel": "Intel"}


def boot_params() -> dict[str, str]:
    """The module parameters this bed boot was given (what the bed told the job; {} elsewhere)."""
    words = os.environ.get(PARAMS_ENV, "").split()
    return dict(w.split("=", 1) for w in words if "=" in w)


def matrix_row() -> str:
    """The matrix row this bed boot runs ('' outside a matrix)."""
    return os.environ.get(CONFIG_ENV, "")


def boot_fixes(param: str) -> bool:
    """Whether this bed boot fixed ``param`` (a matrix row, or --param): no test may change it.

    Only restricts: whether anything may be changed at all is the bed's mark's to say
    (selftests/host_state.py), never an environment variable's.
    """
    return bool(matrix_row()) or param in boot_params()


def _options(params: Mapping[str, str]) -> str:
    return " ".join(f"--param {k}={v}" for k, v in params.items())


def setting() -> str:
    """Where the tests run, as a skip reason names it."""
    if not bed_mark.in_bed():
        return "this host"
    given = " ".join(f"{k}={v}" for k, v in boot_params().items())
    if matrix_row():
        return f"matrix row {matrix_row()} ({given})"
    backend = os.environ.get(BACKEND_ENV)
    return f"this {backend + ' ' if backend else ''}bed boot ({_options(boot_params()) or 'default parameters'})"


def how_to_run(needs: Mapping[str, str]) -> str:
    """The option (and matrix rows) that give ``needs``, e.g. ``--param kvm_amd.npt=0 (matrix row shadow)``."""
    if not bed_mark.in_bed():
        loads = " ".join(f"{k}={v}" for k, v in needs.items())
        return (f"load the modules with {loads} or run `kvmpy selftest --bed {_options(needs)}`" if needs
                else "run `kvmpy selftest --bed`")
    rows = [c.name for c in configs_with(hostinfo.cpu_vendor(), needs)]
    where = f" (matrix row{'s' if len(rows) > 1 else ''} {', '.join(rows)})" if rows else ""
    return f"{_options(needs)}{where} runs it"


def require(ok: bool, why: str, needs: Mapping[str, str]) -> None:
    """RequirementError unless ``ok``: ``why`` the test cannot run here, where, and what would run it."""
    if not ok:
        raise RequirementError(f"{why}; {setting()}: {how_to_run(needs)}")


def tdp_mmu_needs(mmu: MmuFlavour) -> dict[str, str]:
    """The parameters that give new VMs the TDP MMU ({} for a vendor module without TDP: only the bed has it)."""
    return {mmu.tdp_param: "1", "kvm.tdp_mmu": "Y"} if mmu.has_tdp else {}


def require_tdp_mmu(mmu: MmuFlavour, why: str) -> None:
    """RequirementError unless new VMs get the TDP MMU (``why`` the test needs it)."""
    require(mmu.tdp_mmu, f"{why}; new VMs get the {mmu.name} ({mmu.params})", tdp_mmu_needs(mmu))


def require_param(param: str, want: str, now: str | None) -> None:
    """RequirementError unless ``param`` is ``want`` (it is ``now`` and the test may not change it)."""
    require(normalize(now or "") == normalize(want), f"needs {param}={want}, it is {now}", {param: want})


def require_bed_shadow_paging() -> None:
    """Inside the bed: RequirementError in the bed's terms unless new VMs use shadow paging."""
    fl = hostinfo.mmu_flavour()
    if bed_mark.in_bed() and fl.tdp:
        require(False, f"needs shadow paging, but {fl.tdp_param}=Y (TDP never shadows guest page tables)",
                {fl.tdp_param: "0"})


def require_bed_nested(vendor: str) -> None:
    """Inside the bed: RequirementError in the bed's terms unless its guests can run an L2 of ``vendor``."""
    if not bed_mark.in_bed():
        return
    have = hostinfo.cpu_vendor()
    if have != vendor:
        raise RequirementError(f"needs {EXTENSION[vendor]}: {setting()} emulates an {VENDOR_NAME.get(have, have)} CPU "
                               f"({EXTENSION.get(have, 'no virtualization extension')}); "
                               f"--backend {BACKEND_FOR[vendor]} runs it")
    module = f"kvm_{vendor}"
    params = hostinfo.module_params(module) or {}
    # kvm_amd offers NPT to L1 only when it uses NPT itself.
    needs = {f"{module}.nested": "1", **({"kvm_amd.npt": "1"} if vendor == "amd" else {})}
    for key, want in needs.items():
        require_param(key, want, params.get(key.split(".", 1)[1]))
