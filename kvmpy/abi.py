"""The compiled KVM ABI: cffi ``ffi``/``lib`` plus the ioctl call helpers.

Two ways to issue an ioctl, like the kernel selftests' ``vm_ioctl``/``__vm_ioctl``:
:func:`ioctl`/:func:`ioctl_int` raise :class:`IoctlError` naming the ioctl, the errno
and the object it was called on, so callers never look at a bare return code;
:func:`ioctl_unchecked` returns an :class:`IoctlResult` for tests that expect an errno.
"""
from __future__ import annotations

from typing import NamedTuple

try:
    from kvmpy._kvm_abi import ffi, lib  # type: ignore[import-not-found]
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "kvmpy's compiled KVM binding (kvmpy._kvm_abi) is missing: install kvmpy with "
        "`pip install .` (needs the Debian packages gcc, libffi-dev, python3-dev, linux-libc-dev), "
        "or build it in place with `python3 kvmpy/_ffi_build.py` from the source tree"
    ) from exc

from kvmpy.errors import IoctlError, RequirementError

__all__ = ["ffi", "lib", "IoctlResult", "ioctl", "ioctl_int", "ioctl_unchecked", "cap_name", "require_cap"]


class IoctlResult(NamedTuple):
    """What an unchecked ioctl returned: ``ret`` (< 0 on failure) and ``errno`` (0 on success)."""

    ret: int
    errno: int

    @property
    def ok(self) -> bool:
        return self.ret >= 0


def ioctl_unchecked(fd: int, name: str, arg=ffi.NULL) -> IoctlResult:
    """Issue ioctl ``name`` (a ``lib`` constant name) with a pointer argument; never raises."""
    ret = lib.kvmpy_ioctl_ptr(fd, getattr(lib, name), arg)
    return IoctlResult(ret, ffi.errno if ret < 0 else 0)


def ioctl(fd: int, name: str, arg=ffi.NULL, target: str = "", context: str = "") -> int:
    """Issue ioctl ``name`` with a pointer argument; IoctlError on failure."""
    res = ioctl_unchecked(fd, name, arg)
    if not res.ok:
        raise IoctlError(name, res.errno, target or f"fd {fd}", context)
    return res.ret


def ioctl_int(fd: int, name: str, arg: int = 0, target: str = "", context: str = "") -> int:
    """Issue ioctl ``name`` with an integer argument; IoctlError on failure."""
    ret = lib.kvmpy_ioctl_int(fd, getattr(lib, name), arg)
    if ret < 0:
        raise IoctlError(name, ffi.errno, target or f"fd {fd}", context)
    return ret


def cap_name(cap: int) -> str:
    """KVM_CAP_* name of ``cap`` (first match), or 'capability N'."""
    for n in dir(lib):
        if n.startswith("KVM_CAP_") and getattr(lib, n) == cap:
            return n
    return f"capability {cap}"


def require_cap(value: int, cap: int, why: str = "") -> int:
    """``value`` of a KVM_CHECK_EXTENSION, or RequirementError naming ``cap`` when it is 0."""
    if not value:
        raise RequirementError(f"KVM lacks {cap_name(cap)}" + (f" ({why})" if why else ""))
    return value
