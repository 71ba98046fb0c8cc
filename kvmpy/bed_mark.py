"""Am I inside ``kvmpy bed``? The one answer, from facts only the bed's boot establishes.

Code that may change the host (hugetlb pools, KVM module parameters) does so only
inside the bed, a throwaway machine. An environment variable would not do: anyone
can set one on a real host. The bed leaves two marks instead:

* its kernel is booted with :data:`CMDLINE_WORD` on the command line (the host
  side adds it, :func:`kvmpy.bed.request.kernel_cmdline`);
* its init (PID 1, :mod:`kvmpy.bed.initramfs`), before it starts the command,
  writes this boot's id (``/proc/sys/kernel/random/boot_id``, random per boot)
  to :data:`MARK_FILE` on a tmpfs it then mounts read-only.

:func:`in_bed` wants both, the mark's boot id being the running kernel's: a real
host has neither, and a mark left from another boot does not match.
"""
from __future__ import annotations

import os

#: The kernel command-line word of a bed boot (a dotted word: the kernel keeps it
#: out of init's environment, and no module is named kvmpy).
CMDLINE_WORD = "kvmpy.bed=1"
#: The read-only tmpfs the bed's init mounts in the command's root, and the file in it.
MARK_DIR = "/run/kvmpy-bed"
MARK_FILE = MARK_DIR + "/boot_id"
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _read(root: str, path: str) -> str | None:
    try:
        with open(os.path.join(root, path.lstrip("/"))) as f:
            return f.read(4096).strip()
    except (OSError, UnicodeDecodeError):
        return None


def in_bed(root: str = "/") -> bool:
    """True only inside a ``kvmpy bed`` boot (``root``: a fake / for tests)."""
    cmdline = _read(root, "/proc/cmdline")
    if cmdline is None or CMDLINE_WORD not in cmdline.split():
        return False
    mark, boot_id = _read(root, MARK_FILE), _read(root, BOOT_ID)
    return bool(mark) and mark == boot_id
