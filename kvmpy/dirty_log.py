"""Bitmap dirty logging: KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG and manual protect."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvmpy.abi import ffi, ioctl, lib
from kvmpy.bitmap import DirtyBitmap
from kvmpy.errors import KvmError

if TYPE_CHECKING:
    from kvmpy.memory import Memslot
    from kvmpy.vm import Vm


def get(vm: "Vm", ms: "Memslot", into: DirtyBitmap | None = None) -> DirtyBitmap:
    """Fetch ``ms``'s dirty bitmap. Without manual protect this also re-protects the pages."""
    if not ms.flags & lib.KVM_MEM_LOG_DIRTY_PAGES:
        raise KvmError(f"{vm.name}: slot {ms.slot} does not have KVM_MEM_LOG_DIRTY_PAGES set")
    bm = into if into is not None else DirtyBitmap(ms.npages)
    if bm.npages != ms.npages:
        raise KvmError(f"bitmap has {bm.npages} pages, slot {ms.slot} has {ms.npages}")
    log = ffi.new("struct kvm_dirty_log *")
    log.slot = ms.slot
    buf = bm.cdata()
    log.dirty_bitmap = buf
    ioctl(vm.fd, "KVM_GET_DIRTY_LOG", log, vm.name, f"slot {ms.slot}")
    return bm


def clear(vm: "Vm", ms: "Memslot", bitmap: DirtyBitmap, first_page: int = 0, num_pages: int | None = None) -> None:
    """KVM_CLEAR_DIRTY_LOG for pages [first_page, first_page+num_pages) set in ``bitmap``.

    ``bitmap`` is indexed from page 0 of the slot; the kernel wants the bits starting
    at ``first_page``, which must be a multiple of 64 (the kernel enforces it: EINVAL).
    """
    if num_pages is None:
        num_pages = ms.npages - first_page
    cl = ffi.new("struct kvm_clear_dirty_log *")
    cl.slot = ms.slot
    cl.first_page = first_page
    cl.num_pages = num_pages
    if first_page % 64 == 0:
        start = first_page // 8
        sub = bytearray(bitmap.buffer[start:]) or bytearray(8)
    else:
        # Hand the kernel an unaligned request as asked, so its own errno is what the caller sees.
        sub = bytearray(bitmap.buffer) or bytearray(8)
    buf = ffi.from_buffer(sub)
    cl.dirty_bitmap = buf
    ioctl(vm.fd, "KVM_CLEAR_DIRTY_LOG", cl, vm.name,
          f"slot {ms.slot} first_page {first_page} num_pages {num_pages}")


def enable_manual_protect(vm: "Vm", initially_set: bool = False) -> None:
    """Enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, with INITIALLY_SET if asked and offered."""
    offered = vm.require_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, "manual dirty-log protect")
    flags = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if initially_set:
        if not offered & lib.KVM_DIRTY_LOG_INITIALLY_SET:
            from kvmpy.errors import RequirementError

            raise RequirementError("KVM lacks KVM_DIRTY_LOG_INITIALLY_SET for KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        flags |= lib.KVM_DIRTY_LOG_INITIALLY_SET
    vm.enable_cap(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)
    vm.manual_protect_flags = flags
