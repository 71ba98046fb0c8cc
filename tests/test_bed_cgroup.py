"""The bed's init mounts cgroup v2 with the memory controller for child groups (mount_cgroup2)."""
from __future__ import annotations

from kvmpy.bed.protocol import MARKER

from bed_fakes import run_init_function


def _mount_cgroup2(tmp_path, mount_works: bool) -> tuple[str, str]:
    """Call the real init's mount_cgroup2 ROOT twice with a fake mount; (mount's arguments, output)."""
    root = tmp_path / "root"
    (root / "sys" / "fs" / "cgroup").mkdir(parents=True)
    log = tmp_path / "mount.log"
    fake = tmp_path / "mount"
    # A working mount makes the cgroup2 files appear, as the kernel would.
    action = 'touch "$4/cgroup.controllers" "$4/cgroup.subtree_control"' if mount_works else "exit 32"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n{action}\n')
    fake.chmod(0o755)
    out = run_init_function(tmp_path, f"mount_cgroup2 {root}; mount_cgroup2 {root}", KVMPY_MOUNT=str(fake))
    return (log.read_text() if log.exists() else ""), out


def test_init_mounts_cgroup2_once_with_the_memory_controller(tmp_path):
    mounts, out = _mount_cgroup2(tmp_path, mount_works=True)
    cgroup = tmp_path / "root" / "sys" / "fs" / "cgroup"
    assert mounts == f"-t cgroup2 cgroup2 {cgroup}\n"          # the second call sees it mounted
    assert (cgroup / "cgroup.subtree_control").read_text() == "+memory\n"
    assert MARKER not in out


def test_init_warns_when_cgroup2_cannot_be_mounted(tmp_path):
    _, out = _mount_cgroup2(tmp_path, mount_works=False)
    assert f"{MARKER} warning no cgroup v2 memory controller at {tmp_path}/root/sys/fs/cgroup" in out
