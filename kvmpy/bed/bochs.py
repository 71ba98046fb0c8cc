"""The Bochs backend: the bed on an emulated Intel CPU with VMX and EPT.

QEMU's TCG has no VMX, so the Intel half of KVM (kvm_intel, nested VMX, the
nested MMU built from EPT tables) can only be exercised here.  Bochs 2.7's
``corei7_skylake_x`` model offers VMX with EPT, and a Debian kernel loads
``kvm_intel nested=1 ept=1`` on it.  It is slow (one emulated CPU, about a
minute to boot), so one boot should run a whole batch of tests.

How a run works:

* Bochs has no virtio: the host's ``/`` cannot be shared.  The command's
  files are carried in instead (:mod:`kvmpy.bed.carry`): this Python, the
  packages kvmpy imports, the kvmpy checkout and the working directory, all
  at their host paths, packed into the initramfs (``payload="initramfs"``,
  the default and the faster) or onto an ISO 9660 disc on the second ATA
  channel (``payload="disc"``).
* Boot medium: an isolinux ISO holding the kernel and the initramfs (Bochs
  cannot load a kernel directly).
* Bochs 2.7 is built with its debugger: it only runs when given ``-rc FILE``
  holding ``c``; its ``term`` display needs a pseudo-terminal, which
  ``script`` provides.  The serial port goes to a file that is followed for
  the console, and the results come back through it as a base64 tarball
  between markers (no disk image to mount on the host); followed results
  files come line by line while the job runs (:mod:`kvmpy.bed.console_files`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from kvmpy.bed import carry
from kvmpy.bed.backend import Backend, boot_dir, kill_sessions, wrapped_sessions
from kvmpy.bed.console_files import BEGIN_KIND, END_KIND, extract_files, followed_files, followers_script
from kvmpy.bed.initramfs import KVM_MODULES, build_initramfs, busybox
from kvmpy.bed.job import job_script
from kvmpy.bed.kernel import Kernel, cache_dir
from kvmpy.bed.machine import ConsoleLog, boot_failure, exit_on_sigterm, kill_machine, settle, start_machine
from kvmpy.bed.media import append_archive, make_iso, write_cpio
from kvmpy.bed.protocol import INSIDE_RESULTS, INSIDE_SHARE, BedError
from kvmpy.bed.request import BedFacts, BedRequest, BedResult, kernel_cmdline, megabytes, parse_console
from kvmpy.stop import stop_signals_deferred

BOCHS = "bochs-bin"
BIOS_DIR = Path("/usr/share/bochs")
ROMIMAGE = BIOS_DIR / "BIOS-bochs-latest"
VGAROMIMAGE = BIOS_DIR / "VGABIOS-lgpl-latest"
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
#: Host tool -> the Debian package that provides it.
TOOLS = {
    BOCHS: "bochs bochsbios vgabios bochs-term",
    "xorriso": "xorriso",
    "script": "bsdutils",
    "cpio": "cpio",
}
#: The CPU model with VMX + EPT (Bochs calls it an i7-7800X).
CPU_MODEL = "corei7_skylake_x"
#: Emulated instructions per emulated second.  Only the guest's sense of
#: time depends on it (measured: 50M and 400M boot in the same host CPU time);
#: lower makes guest sleeps and BIOS delays cheaper.
IPS = 50_000_000
#: Bochs 2.7 refuses `megs` above this ("host_size ... out of range 1 to 2048");
#: larger requests (`selftest --bed` asks for 4G) get this much.
MAX_MEGS = 2048
#: Modules to read a payload disc from the second ATA channel.
DISC_MODULES = ("ata_piix", "sr_mod", "isofs")
PAYLOADS = ("initramfs", "disc")
POWEROFF_GRACE = 30.0         # after the exit marker the machine powers off; Bochs needs a moment
# Bochs with its debugger stops the machine at its prompt, printing "(cpu).[instruction count]"
# (its start-up break prints "(0) [...]"), on a triple fault or an emulator error.
DEBUGGER_STOP = re.compile(rb"^\((\d+)\)\.\[(\d+)\]", re.M)


def debugger_stop(pty_output: bytes) -> Optional[str]:
    """Why Bochs's debugger stopped the machine, from its pty output; None while it runs."""
    m = DEBUGGER_STOP.search(pty_output)
    if m is None:
        return None
    where = pty_output[m.start():].splitlines()[0].decode(errors="replace").strip()
    return (f"Bochs stopped the emulated machine at instruction {int(m.group(2))} and entered its debugger "
            f"(a triple fault of the bed's kernel, or an emulator error; reset_on_triple_fault=0): {where}")


#: The payload the shared init sources (it sets $status).  The command runs
#: chrooted into the carried root (the initramfs itself or the disc), which
#: gets the usual pseudo-filesystems; the results go back over the serial port.
PAYLOAD = r"""# Bochs payload (kvmpy.bed.bochs)
R=/
@FOLLOWERS@
run_job() {
    if [ -n "@DISC@" ]; then
        R=/mnt/root
        mkdir -p /mnt/disc $R
        i=0
        while [ ! -b /dev/sr1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
        mount -t iso9660 -o ro /dev/sr1 /mnt/disc || { say "error cannot mount the payload disc"; return 2; }
        # The disc is read-only: an overlay on a tmpfs makes the root writable.
        mount -t tmpfs tmpfs /mnt/rw && mkdir -p /mnt/rw/upper /mnt/rw/work &&
            mount -t overlay overlay -o lowerdir=/mnt/disc,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work $R ||
            { say "error cannot mount the overlay root"; return 2; }
        mount -t proc proc $R/proc && mount -t sysfs sysfs $R/sys && mount -t devtmpfs devtmpfs $R/dev ||
            { say "error cannot mount /proc /sys /dev"; return 2; }
    fi
    mount_cgroup2 $R
    # No tmpfs over /tmp: the root is RAM (or an overlay on RAM) already, and the
    # carried checkout may live under /tmp (CI clones there).
    mkdir -p $R/tmp $R/run $R/dev/pts $R/dev/shm
    chmod 1777 $R/tmp
    mount -t tmpfs tmpfs $R/dev/shm
    mount -t devpts devpts $R/dev/pts
    mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
    mkdir -p $R@RESULTS@
    cp /etc/kvmpy/job.sh $R@INSIDE@/job.sh
    mark_bed $R || return 2
    start_followers $R@RESULTS@
    timeout -s KILL @TIMEOUT@ chroot $R /bin/sh @INSIDE@/job.sh < /dev/null
    st=$?
    stop_followers
    dmesg > $R@INSIDE@/dmesg.txt 2>/dev/null
    dmesg -n 1  # keep kernel messages out of the block below
    say "@BEGIN_KIND@"
    (cd $R@INSIDE@ && tar -cz results dmesg.txt) | base64
    say "@END_KIND@"
    # The tty drains at the emulated baud rate; power off only once the
    # UART's transmit count stops moving, or the tail of the files is lost.
    a=; while :; do b=$(grep -o 'tx:[0-9]*' /proc/tty/driver/serial | head -n 1); [ "$a" = "$b" ] && break; a=$b; sleep 0.2; done
    return $st
}
run_job
status=$?
"""


def bochsrc(boot_iso: Path, serial: Path, log: Path, megs: int, disc: Optional[Path] = None,
            ips: int = IPS) -> str:
    """The Bochs configuration for one boot (``megs`` capped at what Bochs accepts)."""
    lines = [
        f"megs: {min(megs, MAX_MEGS)}",
        f"cpu: model={CPU_MODEL}, count=1, ips={ips}, reset_on_triple_fault=0",
        f"romimage: file={ROMIMAGE}",
        f"vgaromimage: file={VGAROMIMAGE}",
        # nogui is not compiled into Debian's Bochs; term needs a pty (script).
        "display_library: term",
        f"ata0-master: type=cdrom, path={boot_iso}, status=inserted",
    ]
    if disc is not None:
        lines.append(f"ata0-slave: type=cdrom, path={disc}, status=inserted")
    lines += [
        "boot: cdrom",
        f"com1: enabled=1, mode=file, dev={serial}",
        # Guest time follows emulated instructions, not the host's clock:
        # the same run behaves the same on a loaded host.
        "clock: sync=none, time0=local",
        f"log: {log}",
        "panic: action=fatal",
        "error: action=ignore",
        "info: action=ignore",
        "debug: action=ignore",
    ]
    return "\n".join(lines) + "\n"


def isolinux_cfg(append: List[str]) -> str:
    """isolinux.cfg booting /vmlinuz with /initrd.img at once."""
    return ("DEFAULT bed\nPROMPT 0\nTIMEOUT 0\nLABEL bed\n  KERNEL /vmlinuz\n"
            f"  INITRD /initrd.img\n  APPEND {' '.join(append)}\n")


#: Module parameters Bochs needs unless a request sets them.  Bochs 2.7 writes the full
#: guest-physical address of a write into the page-modification log (the SDM wants the page's,
#: bits 11:0 clear): KVM's vmx_flush_pml_buffer() then WARNs for every logged write that is not
#: page aligned (its dirty bit is still right).  Without PML KVM logs L1's writes by write
#: protection, as on AMD.
BOCHS_PARAMS = {"kvm_intel.pml": "0"}


def kernel_append(request: BedRequest) -> List[str]:
    """The kernel command line, its serial console at the speed Bochs's UART is set to."""
    request = dataclasses.replace(request, params={**BOCHS_PARAMS, **request.params})
    return kernel_cmdline(request, console="ttyS0,115200")


def carried_roots(request: BedRequest) -> List[Path]:
    """Source trees to carry: the kvmpy checkout, and the cwd unless inside it."""
    import kvmpy

    checkout = Path(kvmpy.__file__).resolve().parents[1]
    roots = [checkout]
    cwd = Path(request.cwd or os.getcwd()).resolve()
    if checkout not in (cwd, *cwd.parents) and cwd != Path("/"):
        roots.append(cwd)
    return roots


def carry_file(stage: carry.Stage, path: Path) -> None:
    """Copy host file ``path`` (a Job.carry entry) into ``stage``; BedError if it is not a file."""
    if not path.is_absolute() or not path.is_file():
        raise BedError(f"cannot carry {path} into the bed: not an absolute path to a file")
    stage.add_file(path)


class BochsBackend(Backend):
    """Boot the bed in Bochs (emulated Intel CPU with VMX + EPT)."""

    name = "bochs"
    # A boot takes 60-100 s before the command starts (more with --jobs rows sharing the CPUs),
    # and the files block (results.json, JUnit, status) then drains over the emulated serial line.
    headroom = 240.0
    vendor = "intel"

    def __init__(self, kernel: Kernel, payload: str = "initramfs", bochs: str = BOCHS,
                 ips: int = IPS) -> None:
        if payload not in PAYLOADS:
            raise BedError(f"Bochs payload {payload!r}: choose one of {', '.join(PAYLOADS)}")
        super().__init__(kernel)
        self.payload = payload
        self.bochs = bochs
        self.ips = ips
        self.tools = dict(TOOLS)
        if bochs != BOCHS:
            self.tools[bochs] = self.tools.pop(BOCHS)
        #: Sizes and times of the last run's preparation (for measurements).
        self.last_prep: Dict[str, float] = {}

    def machine_facts(self) -> BedFacts:
        facts = super().machine_facts()
        facts.cpu = CPU_MODEL
        return facts

    def check(self) -> None:
        for tool, package in self.tools.items():
            if not shutil.which(tool):
                raise BedError(f"{tool} not found: apt-get install --no-install-recommends {package}")
        for path, package in ((ROMIMAGE, "bochsbios"), (VGAROMIMAGE, "vgabios"),
                              (ISOLINUX_BIN, "isolinux"), (LDLINUX_C32, "syslinux-common")):
            if not path.exists():
                raise BedError(f"{path} not found: apt-get install --no-install-recommends {package}")
        busybox()

    # -- preparation -----------------------------------------------------

    def prepare(self, request: BedRequest, tmp: Path) -> Tuple[Path, Optional[Path], List[str]]:
        """Build the boot ISO (and payload disc); returns (boot iso, disc, append)."""
        t0 = time.monotonic()
        stage_dir = tmp / "stage"
        stage = carry.Stage(stage_dir)
        for root in carried_roots(request):
            carry.stage_tree(stage, root)
        for path in request.carry:
            carry_file(stage, Path(path))
        carry.stage_guests(stage)
        cwd = Path(request.cwd or os.getcwd()).resolve()
        stage.inside(cwd).mkdir(parents=True, exist_ok=True)
        stage.inside(Path(INSIDE_SHARE)).mkdir(parents=True, exist_ok=True)
        for d in ("proc", "sys", "dev", "tmp", "run", "bin", "usr/bin", "lib64"):
            (stage_dir / d).mkdir(parents=True, exist_ok=True)
        python = carry.python_stage(cache_dir() / "bochs", log=lambda m: None)
        self.last_prep["stage_s"] = time.monotonic() - t0

        disc = self.payload == "disc"
        job = job_script(request)
        payload = (PAYLOAD.replace("@DISC@", "1" if disc else "")
                   .replace("@RESULTS@", INSIDE_RESULTS).replace("@INSIDE@", INSIDE_SHARE)
                   .replace("@TIMEOUT@", str(self.inner_timeout(request.timeout)))
                   .replace("@FOLLOWERS@", followers_script(request.follow))
                   .replace("@BEGIN_KIND@", BEGIN_KIND).replace("@END_KIND@", END_KIND))
        files = {"etc/kvmpy/job.sh": (job.encode(), 0o755)}
        modules = KVM_MODULES + (DISC_MODULES + ("overlay",) if disc else ())
        initrd = build_initramfs(self.kernel, tmp / "initrd.img", payload, modules, files,
                                 compress=True)
        # The carried root needs the busybox tools at /bin and /usr/bin/env
        # for scripts (inside the initramfs the init installs them itself).
        if disc:
            shutil.copy2(busybox(), stage_dir / "bin" / "busybox")
            applets = subprocess.run([str(busybox()), "--list"], capture_output=True, text=True,
                                     timeout=30).stdout.split()
            for applet in applets:
                if applet != "busybox":
                    os.symlink("busybox", stage_dir / "bin" / applet)
        os.symlink("/bin/busybox", stage_dir / "usr/bin/env")
        t1 = time.monotonic()
        disc_iso = None
        if disc:
            disc_iso = make_iso(tmp / "payload.iso", [("/", python), ("/", stage_dir)], boot=False)
            self.last_prep["payload_bytes"] = disc_iso.stat().st_size
        else:
            # The Python archive only changes with the Python stage: cache it.
            python_cpio = python.with_name(python.name + ".cpio.gz")
            if not python_cpio.exists():
                write_cpio(python_cpio, python)
            append_archive(initrd, python_cpio)
            append_archive(initrd, write_cpio(tmp / "stage.cpio.gz", stage_dir))
        self.last_prep["initrd_bytes"] = initrd.stat().st_size
        iso_dir = tmp / "iso"
        (iso_dir / "isolinux").mkdir(parents=True)
        shutil.copy2(ISOLINUX_BIN, iso_dir / "isolinux")
        shutil.copy2(LDLINUX_C32, iso_dir / "isolinux")
        append = kernel_append(request)
        (iso_dir / "isolinux" / "isolinux.cfg").write_text(isolinux_cfg(append))
        boot_iso = make_iso(tmp / "boot.iso", [("/isolinux", iso_dir / "isolinux"),
                                               ("/vmlinuz", self.kernel.image),
                                               ("/initrd.img", initrd)], boot=True)
        self.last_prep["boot_bytes"] = boot_iso.stat().st_size
        self.last_prep["pack_s"] = time.monotonic() - t1
        self.last_prep["prepare_s"] = time.monotonic() - t0
        return boot_iso, disc_iso, append

    # -- running -----------------------------------------------------------

    def run(self, request: BedRequest) -> BedResult:
        self.check()
        start = time.monotonic()
        if "PYTHONPATH" not in request.env and "PYTHONPATH" not in os.environ:
            # The checkout is carried in; make `import kvmpy` find it from any cwd.
            request = dataclasses.replace(
                request, env={**request.env, "PYTHONPATH": str(carried_roots(request)[0])})
        with exit_on_sigterm(), boot_dir("kvmpy-bochs-") as tmp:
            boot_iso, disc_iso, _ = self.prepare(request, tmp)
            serial = tmp / "serial.out"
            serial.touch()
            rc = tmp / "bochsrc"
            rc.write_text(bochsrc(boot_iso, serial, tmp / "bochs.log", megabytes(request.mem),
                                  disc_iso, self.ips))
            (tmp / "debugger.rc").write_text("c\n")
            argv = ["script", "-q", "-e", "-c",
                    f"{shlex.quote(self.bochs)} -q -f {rc} -rc {tmp / 'debugger.rc'}", "/dev/null"]
            console, followed, boot, timed_out, pid, stopped = _run_machine(argv, serial, request, start, tmp)
            # A configuration error panics before bochs.log is open; then only the pty saw it.
            bochs_log = "".join(p.read_text(errors="replace") for p in (tmp / "bochs.log", tmp / "bochs.out")
                                if p.exists())
        result = parse_console(console)
        result.files, result.kernel_log, result.dropped = extract_files(console)
        if not result.files:    # none came back (no files block: a stop, or the timeout): what was followed
            result.files, dropped = followed_files(followed, request.follow)
            result.dropped += dropped

        def why_no_status() -> str:
            if stopped:
                return f"{stopped}; {boot_failure(result)}"
            panic = [line for line in bochs_log.splitlines() if "PANIC" in line and "power off" not in line]
            return panic[-1].strip() if panic else boot_failure(result)

        return settle(result, request, self.machine_facts(), start, boot, timed_out, pid, why_no_status)


def _run_machine(argv: List[str], serial: Path, request: BedRequest, start: float, cwd: Path):
    """Run Bochs under ``script``, follow the serial file, kill on timeout.

    Returns (console text, followed file lines, seconds to 'ready' or None, timed_out, pid,
    why Bochs stopped or None).
    """
    pty_out, pty_seen, stopped = cwd / "bochs.out", 0, None
    with open(pty_out, "wb") as out:
        # script dies with us; Bochs gets SIGHUP when its pty closes
        proc = start_machine(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    # The timeout counts from the emulator's start, not from staging and xorriso (prepare): the
    # command's own timeout inside is sized from there (Backend.headroom).
    deadline = time.monotonic() + request.timeout
    # The base64 block of result files is not console output worth echoing.
    log = ConsoleLog(request, start, hide=(BEGIN_KIND, END_KIND))
    timed_out = False
    try:
        with open(serial, "rb") as f:
            while True:
                data = f.read(65536)
                if data:
                    log.feed(data)
                    continue
                if proc.poll() is not None:
                    break
                now = time.monotonic()
                if log.exit_seen_at is not None and now > log.exit_seen_at + POWEROFF_GRACE:
                    break
                if now >= deadline:
                    timed_out = log.exit_seen_at is None
                    break
                if log.exit_seen_at is None and pty_out.stat().st_size != pty_seen:
                    pty_seen = pty_out.stat().st_size
                    if stopped := debugger_stop(pty_out.read_bytes()):
                        break
                time.sleep(0.1)
            log.feed(f.read())
    finally:
        # ``script`` setsid()s its command: Bochs is in a session of its own, which killing
        # script's process group does not reach (and a Bochs that ignores SIGHUP outlives it).
        with stop_signals_deferred():   # a second stop signal must not cut the kill short
            sessions = wrapped_sessions(proc.pid, cwd)
            try:
                kill_machine(proc)
            finally:
                kill_sessions(sessions | wrapped_sessions(proc.pid, cwd))
    return log.text(), log.followed, log.boot, timed_out, proc.pid, stopped
