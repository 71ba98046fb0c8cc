"""kvmpy/guest/stages.py agrees with guests/lib/stages.h, its source (no /dev/kvm)."""
from __future__ import annotations

import re
from pathlib import Path

from kvmpy.guest import stages

HEADER = Path(stages.__file__).resolve().parents[2] / "guests" / "lib" / "stages.h"


def header_defines() -> dict[str, int]:
    text = HEADER.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("#define") and not ln.split()[1].endswith("_H")]
    found = dict(re.findall(r"^#define\s+([A-Z][A-Z0-9_]*)\s+(0x[0-9a-fA-F]+|\d+)[uUlL]*(?:\s|$)", text, re.M))
    # Every define must be a plain literal: build_guest.sh copies nothing else.
    assert len(found) == len(lines), [ln for ln in lines if ln.split()[1] not in found]
    return {name: int(value, 0) for name, value in found.items()}


def test_every_number_of_the_header_is_mirrored():
    want = header_defines()
    have = {n: v for n, v in vars(stages).items() if n.isupper()}
    assert have == want


def test_guests_use_the_header_not_literals():
    """The programs whose stages the host reads say GUEST_SYNC(NAME, ...), never a bare number."""
    guests = HEADER.parents[1]
    for program in ("dirty_writer", "mmu_touch", "svm_l2_smoke", "vmx_probe", "unsync"):
        src = (guests / f"{program}.c").read_text()
        bare = re.findall(r"GUEST_SYNC\(\s*\d", src)
        assert not bare, f"{program}.c: GUEST_SYNC with a literal stage"
        assert "GUEST_SYNC(" in src
