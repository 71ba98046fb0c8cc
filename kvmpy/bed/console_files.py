"""Result files over a serial console, for a machine that shares no directory with the host (Bochs).

Two ways back, both printed by the bed's payload and parsed from the console log:

* the files block: at the end of the job, the results directory (and the kernel log) as a
  base64 tarball between :data:`RESULTS_BEGIN` and :data:`RESULTS_END`;
* followed files (``BedRequest.follow``): while the job runs, each line of such a file as
  it is written (``KVMPY-BED: follow NAME LINE``, collected by ``ConsoleLog``), which is
  what a machine that never reaches the files block (stopped, or past its timeout) brings back.

Anything that can print to the console can forge either, so both are held to the limits of
:mod:`kvmpy.bed.results`.
"""

from __future__ import annotations

import base64
import re
import tarfile
import zlib
from typing import Dict, List, Sequence, Tuple

from kvmpy.bed.protocol import FOLLOW, MARKER, marker_reader
from kvmpy.bed.results import MAX_FILE_BYTES, MAX_TOTAL_BYTES, Collected, files_from_tar

#: The init's markers around the files block: their kinds (what MarkerReader.read gives), and the
#: lines without the nonce.
BEGIN_KIND, END_KIND = "files-begin", "files-end"
RESULTS_BEGIN = f"{MARKER} {BEGIN_KIND}"
RESULTS_END = f"{MARKER} {END_KIND}"

#: Shell functions that send the followed results files (``BedRequest.follow``) to the console
#: line by line as they are written: the payload's files block comes only at the end, which a
#: stopped machine never reaches.  Each follower is a session of its own, so that one kill
#: ends both its tail and its loop.
FOLLOWERS = r"""start_followers() {  # $1: the results directory
    followers=
    for name in @FOLLOW@; do
        setsid sh -c 'tail -n +1 -F -s 1 "$2" 2>/dev/null | while IFS= read -r l; do echo "$0$1 $l"; done' \
            "@FOLLOW_MARKER@" "$name" "$1/$name" &
        followers="$followers $!"
    done
}
stop_followers() {
    for pid in $followers; do kill -TERM -$pid 2>/dev/null; done
}
"""


def followers_script(follow) -> str:
    """:data:`FOLLOWERS` for the results files ``follow`` (plain names: BedRequest checks them)."""
    return FOLLOWERS.replace("@FOLLOW@", " ".join(follow)).replace("@FOLLOW_MARKER@", FOLLOW)


def extract_files(console: str) -> Tuple[Dict[str, bytes], str, List[str]]:
    """(results files, kernel log, dropped files) from the base64 tarball in the console.

    The block is the lines between the last begin marker before the last end marker and
    that end marker, both read as the init's markers (line start, the boot's nonce:
    :class:`kvmpy.bed.protocol.MarkerReader`), so that marker text the command printed
    neither starts a block nor swallows the real one. Anything that can print to the console
    can still forge a block's content, so the archive is read through
    :func:`kvmpy.bed.results.files_from_tar`: regular files with safe names and bounded sizes
    only. Returns empty results when the block is missing or damaged; for a machine's console
    (:class:`kvmpy.bed.protocol.ConsoleText`) ``dropped`` then says why: no result is lost
    without a word.
    """
    reader = marker_reader(console)
    lines = console.splitlines()
    begin, block = None, None
    for i, line in enumerate(lines):
        marker = reader.read(line)
        if marker is None:
            continue
        if marker[0] == BEGIN_KIND:
            begin = i
        elif marker[0] == END_KIND and begin is not None:
            block = lines[begin + 1:i]
            begin = None
    say = reader.strict
    if block is None:
        return {}, "", (["no results came back: the bed's files block is missing from the console"
                         + (" (it began but never ended)" if begin is not None else "")] if say else [])
    # Whole base64 lines only: a stray kernel message is a line of its own.
    data = "".join(line.strip() for line in block if re.fullmatch(r"[A-Za-z0-9+/=]+", line.strip()))
    try:
        members, dropped = files_from_tar(base64.b64decode(data))
    except (tarfile.TarError, ValueError, EOFError, OSError, zlib.error) as e:
        return {}, "", ([f"no results came back: the bed's files block is damaged ({type(e).__name__}: {e})"]
                        if say else [])
    files = {name[len("results/"):]: content for name, content in members.items()
             if name.startswith("results/")}
    dropped += [f"{name}: not in results/" for name in members
                if not name.startswith("results/") and name != "dmesg.txt"]
    return files, members.get("dmesg.txt", b"").decode(errors="replace"), dropped


def followed_files(followed: Dict[str, List[str]], names: Sequence[str]) -> Collected:
    """(files, dropped): the followed results files ``names`` as their lines came over the
    console (``followed``, :attr:`kvmpy.bed.machine.ConsoleLog.followed`). A file no line came
    for is absent; one past the size limits is dropped, with the reason."""
    files: Dict[str, bytes] = {}
    dropped: List[str] = []
    total = 0
    for name in names:
        if not followed.get(name):
            continue
        data = "".join(line + "\n" for line in followed[name]).encode()
        if len(data) > MAX_FILE_BYTES or total + len(data) > MAX_TOTAL_BYTES:
            dropped.append(f"{name}: followed over the console, {len(data)} bytes, past the size limit")
            continue
        files[name] = data
        total += len(data)
    return files, dropped
