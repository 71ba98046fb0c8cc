"""kvmpy's KVM selftests (pytest), shipped as kvmpy.selftests.

    conftest.py       the fixtures: what a test needs from the host (kvm, mmu, shadow_paging,
                      nested_svm, nested_vmx, nested (once per vendor), scale); unmet needs are
                      skips with the fix
    drivers.py        guest drivers stepped pass by pass (TouchGuest, NestedDirtyGuest), nested
                      programs run in one go (nested_guest, StageLog)
    host_state.py     host changes made only inside the bed, always restored
    memcg.py          the test process in a memory-limited cgroup v2 group (bed only)
    sptes.py          pages_4k/2m/1g counts and deltas
    test_*.py         the tests; known_issues.toml: defects of particular kernels
"""
