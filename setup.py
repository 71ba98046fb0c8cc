"""setuptools glue that pyproject.toml cannot express.

- cffi_modules: builds the out-of-line API-mode extension kvmpy._kvm_abi.
- ext_modules: kvmpy._stats_snapshot, Stats.snapshot() with the C API (cffi cannot
  make Python objects; see the file's comment).
- build_py: also runs build_guest.sh so the wheel ships prebuilt guest ELFs in
  kvmpy/_guests/, found by kvmpy.guest.programs when there is no source tree.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithGuests(build_py):
    """build_py that also compiles guests/*.c into <build_lib>/kvmpy/_guests/*.elf."""

    def run(self) -> None:
        super().run()
        script = ROOT / "build_guest.sh"
        if self.dry_run or not script.is_file():
            return
        dest = Path(self.build_lib) / "kvmpy" / "_guests"
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(["bash", str(script), tmp], cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"building the guest programs failed:\n{r.stderr.strip() or r.stdout.strip()}")
            for elf in Path(tmp).glob("*.elf"):
                shutil.copy2(elf, dest / elf.name)


setup(
    cmdclass={"build_py": BuildPyWithGuests},
    cffi_modules=["kvmpy/_ffi_build.py:ffibuilder"],
    ext_modules=[Extension("kvmpy._stats_snapshot", ["kvmpy/_stats_snapshot.c"],
                           extra_compile_args=["-O2", "-std=gnu11"])],
)
