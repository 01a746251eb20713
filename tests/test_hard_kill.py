"""After a hard kill, `snakemake --unlock` and then the same command again finish the work.

A job killed by SIGKILL between two of its outputs leaves the first on disk, marked incomplete;
without `rerun-incomplete` Snakemake refuses every later run until told what to do. The
workflow profile (profiles/default/config.yaml, read on every run of the Snakefile) sets it.
A two-output rule stands for the workflow's (acquire_gather, report_figures): it is killed
between its outputs, with and without the profile. tests/test_determinism.py kills the whole CI
workflow during an alignment and checks that the resumed run writes the same bytes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "default"

# The first output, then a wait that the test ends with SIGKILL; a rerun does not wait.
SNAKEFILE = """
rule both:
    output:
        "first.txt",
        "second.txt",
    shell:
        "echo 1 > first.txt; if [ -e killed ]; then echo 2 > second.txt; else sleep 600; fi"
"""


def snakemake(workdir: Path, profile: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--cores", "1", "-d", str(workdir)]
    return subprocess.run(
        [*command, "--workflow-profile", profile, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )


def killed_between_outputs(workdir: Path, profile: str) -> None:
    """Run the rule in its own process group and SIGKILL the group after its first output."""
    (workdir / "Snakefile").write_text(SNAKEFILE)
    command = [sys.executable, "-m", "snakemake", "--cores", "1", "-d", str(workdir)]
    run = subprocess.Popen(
        [*command, "--workflow-profile", profile],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (workdir / "first.txt").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # Snakemake and the job's shell: no handler runs
    assert run.wait(timeout=60) == -signal.SIGKILL
    assert (workdir / "first.txt").exists() and not (workdir / "second.txt").exists()
    (workdir / "killed").touch()


def test_after_a_hard_kill_unlock_then_the_same_command_finishes(tmp_path):
    killed_between_outputs(tmp_path, str(PROFILE))
    locked = snakemake(tmp_path, str(PROFILE))
    assert locked.returncode != 0 and "cannot be locked" in locked.stderr, locked.stderr[-3000:]
    assert snakemake(tmp_path, str(PROFILE), "--unlock").returncode == 0
    again = snakemake(tmp_path, str(PROFILE))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "second.txt").read_text() == "2\n"  # the job ran again, to its end


def test_without_the_profile_the_rerun_is_refused(tmp_path):
    # what the profile's one setting changes: the same kill, and no `rerun-incomplete`
    killed_between_outputs(tmp_path, "none")
    assert snakemake(tmp_path, "none", "--unlock").returncode == 0
    refused = snakemake(tmp_path, "none")
    assert refused.returncode != 0 and "incomplete" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "second.txt").exists()
