"""Where the selftests run and what a skip inside the bed says (selftests/bed_config.py)."""
from __future__ import annotations

import pytest

from kvmpy import bed_mark
from kvmpy.errors import RequirementError
from kvmpy.selftests import bed_config
from kvmpy.selftests import host_state as hs

BOOT = "0b7d1c9e-5a3f-4e21-8c6d-2f9a1b3c4d5e"


def bed_root(tmp_path, eager="N"):
    """A fake / of a bed boot (both marks) whose kvm.eager_page_split is ``eager``."""
    files = {"/proc/cmdline": f"console=ttyS0 {bed_mark.CMDLINE_WORD}", bed_mark.BOOT_ID: BOOT,
             bed_mark.MARK_FILE: BOOT, hs.EAGER_PARAM: eager}
    for path, text in files.items():
        (tmp_path / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path.lstrip("/")).write_text(text + "\n")
    return hs.HostFs(str(tmp_path))


@pytest.fixture
def bed(monkeypatch):
    """Inside a bed boot of an AMD machine; the test sets its parameters and row."""
    monkeypatch.setattr(bed_mark, "in_bed", lambda root="/": True)
    monkeypatch.setattr(bed_config.hostinfo, "cpu_vendor", lambda: "amd")
    monkeypatch.setenv("KVMPY_BED_BACKEND", "qemu")
    monkeypatch.delenv("KVMPY_BED_CONFIG", raising=False)
    monkeypatch.setenv("KVMPY_BED_PARAMS", "")
    return monkeypatch


def test_single_boot_fixes_only_what_a_param_gave(bed):
    bed.setenv("KVMPY_BED_PARAMS", "kvm.tdp_mmu=N")
    assert not bed_config.boot_fixes("kvm.eager_page_split")
    assert bed_config.boot_fixes("kvm.tdp_mmu")
    assert bed_config.setting() == "this qemu bed boot (--param kvm.tdp_mmu=N)"
    bed.delenv("KVMPY_BED_BACKEND")
    assert bed_config.setting() == "this bed boot (--param kvm.tdp_mmu=N)"


def test_matrix_row_fixes_everything_and_names_the_row_that_runs_a_test(bed):
    bed.setenv("KVMPY_BED_CONFIG", "tdp+split")
    bed.setenv("KVMPY_BED_PARAMS", "kvm.tdp_mmu=Y kvm.eager_page_split=Y")
    assert bed_config.boot_fixes("kvm.eager_page_split")
    with pytest.raises(RequirementError) as e:
        bed_config.require_param("kvm.eager_page_split", "N", "Y")
    assert str(e.value) == ("needs kvm.eager_page_split=N, it is Y; matrix row tdp+split (kvm.tdp_mmu=Y "
                            "kvm.eager_page_split=Y): --param kvm.eager_page_split=N (matrix row tdp-split) runs it")


def test_eager_split_is_never_flipped_inside_a_matrix_row(bed, tmp_path):
    bed.setenv("KVMPY_BED_CONFIG", "tdp-split")
    bed.setenv("KVMPY_BED_PARAMS", "kvm.tdp_mmu=Y kvm.eager_page_split=N")
    fs = bed_root(tmp_path, eager="N")
    with pytest.raises(RequirementError, match=r"matrix row tdp-split \(kvm.tdp_mmu=Y kvm.eager_page_split=N\): "
                                               r".*\(matrix row tdp\+split\) runs it"):
        with hs.eager_page_split(True, fs=fs):
            pytest.fail("the test must not run")
    assert fs.read(hs.EAGER_PARAM) == "N"
    # Outside a matrix the same boot sets it for the test and restores it.
    bed.delenv("KVMPY_BED_CONFIG")
    bed.setenv("KVMPY_BED_PARAMS", "kvm.tdp_mmu=Y")
    with hs.eager_page_split(True, fs=fs):
        assert fs.read(hs.EAGER_PARAM) == "Y"
    assert fs.read(hs.EAGER_PARAM) == "N"


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
    monkeypatch.setattr(bed_mark, "in_bed", lambda root="/": False)
    with pytest.raises(RequirementError) as e:
        bed_config.require(False, "needs shadow paging", {"kvm_amd.npt": "0"})
    assert str(e.value) == ("needs shadow paging; this host: load the modules with kvm_amd.npt=0 or run "
                            "`kvmpy selftest --bed --param kvm_amd.npt=0`")
    bed_config.require_bed_nested("intel")      # not in the bed: the host's own check decides
