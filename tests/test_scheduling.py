"""How the two test workers share the suite (tests/support/scheduling.py)."""

import re
from pathlib import Path

from tests.support.scheduling import LONGEST_FIRST, SLURM_FILES, SLURM_SCOPE, rank, scope_of

TESTS = Path(__file__).resolve().parent


def test_the_slurm_files_share_one_scope_and_every_other_file_is_its_own():
    assert scope_of("tests/test_rehearsal.py::test_every_job_stayed_within_its_memory_cap") == (
        SLURM_SCOPE
    )
    assert scope_of("tests/test_slurm.py::test_retry_resumes_with_more_time[x::y]") == SLURM_SCOPE
    assert scope_of("tests/test_miniature.py::test_the_paper_claim_holds[a]") == (
        "tests/test_miniature.py"
    )
    assert scope_of("tests/test_losses.py::test_mmd_equals_double_loop_reference") == (
        "tests/test_losses.py"
    )


def test_long_files_rank_first_in_their_order_and_the_rest_keep_theirs():
    assert [rank(name) for name in LONGEST_FIRST] == list(range(len(LONGEST_FIRST)))
    assert rank("test_losses.py") == rank("test_rooms.py") == len(LONGEST_FIRST)
    names = ["test_b.py", "test_miniature.py", "test_a.py", "test_rehearsal.py"]
    assert sorted(names, key=rank) == [
        "test_rehearsal.py",
        "test_miniature.py",
        "test_b.py",
        "test_a.py",
    ]


def test_every_file_that_uses_the_cluster_is_a_slurm_file():
    uses_cluster = {
        path.name
        for path in TESTS.glob("test_*.py")
        if re.search(r"^@cluster$|pytest\.mark\.slurm", path.read_text(), re.M)
    }
    assert uses_cluster == set(SLURM_FILES)
    assert all((TESTS / name).is_file() for name in LONGEST_FIRST)
