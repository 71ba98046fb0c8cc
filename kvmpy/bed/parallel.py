"""Matrix rows on several emulators at once (``--jobs N``), bounded by this machine's CPUs and memory.

Each row still boots its own emulator; up to N of them run at a time, each driven
by a thread of this process. Rows are handed back in the matrix's order, whatever
order they finish in, so a run's rows, table and report are those of ``--jobs 1``.
A stop (Ctrl-C, SIGTERM: a KeyboardInterrupt on the main thread) kills every
emulator the threads started (:func:`kvmpy.bed.machine.stop_machines`), starts no
new one, and hands back the rows that had finished; the interrupt then goes on
with ``running``, the rows whose results were lost.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Dict, Mapping, Tuple, TypeVar

from kvmpy.bed import machine
from kvmpy.bed.protocol import BedError
from kvmpy.bed.request import BedFacts, BedResult

T = TypeVar("T")

#: Host memory an emulator needs beyond its guest's RAM (QEMU's TCG translation cache is up to 1 GiB).
EMULATOR_OVERHEAD = 1 << 30


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bound_jobs(asked: int, rows: int, guest_bytes: int, ncpus: int, avail: int,
               label: str = "") -> Tuple[int, str]:
    """How many rows to run at once for ``--jobs asked``, and why fewer ('' when ``asked`` it is).

    At most one emulator per CPU (each runs a guest with its vCPUs flat out), as many as
    ``avail`` bytes of free memory hold (guest RAM + :data:`EMULATOR_OVERHEAD` each; unknown
    memory bounds nothing), and no more than there are rows. ``label`` names the request in
    the reason (default ``--jobs ASKED``).
    """
    per_bed = guest_bytes + EMULATOR_OVERHEAD
    limits = [(ncpus, f"{ncpus} CPU{'s' if ncpus != 1 else ''}")]
    if avail:
        limits.append((max(1, avail // per_bed), f"{avail / (1 << 30):.1f} GiB of available memory holds "
                                                 f"{max(1, avail // per_bed)} bed(s) of {per_bed / (1 << 30):.1f} GiB"))
    limits.append((rows, f"{rows} row{'s' if rows != 1 else ''} to run"))
    n, why = min(limits, key=lambda lim: lim[0])
    if n >= asked:
        return asked, ""
    return max(1, n), f"{label or f'--jobs {asked}'}: running {max(1, n)} at once ({why})"


def run_in_order(count: int, work: Callable[[int], T], jobs: int,
                 commit: Callable[[int, T], None]) -> None:
    """Run ``work(0..count-1)`` on ``jobs`` threads; ``commit(i, result)`` on this thread in index order.

    A worker's exception stops the others' emulators and is raised here, once the results
    that had finished are committed (a bed's boot should not raise: see :func:`run_guarded`). On a
    KeyboardInterrupt every emulator is killed, the results finished before it are
    committed (in index order, skipping those that had not finished), and the
    interrupt is re-raised with ``running``: the indices whose work it cut short, and
    ``cut``: what that work returned once its emulator was dead, by index (a boot
    brings back the files its command had written by then).
    """
    machine.allow_machines()
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="kvmpy-bed-row")
    futures: Dict[Future, int] = {pool.submit(work, i): i for i in range(count)}
    results: Dict[int, T] = {}
    next_i = 0
    try:
        pending = set(futures)
        # A SIGTERM the program left at its default unwinds here (SystemExit) rather than
        # ending the process: the emulators are stopped and their boots clean up.
        with machine.exit_on_sigterm():
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(finished, key=futures.get):
                    results[futures[f]] = f.result()
                while next_i in results:
                    i = next_i
                    next_i += 1         # first: a commit that raises is not made again below
                    commit(i, results.pop(i))
    except KeyboardInterrupt as e:
        # What had finished before the stop is kept; what ran then comes back as its emulator left it.
        # Running first, then finished: work that ends between the two looks is in both (and kept
        # as finished), never in neither.
        started = {i for f, i in futures.items() if f.running()}
        done = {i: f.result() for f, i in futures.items() if i >= next_i and _returned(f)}
        _stop(pool)
        # Work that started after the first look and was not cancelled by the stop ran too.
        e.running = sorted(i for f, i in futures.items()
                           if i >= next_i and i not in done and (i in started or not f.cancelled()))
        e.cut = {i: f.result() for f, i in futures.items() if i in e.running and _returned(f)}
        for i in sorted(done):
            commit(i, done[i])
        raise
    except BaseException:
        _stop(pool)
        # The work that finished is kept all the same (committed in order, skipping the rest).
        done = {i: f.result() for f, i in futures.items() if i >= next_i and _returned(f)}
        for i in sorted(done):
            commit(i, done[i])
        raise
    finally:
        pool.shutdown(wait=True)
        machine.allow_machines()


def _returned(f: Future) -> bool:
    """Whether ``f``'s work is over and returned (neither cancelled nor raised)."""
    return f.done() and not f.cancelled() and f.exception() is None


def _stop(pool: ThreadPoolExecutor) -> None:
    """Start no more work, kill every emulator, wait for the threads (they return once it is dead)."""
    pool.shutdown(wait=False, cancel_futures=True)
    machine.stop_machines()
    pool.shutdown(wait=True)


def error_result(bed: Any, exc: BaseException) -> BedResult:
    """A boot that raised ``exc``, as that boot's result: no exit status, the error said."""
    why = str(exc) if isinstance(exc, BedError) else f"{type(exc).__name__}: {exc}"
    facts = BedFacts()
    backend = getattr(bed, "backend", None)
    if backend is not None:
        try:
            facts = backend.machine_facts()
        except Exception:
            pass
    return BedResult(None, "", error=f"the bed failed: {why}", facts=facts)


def run_guarded(bed: Any, job: Any, params: Mapping[str, str] = {}) -> BedResult:
    """``bed.run(job, params)``, except that a boot that fails with an Exception (a BedError, an
    OSError such as a full disk) is that row's result (no exit status, the error said), so that
    one row's failure keeps every other row."""
    try:
        return bed.run(job, params)
    except Exception as exc:
        return error_result(bed, exc)
