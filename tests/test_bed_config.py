"""Where the selftests run and what a skip inside the bed says (selftests/bed_config.py)."""
from __future__ import annotations

import pytest

from kvmpy.errors import RequirementError
from selftests import bed_config, host_state


@pytest.fixture
def bed(monkeypatch):
    """Inside a bed boot of an AMD machine; the test sets its parameters and row."""
    monkeypatch.setattr(host_state, "in_bed", lambda: True)
    monkeypatch.setattr(bed_config.hostinfo, "cpu_vendor", lambda: "amd")
    monkeypatch.setenv("KVMPY_BED_BACKEND", "qemu")
    monkeypatch.delenv("KVMPY_BED_CONFIG", raising=False)
    monkeypatch.setenv("KVMPY_BED_PARAMS", "")
    return monkeypatch


def test_single_boot_may_change_what_no_param_fixed(bed):
    bed.setenv("KVMPY_BED_PARAMS", "kvm.tdp_mmu=N")
    assert bed_config.may_change("kvm.eager_page_split")
    assert not bed_config.may_change("kvm.tdp_mmu")
    assert bed_config.setting() == "this qemu bed boot (--param kvm.tdp_mmu=N)"


def test_matrix_row_fixes_everything_and_names_the_row_that_runs_a_test(bed):
    bed.setenv("KVMPY_BED_CONFIG", "tdp+split")
    bed.setenv("KVMPY_BED_PARAMS", "kvm.tdp_mmu=Y kvm.eager_page_split=Y")
    assert not bed_config.may_change("kvm.eager_page_split")
    with pytest.raises(RequirementError) as e:
        bed_config.require_param("kvm.eager_page_split", "N", "Y")
    assert str(e.value) == ("needs kvm.eager_page_split=N, it is Y; matrix row tdp+split (kvm.tdp_mmu=Y "
                            "kvm.eager_page_split=Y): --param kvm.eager_page_split=N (matrix row tdp-split) runs it")


def test_eager_split_is_never_flipped_inside_a_matrix_row(bed, monkeypatch):
    bed.setenv("KVMPY_BED_CONFIG", "tdp-split")
    bed.setenv("KVMPY_BED_PARAMS", "kvm.tdp_mmu=Y kvm.eager_page_split=N")
    monkeypatch.setattr(host_state, "module_params", lambda m: {"eager_page_split": "N"})
    writes = []
    monkeypatch.setattr(host_state, "_write", lambda path, value: writes.append((path, value)))
    with pytest.raises(RequirementError, match=r"matrix row tdp-split \(kvm.tdp_mmu=Y kvm.eager_page_split=N\): .*\(matrix row tdp\+split\) runs it"):
        with host_state.eager_page_split(True):
            pass
    assert writes == []
    # Outside a matrix the same boot sets it for the test and restores it.
    bed.delenv("KVMPY_BED_CONFIG")
    bed.setenv("KVMPY_BED_PARAMS", "kvm.tdp_mmu=Y")
    with host_state.eager_page_split(True):
        assert writes == [(host_state.EAGER_PARAM, "Y")]
    assert writes[-1] == (host_state.EAGER_PARAM, "N")


def test_bed_skip_reasons_name_the_option_never_this_host(bed, monkeypatch):
    with pytest.raises(RequirementError) as e:
        bed_config.require_bed_nested("intel")
    assert str(e.value) == ("needs VMX: this qemu bed boot (default parameters) emulates an AMD CPU (SVM); "
                            "--backend bochs runs it")
    bed.setenv("KVMPY_BED_CONFIG", "shadow")
    bed.setenv("KVMPY_BED_PARAMS", "kvm_amd.npt=0")
    monkeypatch.setattr(bed_config.hostinfo, "module_params", lambda m: {"nested": "1", "npt": "N"})
    with pytest.raises(RequirementError) as e:
        bed_config.require_bed_nested("amd")
    assert "needs kvm_amd.npt=1, it is N; matrix row shadow (kvm_amd.npt=0): --param kvm_amd.npt=1" in str(e.value)
    assert "tdp+split, tdp-split, legacy-tdp" in str(e.value)
    for msg in (str(e.value),):
        assert "this host" not in msg and "kvmpy bed" not in msg


def test_host_skip_reasons_point_at_the_bed(monkeypatch):
    monkeypatch.setattr(host_state, "in_bed", lambda: False)
    with pytest.raises(RequirementError) as e:
        bed_config.require(False, "needs shadow paging", {"kvm_amd.npt": "0"})
    assert str(e.value) == ("needs shadow paging; this host: load the modules with kvm_amd.npt=0 or run "
                            "`kvmpy selftest --bed --param kvm_amd.npt=0`")
    bed_config.require_bed_nested("intel")      # not in the bed: the host's own check decides
