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

from kvmpy.errors import IoctlError, KvmError, RequirementError

__all__ = ["ffi", "lib", "IoctlResult", "ioctl", "ioctl_int", "ioctl_unchecked", "cap_name", "require_cap",
           "new_struct", "check_u32"]


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
    """Issue ioctl ``name`` with an integer argument; IoctlError on failure, KvmError for an
    argument that is not an unsigned long."""
    try:
        ret = lib.kvmpy_ioctl_int(fd, getattr(lib, name), arg)
    except (OverflowError, TypeError):
        raise KvmError(f"{name} on {target or f'fd {fd}'}: argument {arg!r} is not an unsigned long"
                       + (f" [{context}]" if context else "")) from None
    if ret < 0:
        raise IoctlError(name, ffi.errno, target or f"fd {fd}", context)
    return ret


def new_struct(ctype: str, what: str, **fields):
    """A new zeroed ``ctype`` (a pointer type) with ``fields`` set; KvmError naming ``what``,
    the field and the value when one does not fit its C type (e.g. a negative slot)."""
    obj = ffi.new(ctype)
    for field, value in fields.items():
        try:
            setattr(obj, field, value)
        except (OverflowError, TypeError):
            raise KvmError(f"{what}: {field} = {value!r} does not fit {ctype[:-2]}.{field}") from None
    return obj


def check_u32(value: int, what: str) -> int:
    """``value`` if it is an int in [0, 2**32); KvmError naming ``what`` otherwise."""
    if not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise KvmError(f"{what} {value!r} is not a u32 (0 to {(1 << 32) - 1})")
    return value


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
