"""The cffi layouts must agree with what gcc computes from <linux/kvm.h> on its own."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from kvmpy.abi import ffi, lib

FIELDS = {
    "struct kvm_regs": ["rax", "rsp", "r15", "rip", "rflags"],
    "struct kvm_sregs": ["cs", "tr", "gdt", "idt", "cr0", "cr3", "cr4", "efer", "apic_base", "interrupt_bitmap"],
    "struct kvm_segment": ["base", "limit", "selector", "type", "l", "g", "unusable"],
    "struct kvm_run": ["immediate_exit", "exit_reason", "cr8", "io", "mmio", "internal", "system_event",
                       "kvm_valid_regs"],
    "struct kvm_userspace_memory_region": ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"],
    "struct kvm_dirty_log": ["slot", "dirty_bitmap"],
    "struct kvm_clear_dirty_log": ["slot", "num_pages", "first_page", "dirty_bitmap"],
    "struct kvm_dirty_gfn": ["flags", "slot", "offset"],
    "struct kvm_stats_header": ["flags", "name_size", "num_desc", "id_offset", "desc_offset", "data_offset"],
    "struct kvm_stats_desc": ["flags", "exponent", "size", "offset", "bucket_size", "name"],
    "struct kvm_enable_cap": ["cap", "flags", "args", "pad"],
    "struct kvm_cpuid_entry2": ["function", "index", "flags", "eax", "edx"],
    "struct kvm_msr_entry": ["index", "data"],
}
IOCTLS = ["KVM_RUN", "KVM_GET_DIRTY_LOG", "KVM_CLEAR_DIRTY_LOG", "KVM_SET_USER_MEMORY_REGION",
          "KVM_GET_STATS_FD", "KVM_RESET_DIRTY_RINGS", "KVM_SET_SREGS", "KVM_SET_CPUID2", "KVM_ENABLE_CAP"]


def _compiler_facts(tmp_path) -> dict[str, int]:
    """Sizes, offsets and ioctl numbers as gcc alone computes them."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (apt-get install gcc)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/kvm.h>', 'int main(void) {']
    for st, fields in FIELDS.items():
        lines.append(f'printf("sizeof {st}=%zu\\n", sizeof({st}));')
        for f in fields:
            lines.append(f'printf("{st}.{f}=%zu\\n", offsetof({st}, {f}));')
    for name in IOCTLS:
        lines.append(f'printf("{name}=%lu\\n", (unsigned long){name});')
    lines.append("return 0; }")
    src = tmp_path / "facts.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "facts"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split("=") for line in out.splitlines())}


def test_layouts_match_compiler(tmp_path):
    facts = _compiler_facts(tmp_path)
    for st, fields in FIELDS.items():
        if st != "struct kvm_stats_desc":  # flexible array: sizeof differs only by padding rules
            assert ffi.sizeof(st) == facts[f"sizeof {st}"], st
        for f in fields:
            assert ffi.offsetof(st, f) == facts[f"{st}.{f}"], f"{st}.{f}"
    for name in IOCTLS:
        assert getattr(lib, name) == facts[name], name


def test_well_known_values():
    # Values fixed by the ABI: a wrong build would break these.
    assert lib.KVM_API_VERSION == 12
    assert lib.KVM_RUN == 0xAE80
    assert lib.KVM_EXIT_IO == 2 and lib.KVM_EXIT_HLT == 5
    assert lib.KVM_CAP_DIRTY_LOG_RING == 192
    assert lib.KVM_CAP_VM_TYPES == 235  # a fallback on older headers
    assert ffi.sizeof("struct kvm_dirty_gfn") == 16
