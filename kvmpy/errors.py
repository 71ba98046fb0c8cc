"""Exception types shared by every layer of kvmpy."""
from __future__ import annotations

import errno as _errno
import os


class KvmError(Exception):
    """Base class of every kvmpy error."""


class IoctlError(KvmError):
    """A KVM ioctl failed. Carries the ioctl name, the errno and the object it was called on."""

    def __init__(self, ioctl: str, err: int, target: str, context: str = "") -> None:
        self.ioctl = ioctl
        self.errno = err
        self.errno_name = _errno.errorcode.get(err, f"errno {err}")
        self.target = target
        self.context = context
        msg = f"{ioctl} on {target} failed: {self.errno_name} ({os.strerror(err)})"
        if context:
            msg += f" [{context}]"
        super().__init__(msg)


class RequirementError(KvmError):
    """The host lacks something a test needs (capability, CPU feature, huge pages...).

    The selftest plugin (kvmpy.selftest.fixtures) turns it into a skip whose reason is
    ``str(exc)``, wherever in a test or fixture it is raised.
    """


def require(condition: object, reason: str) -> None:
    """The kernel selftests' TEST_REQUIRE: RequirementError(``reason``) unless ``condition``."""
    if not condition:
        raise RequirementError(reason)


def release_all(*steps) -> None:
    """Call every step (a release's close/unmap/...), even after one raised; then raise the
    first exception. A warning turned error or a Ctrl-C in one step must not leave the
    later fds and mappings with no owner."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as e:      # noqa: B902 - re-raised below, after the other steps
            first = first or e
    if first is not None:
        raise first
