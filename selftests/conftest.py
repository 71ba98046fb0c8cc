"""The selftests' fixtures: each says what a test needs from the host.

An unmet need is a RequirementError naming what is missing and how to get it;
the kvmpy.selftest.fixtures plugin turns it into a skip (the kernel selftests'
TEST_REQUIRE), so fixtures and tests never catch it themselves. Inside the bed the
reason names the bed configuration and the option that would run the test
(selftests/bed_config.py), never this host. Two exceptions to
"unmet need = skip", for ``mmu`` and ``shadow_paging``: an MMU probe that failed is
an error (nothing is known about the host), and inside the bed, where KVM's MMU is
known to be observable, "not observable" is a failure.

    kvm            an open /dev/kvm (from the kvmpy.selftest.fixtures plugin)
    scale          the size multiplier (--kvmpy-scale N or KVMPY_SCALE)
    cpl            the privilege level (0 or 3) of the test's guest: the test runs once per
                   level at which the MMU probe sees SPTEs (selftests/privilege.py)
    writer_cpl     the privilege level of a dirty-log writer: the lowest that runs natively;
                   with @pytest.mark.every_write_path, each level whose writes reach the
                   dirty log by a different path in KVM (native, emulated)
    mmu            guest accesses (at ``cpl`` if the test asks for it, else CPL0) create
                   SPTEs the pages_* stats count; the MmuFlavour (TDP MMU, shadow MMU
                   over TDP, shadow paging) new VMs get
    shadow_paging  like mmu, and new VMs use shadow paging (TDP off)
    nested_svm     kvm, whose guests can run an L2 with SVM and nested paging (NPT)
    nested_vmx     kvm, whose guests can enter VMX operation
    nested         'svm' or 'vmx', each test once per vendor: kvm's guests can run an L2 on
                   KVM's nested MMU (SVM with NPT, VMX with EPT)
    kvmpy_stats    record the stats deltas a test asserted, for the report
"""
from __future__ import annotations

import pytest

from kvmpy import bed_mark, hostinfo
from kvmpy.errors import RequirementError
from kvmpy.kvm import Kvm
from kvmpy.mmu_params import MmuFlavour, param_on
from kvmpy.selftest.options import MAX_SCALE, OptionError, scale_of

from . import bed_config, privilege

# The usable-KVM guard (no KVM: not tested), results (JSON for the report, the kvmpy_stats
# fixture), the known-issues list and the kernel-splat watch apply to every selftest run,
# by `kvmpy selftest` or plain pytest.
pytest_plugins = ["kvmpy.selftest.guard", "kvmpy.selftest.fixtures", "kvmpy.selftest.results",
                  "kvmpy.selftest.known_issues", "kvmpy.selftest.splat"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmpy")
    group.addoption("--kvmpy-scale", default=None, metavar="N",
                    help=f"multiply test sizes (pages, writes, rounds) by N (1 to {MAX_SCALE}) for real "
                         f"hardware (default 1, sized for an instruction-emulated guest; env KVMPY_SCALE)")


_SCALE = pytest.StashKey[int]()


def _scale_of(config: pytest.Config) -> int:
    """The size multiplier from --kvmpy-scale or KVMPY_SCALE (default 1); pytest.UsageError,
    once for the run, if it is not a whole number 1..MAX_SCALE."""
    try:
        return scale_of(config.getoption("--kvmpy-scale"))
    except OptionError as e:
        raise pytest.UsageError(str(e)) from None


@pytest.fixture
def scale(request: pytest.FixtureRequest) -> int:
    """The size multiplier from --kvmpy-scale or KVMPY_SCALE (default 1; checked at start)."""
    return request.config.stash[_SCALE]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "every_write_path: run at every privilege.write_levels() level")
    config.stash[_SCALE] = _scale_of(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cpl" in metafunc.fixturenames:
        metafunc.parametrize("cpl", privilege.levels(), ids=privilege.CPL_IDS.get)
    if "writer_cpl" in metafunc.fixturenames:
        every = metafunc.definition.get_closest_marker("every_write_path") is not None
        levels = privilege.write_levels() if every else (privilege.writer_level(),)
        metafunc.parametrize("writer_cpl", levels, ids=privilege.CPL_IDS.get)


def _cpl(request: pytest.FixtureRequest) -> int:
    return request.getfixturevalue("cpl") if "cpl" in request.fixturenames else 0


def _observable(cpl: int) -> None:
    """hostinfo.require_mmu_visible(cpl); in the bed, not observable is a failure, not a skip.
    A probe failure (MmuProbeError) propagates: the test errors."""
    try:
        hostinfo.require_mmu_visible(cpl)
    except RequirementError as e:
        if bed_mark.in_bed():
            pytest.fail(f"inside the bed KVM's MMU must be observable, but: {e}", pytrace=False)
        raise


@pytest.fixture
def mmu(request: pytest.FixtureRequest) -> MmuFlavour:
    """The MMU new VMs get, where guest memory accesses (at ``cpl``) make SPTEs the stats can show."""
    _observable(_cpl(request))
    return hostinfo.mmu_flavour()


@pytest.fixture
def shadow_paging(request: pytest.FixtureRequest) -> MmuFlavour:
    """The MMU flavour, where new VMs use shadow paging (kvm_amd.npt=0 / kvm_intel.ept=0; kvm_pvm)."""
    _observable(_cpl(request))
    bed_config.require_bed_shadow_paging()
    return hostinfo.require_shadow_paging(_cpl(request))


@pytest.fixture
def nested_svm(kvm: Kvm) -> Kvm:
    """/dev/kvm whose guests can use SVM with NPT (kvm_amd nested=1 npt=1)."""
    bed_config.require_bed_nested("amd")
    hostinfo.require_nested_guest(kvm, "amd")
    return kvm


@pytest.fixture
def nested_vmx(kvm: Kvm) -> Kvm:
    """/dev/kvm whose guests can use VMX (kvm_intel nested=1)."""
    bed_config.require_bed_nested("intel")
    hostinfo.require_nested_guest(kvm, "intel")
    return kvm


# nested vendor -> (CPU vendor, vendor module, its TDP parameter, how to get there)
_NESTED_VENDORS = {
    "svm": ("amd", "kvm_amd", "npt", "the AMD bed: kvmpy selftest --bed -k nested"),
    "vmx": ("intel", "kvm_intel", "ept", "the Intel bed: kvmpy selftest --bed --backend bochs -k nested"),
}


@pytest.fixture(params=sorted(_NESTED_VENDORS))
def nested(request: pytest.FixtureRequest, kvm: Kvm) -> str:
    """'svm' or 'vmx', the test running once for each: kvm's guests can run an L2 under SVM with
    NPT / VMX with EPT, so that L2's memory goes through KVM's nested (shadow NPT/EPT) MMU."""
    vendor = request.param
    cpu_vendor, module, param, where = _NESTED_VENDORS[vendor]
    bed_config.require_bed_nested(cpu_vendor)      # inside the bed: says so in the bed's terms
    loaded = hostinfo.loaded_vendor_module()
    if loaded != module:
        raise RequirementError(f"the {vendor.upper()} variant needs {module}, this host has "
                               f"{loaded or 'no vendor module'}: run it in {where}")
    hostinfo.require_nested_guest(kvm, cpu_vendor)
    value = (hostinfo.module_params(module) or {}).get(param)
    if not param_on(value):
        raise RequirementError(f"{module} {param}={value}: KVM offers nested {param.upper()} (and runs "
                               f"L2 on its nested MMU) only with {param}=1")
    return vendor
