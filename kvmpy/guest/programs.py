"""Find built guest programs, building them from source when needed.

Lookup order for a program ``name``:
1. a source checkout (``guests/name.c`` next to ``build_guest.sh``): the ELF in
   $KVMPY_GUEST_BUILD_DIR or ``build/guests``, (re)built by build_guest.sh when
   missing or older than its sources;
2. the prebuilt ``kvmpy/_guests/name.elf`` that ``pip install`` ships.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from kvmpy.errors import KvmError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
SOURCE_ROOT = PACKAGE_DIR.parent
PREBUILT_DIR = PACKAGE_DIR / "_guests"


class GuestProgramError(KvmError):
    """A guest program that cannot be found or built."""


def source_root() -> Path | None:
    """The source checkout holding guests/ and build_guest.sh, or None in an installed package."""
    if (SOURCE_ROOT / "build_guest.sh").is_file() and (SOURCE_ROOT / "guests" / "lib").is_dir():
        return SOURCE_ROOT
    return None


def build_dir() -> Path:
    """Where build_guest.sh puts ELFs for this checkout."""
    d = os.environ.get("KVMPY_GUEST_BUILD_DIR")
    if d:
        return Path(d).resolve()
    return SOURCE_ROOT / "build" / "guests"


def _inputs(root: Path, name: str) -> list[Path]:
    lib = root / "guests" / "lib"
    return [root / "guests" / f"{name}.c", root / "build_guest.sh", *lib.iterdir()]


def _stale(elf: Path, inputs: list[Path]) -> bool:
    if not elf.exists():
        return True
    t = elf.stat().st_mtime
    return any(p.stat().st_mtime > t for p in inputs)


def build(names: list[str] | None = None, out: Path | None = None) -> None:
    """Run build_guest.sh (all programs, or ``names``) into ``out`` (default :func:`build_dir`)."""
    root = source_root()
    if root is None:
        raise GuestProgramError("no guest sources here (build_guest.sh / guests/ not found)")
    import subprocess               # only when a guest is (re)built: most runs find theirs built
    out = out or build_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Serialise concurrent builds (e.g. pytest-xdist workers) on one directory.
        with open(out / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            r = subprocess.run(["bash", str(root / "build_guest.sh"), str(out), *(names or [])],
                               cwd=root, capture_output=True, text=True)
    except OSError as e:
        raise GuestProgramError(f"cannot build guest programs into {out} (KVMPY_GUEST_BUILD_DIR or "
                                f"build/guests): {e.strerror or e}") from None
    if r.returncode != 0:
        raise GuestProgramError(f"build_guest.sh failed (exit {r.returncode}):\n{r.stderr.strip() or r.stdout.strip()}")


def find(name: str) -> Path:
    """Path of the ELF of guest program ``name``, building it first if needed."""
    root = source_root()
    if root is not None and (root / "guests" / f"{name}.c").is_file():
        elf = build_dir() / f"{name}.elf"
        if _stale(elf, _inputs(root, name)):
            build([name])
        return elf
    prebuilt = PREBUILT_DIR / f"{name}.elf"
    if prebuilt.is_file():
        return prebuilt
    raise GuestProgramError(f"no guest program {name!r}: looked for "
                            f"{(root or SOURCE_ROOT) / 'guests' / (name + '.c')} and {prebuilt}; "
                            f"available: {', '.join(available()) or 'none'}")


def available() -> list[str]:
    """Names of the guest programs that :func:`find` can provide."""
    names: set[str] = set()
    root = source_root()
    if root is not None:
        names.update(p.stem for p in (root / "guests").glob("*.c"))
    if PREBUILT_DIR.is_dir():
        names.update(p.stem for p in PREBUILT_DIR.glob("*.elf"))
    return sorted(names)
