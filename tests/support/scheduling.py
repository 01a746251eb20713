"""How the two test workers share the suite (pytest-xdist; tests/conftest.py applies it).

Work goes out a file at a time, so that a module's fixtures are built once; the files that use
the Slurm cluster go to one worker together, as they share its two job slots and time their polls
against it; and the longest files go out first, so that the end-to-end runs start at once and the
short files fill the other worker beside them. The order only decides when a file starts.
"""

from __future__ import annotations

from pathlib import PurePosixPath

SLURM_FILES = ("test_rehearsal.py", "test_slurm.py")
SLURM_SCOPE = "the Slurm cluster"
# by their time alone on a 2-core machine: the rehearsal ~11-17 min, the Slurm tests ~6, the
# miniature ~8-10, determinism's two runs ~2, then about a minute each
LONGEST_FIRST = (
    "test_rehearsal.py",
    "test_slurm.py",
    "test_miniature.py",
    "test_determinism.py",
    "test_offline_cache.py",
    "test_figures.py",
)


def scope_of(nodeid: str) -> str:
    """The unit of work a test goes out in: its file, or one scope for all the Slurm files."""
    path = nodeid.split("::", 1)[0]
    return SLURM_SCOPE if PurePosixPath(path).name in SLURM_FILES else path


def rank(file_name: str) -> int:
    """Where a file's tests go in the collection: the long files first, the rest as collected."""
    return LONGEST_FIRST.index(file_name) if file_name in LONGEST_FIRST else len(LONGEST_FIRST)
