"""kvmpy's KVM selftests (pytest), shipped as kvmpy.selftests.

    conftest.py       the fixtures: what a test needs from the host (kvm, mmu, shadow_paging,
                      nested_svm, nested_vmx, scale); unmet needs are skips with the fix
    drivers.py        guest drivers stepped pass by pass (TouchGuest, NestedDirtyGuest)
    host_state.py     host changes made only inside the bed, always restored
    sptes.py          pages_4k/2m/1g counts and deltas
    test_*.py         the tests; known_issues.toml: defects of particular kernels
"""
