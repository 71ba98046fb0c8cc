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
        "or `pip install -e .` in the source tree"
    ) from exc

from kvmpy.errors import IoctlError, KvmError, RequirementError

__all__ = ["ffi", "lib", "IoctlResult", "ioctl", "ioctl_int", "ioctl_unchecked", "ioctl_arg_size", "cap_name",
           "require_cap", "new_struct", "check_ints", "check_unsigned"]


class IoctlResult(NamedTuple):
    """What an unchecked ioctl returned: ``ret`` (< 0 on failure) and ``errno`` (0 on success)."""

    ret: int
    errno: int

    @property
    def ok(self) -> bool:
        return self.ret >= 0


# The ioctl number's own record of its argument (asm-generic/ioctl.h, as on x86): the
# kernel copies _IOC_SIZE bytes to or from *arg when _IOC_DIR is not _IOC_NONE.
_IOC_SIZE_SHIFT, _IOC_SIZE_MASK, _IOC_DIR_SHIFT = 16, 0x3FFF, 30
# (request, pointer type) pairs already found to fit: the check costs one lookup after that.
_FITS: set[tuple[int, object]] = set()


def ioctl_arg_size(name: str) -> int:
    """Bytes ioctl ``name`` copies through its pointer argument (0 for an ``_IO`` ioctl)."""
    return _arg_size(_request(name))


def _arg_size(request: int) -> int:
    return (request >> _IOC_SIZE_SHIFT) & _IOC_SIZE_MASK if request >> _IOC_DIR_SHIFT else 0


def _check_arg(name: str, request: int, arg, target: str) -> None:
    """KvmError unless ``arg`` is one the kernel can copy _IOC_SIZE bytes through safely.

    Like the kernel selftests' kvm_do_ioctl() (sizeof(*arg) == _IOC_SIZE(cmd)), at run
    time: a pointer must point to exactly that many bytes, an array hold at least that
    many. A wrong struct would otherwise let KVM write past the allocation (a GET) or
    read a neighbour's bytes as the argument (a SET). NULL passes: the kernel answers
    EFAULT. Counts inside the argument (nmsrs, nent) and pointers it holds (a dirty
    bitmap) are the caller's: the typed methods (Vcpu.get_msrs, Vm.get_dirty_log) size them.
    """
    size = _arg_size(request)
    where = f"{name} on {target}"
    if not isinstance(arg, ffi.CData):
        raise KvmError(f"{where}: the argument must be a cffi pointer to the {size}-byte argument "
                       f"(e.g. ffi.new(...)), not {type(arg).__name__}")
    ctype = ffi.typeof(arg)
    if ctype.kind == "array":
        have = ffi.sizeof(arg)
        if have >= size:
            return
        raise KvmError(f"{where}: the kernel copies {size} bytes, the array {ctype.cname!r} holds {have}")
    if ctype.kind != "pointer":
        raise KvmError(f"{where}: the argument must be a pointer to the {size}-byte argument, "
                       f"not a {ctype.cname!r}")
    if arg == ffi.NULL:
        return
    try:
        have = ffi.sizeof(ctype.item)
    except (ffi.error, TypeError):      # void, an opaque struct, a function: no size
        have = None
    if have is None:
        raise KvmError(f"{where}: the kernel copies {size} bytes through the argument, and a "
                       f"{ctype.cname!r} has no size to check: cast it to a pointer to the argument's type")
    if have != size:
        raise KvmError(f"{where}: the kernel copies {size} bytes through the argument, and "
                       f"{ctype.cname!r} points to {have} (the wrong structure?)")
    _FITS.add((request, ctype))


def _request(name: str) -> int:
    try:
        return getattr(lib, name)
    except AttributeError:
        raise KvmError(f"no ioctl named {name!r} in <linux/kvm.h> as kvmpy was built") from None


def _ioctl_ptr(fd: int, name: str, arg, target: str) -> IoctlResult:
    request = _request(name)
    if request >> _IOC_DIR_SHIFT and arg is not ffi.NULL:
        try:
            fits = (request, ffi.typeof(arg)) in _FITS
        except TypeError:       # not a cdata: _check_arg says so
            fits = False
        if not fits:
            _check_arg(name, request, arg, target)
    ret = lib.kvmpy_ioctl_ptr(fd, request, arg)
    return IoctlResult(ret, ffi.errno if ret < 0 else 0)


def ioctl_unchecked(fd: int, name: str, arg=ffi.NULL) -> IoctlResult:
    """Issue ioctl ``name`` (a ``lib`` constant name) with a pointer argument; the kernel's
    answer is returned, never raised. An argument the kernel would copy past is refused
    (KvmError), as in :func:`ioctl`."""
    return _ioctl_ptr(fd, name, arg, f"fd {fd}")


def ioctl(fd: int, name: str, arg=ffi.NULL, target: str = "", context: str = "") -> int:
    """Issue ioctl ``name`` with a pointer argument; IoctlError on failure.

    ``arg`` must be NULL or point to the bytes the ioctl number says the kernel copies
    (``ioctl_arg_size``): KvmError otherwise, before the call.
    """
    target = target or f"fd {fd}"
    res = _ioctl_ptr(fd, name, arg, target)
    if not res.ok:
        raise _closed(name, target) if fd == -1 else IoctlError(name, res.errno, target, context)
    return res.ret


def ioctl_int(fd: int, name: str, arg: int = 0, target: str = "", context: str = "") -> int:
    """Issue ioctl ``name`` with an integer argument; IoctlError on failure, KvmError for an
    argument that is not an unsigned long or an ioctl that takes a pointer (the kernel
    would copy through the integer as an address)."""
    request = _request(name)
    target = target or f"fd {fd}"
    if request >> _IOC_DIR_SHIFT:
        raise KvmError(f"{name} on {target}: it copies {_arg_size(request)} bytes through "
                       f"a pointer; pass a cffi pointer to ioctl()")
    try:
        ret = lib.kvmpy_ioctl_int(fd, request, arg)
    except (OverflowError, TypeError):
        raise KvmError(f"{name} on {target}: argument {arg!r} is not an unsigned long"
                       + (f" [{context}]" if context else "")) from None
    if ret < 0:
        raise _closed(name, target) if fd == -1 else IoctlError(name, ffi.errno, target, context)
    return ret


def _closed(name: str, target: str) -> KvmError:
    # kvmpy's objects set their fd to -1 when closed: say so rather than "EBADF on fd -1".
    return KvmError(f"{name} on {target}: it is closed")


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


def is_int(value: object) -> bool:
    """An int that is not a bool: an address, size or count (``True`` as a GPA is a bug)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_ints(what: str, **values: object) -> None:
    """KvmError naming the first of ``values`` that is not an int (:func:`is_int`): a float GPA
    would otherwise fail deep inside, often in an error message's own ``:#x`` formatting."""
    for name, value in values.items():
        if not is_int(value):
            raise KvmError(f"{what}: {name} must be an int, not {value!r}")


def check_unsigned(value: object, bits: int, what: str, error: type[KvmError] = KvmError) -> int:
    """``value`` if it is an int in [0, 2**bits); ``error`` naming ``what`` otherwise (a value
    masked or packed into the field would be silently altered, or fail as a raw cffi or struct error)."""
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise error(f"{what} {value!r} is not an unsigned {bits}-bit value (0 to {(1 << bits) - 1:#x})")
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
