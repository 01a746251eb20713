"""Machine faults versus bad inputs: which errors stop a stage instead of failing a clip.

A clip that cannot be used (no audio, a corrupt file) is the clip's own problem: the stage
records it in its manifest and goes on. A fault of the machine (a full disk or quota, a
read-only or vanished filesystem, no permission to write the output, no memory) is not: it
would fail every clip after it, each recorded as bad, and the part would look finished. So a
stage turns such an error into a `MachineFault`, which stops it with a non-zero exit, the path
and what to do, and renames nothing into place, so that a rerun redoes the work.

    fault = machine_fault(err, output_dir)        # None: the clip's own problem
    if fault is not None:
        raise fault from err
    fault = fault_in_text(ffmpeg_stderr, output_dir)   # the same, from a tool's message
    stop_on_machine_fault(err, output_dir)        # in a per-clip guard: both, raised
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

# errno -> what to do; whichever file it names, the machine is at fault, not the clip
ANYWHERE = {
    errno.ENOSPC: "free space on that filesystem (or write elsewhere), then rerun",
    errno.EDQUOT: "free space within the quota (or raise it), then rerun",
    errno.EROFS: "the filesystem is read-only: remount it read-write or write elsewhere, then rerun",
    errno.ESTALE: "the network filesystem lost the file handle: check the mount, then rerun",
    errno.EFBIG: "a file outgrew the size limit (ulimit -f or the filesystem's): raise it, rerun",
}
# errno -> what to do; a fault only when the file is on the output side (an input file that
# cannot be read is that clip's problem)
OUTPUT_SIDE = {
    errno.EACCES: "the output is not writable: fix its permissions, then rerun",
    errno.EPERM: "the output is not writable: fix its permissions, then rerun",
    errno.ENOENT: "the output directory vanished (removed or unmounted): restore it, then rerun",
}


class MachineFault(RuntimeError):
    """An error of the machine, not of an input: the stage stops and a rerun redoes it."""

    def __init__(self, where: str | os.PathLike, cause: str, advice: str):
        self.where, self.cause, self.advice = str(where), cause, advice
        super().__init__(f"{self.where}: {cause}; {advice}")


def _under(path: str | os.PathLike | None, directory: Path) -> bool:
    if path is None:
        return False
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(directory))
    except ValueError:
        return False
    return True


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def machine_fault(exc: BaseException, output: str | os.PathLike) -> MachineFault | None:
    """The MachineFault behind ``exc`` (or an error it was raised from), or None when it is an
    input's problem. ``output``: the directory the stage writes into."""
    output = Path(output)
    for err in _chain(exc):
        if isinstance(err, MachineFault):
            return err
        if isinstance(err, MemoryError):
            return MachineFault(output, "out of memory", "free memory or ask for more, then rerun")
        if not isinstance(err, OSError) or err.errno is None:
            continue
        where = err.filename or output
        if err.errno in ANYWHERE:
            return MachineFault(where, os.strerror(err.errno), ANYWHERE[err.errno])
        if err.errno in OUTPUT_SIDE and _under(err.filename, output):
            if err.errno == errno.ENOENT and output.exists():
                continue  # a file of the output missing, not the output's directory
            return MachineFault(where, os.strerror(err.errno), OUTPUT_SIDE[err.errno])
    return None


def ffmpeg_exit_fault(code: int, where: str | os.PathLike) -> MachineFault | None:
    """ffmpeg exits with its error code's low byte, -errno & 255 (228: ENOSPC), sometimes
    without printing the error; a MachineFault when that errno is one of ANYWHERE's."""
    number = 256 - code if 0 < code < 256 else None
    if number not in ANYWHERE:
        return None
    return MachineFault(
        where, f"ffmpeg exited with code {code} ({os.strerror(number)})", ANYWHERE[number]
    )


def fault_in_text(text: str, output: str | os.PathLike) -> MachineFault | None:
    """The MachineFault a tool's error message (ffmpeg's stderr, yt-dlp's) reports, or None. The
    tool prints the system's error text (strerror), on the output side in a line naming the
    output, or (yt-dlp) ffmpeg's exit code."""
    output = Path(output)
    for code in re.findall(r"ffmpeg exited with code (\d+)", text):
        fault = ffmpeg_exit_fault(int(code), output)
        if fault is not None:
            return fault
    for line in text.splitlines():
        for number, advice in ANYWHERE.items():
            if os.strerror(number) in line:
                return MachineFault(output, line.strip(), advice)
        if os.path.abspath(output) not in line and str(output) not in line:
            continue
        for number, advice in OUTPUT_SIDE.items():
            if os.strerror(number) in line and not (number == errno.ENOENT and output.exists()):
                return MachineFault(output, line.strip(), advice)
    return None


def stop_on_machine_fault(exc: BaseException, output: str | os.PathLike) -> None:
    """In a per-clip guard: raise the MachineFault behind ``exc`` (its chain, or a tool's
    message quoted in it), so that the stage stops; return when it is the clip's problem."""
    fault = machine_fault(exc, output) or fault_in_text(str(exc), output)
    if fault is not None:
        raise fault from exc
