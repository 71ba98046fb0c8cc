"""Fakes shared by the bed's unit tests: module trees, bzImage headers, a kernel, busybox sh."""

import lzma
import os
import shutil
import subprocess

import pytest

from kvmpy.bed import initramfs, kernel

MODULES_DEP = """\
kernel/arch/x86/kvm/kvm.ko.xz: kernel/virt/lib/irqbypass.ko.xz
kernel/arch/x86/kvm/kvm-amd.ko.xz: kernel/arch/x86/kvm/kvm.ko.xz kernel/drivers/crypto/ccp/ccp.ko.xz kernel/virt/lib/irqbypass.ko.xz
kernel/arch/x86/kvm/kvm-intel.ko.xz: kernel/arch/x86/kvm/kvm.ko.xz kernel/virt/lib/irqbypass.ko.xz
kernel/virt/lib/irqbypass.ko.xz:
kernel/drivers/crypto/ccp/ccp.ko.xz:
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz
kernel/fs/netfs/netfs.ko.xz:
"""
BUILTIN = "kernel/drivers/virtio/virtio_pci.ko\n"


def bzimage(path, release=None):
    """A file with an x86 boot header ("HdrS") naming ``release`` (or none)."""
    image = bytearray(0x4000)
    image[0x202:0x206] = b"HdrS"
    if release:
        image[0x20E:0x210] = (0x1000).to_bytes(2, "little")
        image[0x1200:0x1200 + 60] = f"{release} (me@box) #1 SMP\0".encode().ljust(60, b"\0")
    path.write_bytes(bytes(image))
    return path


def module_tree(mods, vermagic, modules_dep=MODULES_DEP, builtin=""):
    """A lib/modules/<release> tree whose modules were built for ``vermagic``."""
    mods.mkdir(parents=True, exist_ok=True)
    for rel in kernel.parse_modules_dep(modules_dep):
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(lzma.compress(f"\x7fELF\0vermagic={vermagic} SMP mod_unload\0".encode()))
    (mods / "modules.dep").write_text(modules_dep)
    (mods / "modules.builtin").write_text(builtin)
    return mods


def busybox_sh():
    for candidate in ("/bin/busybox", shutil.which("busybox") or ""):
        if candidate and os.path.exists(candidate):
            return [candidate, "sh"]
    pytest.skip("busybox not installed (apt-get install busybox-static)")


def fake_kernel(tmp_path) -> kernel.Kernel:
    mods = tmp_path / "lib" / "modules" / "6.99"
    for rel in kernel.parse_modules_dep(MODULES_DEP):
        path = mods / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(f"ELF {rel}".encode()))
    (mods / "modules.dep").write_text(MODULES_DEP)
    (mods / "modules.builtin").write_text(BUILTIN)
    return kernel.Kernel("6.99", tmp_path / "vmlinuz", mods, "test", tmp_path / "cache")


def run_init_load(tmp_path, cmdline, cpu_flags, modules, each_arg=False):
    """Source the real init and call load_modules (in ``tmp_path``) with insmod replaced by a logger.

    Returns a line per insmod: its arguments joined by spaces, or with ``each_arg``
    each one in brackets (to see where one ends).
    """
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "cpuinfo").write_text(f"flags\t\t: fpu {cpu_flags} sse\n")
    (tmp_path / "modules").write_text("".join(m + "\n" for m in modules))
    log = tmp_path / "insmod.log"
    fake = tmp_path / "insmod"
    logger = 'for a; do printf "[%s]" "$a"; done; echo' if each_arg else 'echo "$*"'
    fake.write_text(f"#!/bin/sh\n{{ {logger}; }} >> {log}\n")
    fake.chmod(0o755)
    run_init_function(tmp_path, "load_modules", KVMPY_CMDLINE=str(tmp_path / "cmdline"),
                      KVMPY_CPUINFO=str(tmp_path / "cpuinfo"), KVMPY_MODLIST=str(tmp_path / "modules"),
                      KVMPY_MODDIR="/m", KVMPY_INSMOD=str(fake))
    return log.read_text().splitlines() if log.exists() else []


def run_init_function(tmp_path, calls: str, **env) -> str:
    """Source the real init (written to ``tmp_path``) and run ``calls`` with ``env`` added; its stdout."""
    (tmp_path / "init").write_text(initramfs.INIT_SCRIPT)
    return subprocess.run([*busybox_sh(), "-c", f". {tmp_path / 'init'}; {calls}"],
                          env=dict(os.environ, KVMPY_INIT_TEST="1", **env), cwd=tmp_path,
                          capture_output=True, text=True, check=True, timeout=30).stdout
