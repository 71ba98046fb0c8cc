"""The QEMU backend: boot the bed in qemu-system-x86_64 (TCG by default).

The guest sees the host's ``/`` over 9p (read-only on the host's side, made
writable inside by an overlay on a tmpfs) and chroots into it, so the command
runs at the host's paths with the host's own Python and kvmpy; a second,
writable 9p share carries the job script in and the results (JUnit XML, the
guest kernel log) out.  TCG emulates an AMD-style CPU with SVM + NPT, so
nested KVM (kvm_amd nested=1) works inside even where the host has none.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time
from pathlib import Path
from typing import List

from kvmpy.bed.backend import Backend, boot_dir
from kvmpy.bed.initramfs import KVM_MODULES, SHARE_MODULES, build_initramfs, busybox
from kvmpy.bed.job import job_script
from kvmpy.bed.kernel import Kernel
from kvmpy.bed.machine import ConsoleLog, boot_failure, exit_on_sigterm, kill_machine, settle, start_machine
from kvmpy.bed.protocol import INSIDE_SHARE, BedError
from kvmpy.bed.request import BedFacts, BedRequest, BedResult, kernel_cmdline, megabytes, parse_console
from kvmpy.bed.results import files_from_dir, read_log

QEMU = "qemu-system-x86_64"
HOST_ROOT_TAG = "kvmpyroot"
SHARE_TAG = "kvmpyshare"
#: The CPU TCG emulates: everything it can (SVM, NPT) but 5-level paging,
#: which is slow under TCG and not what we test.
TCG_CPU = "max,la57=off"
# After the exit marker the machine powers off at once; allow this much.
POWEROFF_GRACE = 15.0

PAYLOAD = r"""# QEMU payload (kvmpy.bed.qemu): the host's / over 9p, made writable by an
# overlay on a tmpfs (writes stay in the bed's RAM), the job and its results in
# a writable 9p share, the command chrooted into that root.
R=/mnt/root
O=trans=virtio,version=9p2000.L,msize=262144
run_job() {
    mkdir -p /mnt/host /mnt/rw $R
    # cache=loose: the host's / does not change under the bed, and it makes
    # Python's imports several times faster than uncached 9p.
    mount -t 9p -o $O,ro,cache=loose @ROOT@ /mnt/host || { say "error cannot mount the host's / over 9p"; return 2; }
    mount -t tmpfs tmpfs /mnt/rw && mkdir /mnt/rw/upper /mnt/rw/work
    if ! mount -t overlay overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work $R; then
        say "warning no overlayfs: the host's / is read-only inside and /tmp is empty"
        mount --move /mnt/host $R && mount -t tmpfs tmpfs $R/tmp || { say "error cannot mount /tmp"; return 2; }
    fi
    mount -t proc proc $R/proc && mount -t sysfs sysfs $R/sys &&
        mount -t devtmpfs devtmpfs $R/dev && mount -t tmpfs tmpfs $R/run ||
        { say "error cannot mount /proc /sys /dev /run"; return 2; }
    mount_cgroup2 $R
    mkdir -p $R/dev/pts $R/dev/shm $R@INSIDE@
    mount -t devpts devpts $R/dev/pts
    mount -t tmpfs tmpfs $R/dev/shm
    mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
    mount -t 9p -o $O,cache=none @SHARE@ $R@INSIDE@ || { say "error cannot mount the job share"; return 2; }
    mark_bed $R || return 2
    timeout -s KILL "$(cat $R@INSIDE@/timeout)" chroot $R /bin/sh @INSIDE@/job.sh < /dev/null
    st=$?
    dmesg > $R@INSIDE@/dmesg.txt 2>/dev/null
    return $st
}
run_job
status=$?
""".replace("@ROOT@", HOST_ROOT_TAG).replace("@SHARE@", SHARE_TAG).replace("@INSIDE@", INSIDE_SHARE)

class QemuBackend(Backend):
    """Boot the bed with qemu-system-x86_64."""

    name = "qemu"
    # TCG boots in about 30 s alone, much slower with --jobs rows sharing the CPUs; the results
    # come back through the shared directory, then the machine powers off (POWEROFF_GRACE).
    headroom = 90.0
    vendor = "amd"

    def __init__(self, kernel: Kernel, accel: str = "tcg", qemu: str = QEMU,
                 tcg_thread: str = "single") -> None:
        if accel not in ("tcg", "kvm"):
            raise BedError(f"--accel {accel}: choose tcg or kvm")
        if tcg_thread not in ("single", "multi"):
            raise BedError(f"TCG threading {tcg_thread!r}: choose single or multi")
        super().__init__(kernel)
        self.tcg_thread = tcg_thread
        self.accel = accel
        self.qemu = qemu
        self.vendor = self.cpu_vendor(accel)

    @classmethod
    def cpu_vendor(cls, accel: str = "tcg") -> str:
        # -cpu host: the guest is whatever the host is.
        return host_vendor() if accel == "kvm" else cls.vendor

    def machine_facts(self) -> BedFacts:
        facts = super().machine_facts()
        facts.accel = self.accel
        facts.cpu = "host" if self.accel == "kvm" else TCG_CPU
        return facts

    def check(self) -> None:
        if not shutil.which(self.qemu):
            raise BedError(
                f"{self.qemu} not found: apt-get install --no-install-recommends qemu-system-x86"
            )
        busybox()
        if self.accel == "kvm":
            if not os.access("/dev/kvm", os.R_OK | os.W_OK):
                raise BedError("--accel kvm needs a usable /dev/kvm on the host; use --accel tcg")
            if not host_has_nested():
                raise BedError("--accel kvm: the host CPU shows neither svm nor vmx, so KVM "
                               "inside the bed would have nothing to run on; use --accel tcg")

    def command_line(self, initrd: Path, share: Path, request: BedRequest) -> List[str]:
        """The full QEMU argv for one boot."""
        megabytes(request.mem)  # validate
        if self.accel == "kvm":
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            # thread=single: with multi-threaded TCG the bed kernel dies now and
            # then in "Oops: int3" while patching its own code (static keys;
            # text_poke_bp) as another vCPU runs it.
            accel = ["-accel", f"tcg,thread={self.tcg_thread}", "-cpu", TCG_CPU]
        append = kernel_cmdline(request)
        return [
            self.qemu, *accel, "-smp", str(request.smp), "-m", request.mem,
            "-kernel", str(self.kernel.image), "-initrd", str(initrd),
            "-append", " ".join(append),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-virtfs", f"local,path=/,mount_tag={HOST_ROOT_TAG},security_model=none,"
                       "readonly=on,multidevs=remap",
            "-virtfs", f"local,path={share},mount_tag={SHARE_TAG},security_model=none,"
                       "multidevs=remap",
        ]

    def run(self, request: BedRequest) -> BedResult:
        self.check()
        start = time.monotonic()
        with exit_on_sigterm(), boot_dir("kvmpy-bed-") as tmp:
            share = Path(tmp) / "share"
            (share / "results").mkdir(parents=True)
            (share / "job.sh").write_text(job_script(request))
            (share / "timeout").write_text(f"{self.inner_timeout(request.timeout)}\n")
            initrd = build_initramfs(self.kernel, Path(tmp) / "initrd.cpio", PAYLOAD,
                                     SHARE_MODULES + KVM_MODULES)
            argv = self.command_line(initrd, share, request)
            console, boot, timed_out, pid = _run_machine(argv, request, start)
            result = parse_console(console)
            result.files, result.dropped = files_from_dir(share / "results")
            result.kernel_log = read_log(share / "dmesg.txt", result.dropped)
        return settle(result, request, self.machine_facts(), start, boot, timed_out, pid,
                      lambda: boot_failure(result))


def host_vendor() -> str:
    """"amd" or "intel", from the host's /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(4096)
    except OSError:
        return "amd"
    return "intel" if "GenuineIntel" in info else "amd"


def host_has_nested() -> bool:
    """Whether the host CPU advertises svm or vmx (what -cpu host passes on)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "svm" in flags or "vmx" in flags
    except OSError:
        pass
    return False


def _run_machine(argv: List[str], request: BedRequest, start: float):
    """Run the machine, collect its console; kill its process group on timeout.

    Returns (console text, seconds to the 'ready' marker or None, timed_out,
    the machine's pid).
    """
    proc = start_machine(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # The timeout counts from the emulator's start (not from building its initramfs): the
    # command's own timeout inside is sized from there (Backend.headroom).
    deadline = time.monotonic() + request.timeout
    log = ConsoleLog(request, start)
    timed_out = False
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            now = time.monotonic()
            limit = deadline if log.exit_seen_at is None else min(deadline, log.exit_seen_at + POWEROFF_GRACE)
            if now >= limit:
                timed_out = log.exit_seen_at is None
                break
            if not sel.select(timeout=min(1.0, limit - now)):
                continue
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break
            log.feed(data)
    finally:
        try:
            sel.close()
        finally:
            kill_machine(proc)
    return log.text(), log.boot, timed_out, proc.pid
