"""Guest programs on a VM: find/build and load them, decode ucalls, run and drive them.

    programs    find guests/<name>.c's ELF, building it with build_guest.sh when stale
    elf         load an ELF into guest memory; guest globals by symbol
    ucall       the ucall ABI (guests/lib/ucall_abi.h) and its transports (port I/O, MMIO)
    stages      GUEST_SYNC stages and other numbers shared with the C guests
                (generated from guests/lib/stages.h)
    errors      how a guest run fails (assert, exception, crash, timeout)
    vm          GuestVm: a VM in long mode running a program, with lifecycle hooks
    vcpu_loop   the one vCPU loop (a thread per vCPU, ucall dispatch, kick-and-join)
    stepper     SteppedGuest: the one pass-by-pass driver (park at GUEST_SYNC, release)
"""
